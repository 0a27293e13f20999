"""What each token of a vocabulary *means* as text, and how an old vocabulary spells a given text.

Vocabularies store tokens in an encoded alphabet: byte-level BPE (GPT-2, LLaMa-3, SmolLM2) stores the UTF-8
bytes of "при" as the symbols "Ð¿ÑĢÐ¸"; SentencePiece-style vocabularies (Mistral, Llama-2) store a space as "▁"
and unknown characters as byte-fallback pieces "<0xD0>". Comparing or re-tokenising those raw symbols as if they
were text is a known flaw (averaging over "Ð", "¿", ... instead of "п"). So every token is first decoded to the
exact bytes it stands for (`TokenKey`), and re-tokenisation maps bytes back into the old vocabulary's own
alphabet before running its model, without any pre-tokenizer side effects (no prefix space is prepended).
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_METASPACE = "▁"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character table used by byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars, strict=True)}


BYTE_TO_UNICODE = _bytes_to_unicode()
UNICODE_TO_BYTE = {char: byte for byte, char in BYTE_TO_UNICODE.items()}


class Scheme(enum.Enum):
    """How a vocabulary encodes text into its symbols."""

    BYTE_LEVEL = "byte_level"  # every byte is a printable symbol (GPT-2 table)
    METASPACE = "metaspace"  # SentencePiece style: " " is "▁", unknown chars fall back to <0xNN>
    PLAIN = "plain"  # symbols are the text itself


@dataclass(frozen=True, order=True)
class TokenKey:
    """The identity of a token across vocabularies: what it stands for, not how it is spelled.

    `kind` is "special" (an added/control token, matched by its name), "byte" (a byte-fallback piece) or "text".
    """

    kind: str
    value: bytes

    @property
    def text(self) -> str:
        return self.value.decode("utf-8", errors="replace")


def _walk(component: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Flatten a tokenizer.json normalizer / pre-tokenizer / decoder (possibly a Sequence) into its parts."""
    if not component:
        return []
    for key in ("pretokenizers", "normalizers", "decoders"):
        if key in component:
            return [part for child in component[key] for part in _walk(child)]
    return [component]


def detect_scheme(tokenizer_json: dict[str, Any]) -> Scheme:
    parts = _walk(tokenizer_json.get("pre_tokenizer")) + _walk(tokenizer_json.get("decoder"))
    parts += _walk(tokenizer_json.get("normalizer"))
    types = {part.get("type") for part in parts}
    if "ByteLevel" in types:
        return Scheme.BYTE_LEVEL
    if "Metaspace" in types or any(
        part.get("type") == "Replace" and part.get("content") == _METASPACE for part in parts
    ):
        return Scheme.METASPACE
    return Scheme.PLAIN


class Vocabulary:
    """A read-only view of a fast tokenizer's vocabulary: token keys per id and model-level re-tokenisation."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | Tokenizer):
        backend = tokenizer if isinstance(tokenizer, Tokenizer) else tokenizer.backend_tokenizer
        self.backend: Tokenizer = backend
        self.json: dict[str, Any] = json.loads(backend.to_str())
        self.scheme = detect_scheme(self.json)
        self.size = backend.get_vocab_size(with_added_tokens=True)
        self.special_ids = {tok["id"] for tok in self.json.get("added_tokens", []) if tok.get("special")}
        self.added_ids = {tok["id"] for tok in self.json.get("added_tokens", [])}
        self.unk_piece: str | None = self._model_unk() or getattr(tokenizer, "unk_token", None)

    def _model_unk(self) -> str | None:
        model = self.json["model"]
        if model["type"] == "Unigram":
            unk_id = model.get("unk_id")
            return model["vocab"][unk_id][0] if unk_id is not None else None
        return model.get("unk_token")

    @cached_property
    def pieces(self) -> dict[int, str]:
        """id -> raw piece as stored in the vocabulary (added tokens included)."""
        return {idx: piece for piece, idx in self.backend.get_vocab(with_added_tokens=True).items()}

    def key(self, token_id: int) -> TokenKey:
        piece = self.pieces[token_id]
        if token_id in self.added_ids:
            kind = "special" if token_id in self.special_ids else "text"
            return TokenKey(kind, piece.encode("utf-8"))
        byte_match = _BYTE_PIECE.match(piece)
        if byte_match and self.scheme is not Scheme.BYTE_LEVEL:
            return TokenKey("byte", bytes([int(byte_match.group(1), 16)]))
        return TokenKey("text", self.piece_to_bytes(piece))

    @cached_property
    def keys(self) -> list[TokenKey | None]:
        """Key per id; None for ids that hold no token (gaps in the id space)."""
        pieces = self.pieces
        return [self.key(i) if i in pieces else None for i in range(self.size)]

    @cached_property
    def id_by_key(self) -> dict[TokenKey, int]:
        index: dict[TokenKey, int] = {}
        for token_id, key in enumerate(self.keys):
            if key is not None:
                index.setdefault(key, token_id)
        return index

    def piece_to_bytes(self, piece: str) -> bytes:
        if self.scheme is Scheme.BYTE_LEVEL:
            if all(char in UNICODE_TO_BYTE for char in piece):
                return bytes(UNICODE_TO_BYTE[char] for char in piece)
            return piece.encode("utf-8")
        if self.scheme is Scheme.METASPACE:
            return piece.replace(_METASPACE, " ").encode("utf-8")
        return piece.encode("utf-8")

    @cached_property
    def _byte_fallback_ids(self) -> dict[int, int]:
        return {key.value[0]: idx for idx, key in enumerate(self.keys) if key is not None and key.kind == "byte"}

    def tokenize_bytes(self, data: bytes) -> list[int]:
        """Ids of this vocabulary's tokenisation of `data`, run at model level (no pre-tokenizer, no prefix space).

        Bytes that are not valid UTF-8 (a fragment of a character) go to byte-fallback pieces in a
        SentencePiece-style vocabulary; a byte-level vocabulary spells any bytes directly.
        """
        if not data:
            return []
        model = self.backend.model
        if self.scheme is Scheme.BYTE_LEVEL:
            return [tok.id for tok in model.tokenize("".join(BYTE_TO_UNICODE[b] for b in data))]
        ids: list[int] = []
        for chunk, is_text in _utf8_runs(data):
            if is_text:
                text = chunk.decode("utf-8")
                if self.scheme is Scheme.METASPACE:
                    text = text.replace(" ", _METASPACE)
                ids.extend(tok.id for tok in model.tokenize(text))
            else:
                ids.extend(self._byte_fallback_ids[b] for b in chunk if b in self._byte_fallback_ids)
        return ids


def _utf8_runs(data: bytes) -> list[tuple[bytes, bool]]:
    """Split bytes into maximal valid-UTF-8 runs and invalid stretches: [(chunk, is_valid_text), ...]."""
    runs: list[tuple[bytes, bool]] = []
    rest = data
    while rest:
        try:
            rest.decode("utf-8")
            runs.append((rest, True))
            break
        except UnicodeDecodeError as exc:
            if exc.start:
                runs.append((rest[: exc.start], True))
            runs.append((rest[exc.start : exc.end], False))
            rest = rest[exc.end :]
    return runs
