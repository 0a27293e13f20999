"""Pieces shared by the vocabulary methods: results, training a tokenizer in the source's scheme,
editing tokenizer.json, and the chars-per-token ("symbols per token") measure."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from tokenizers import Tokenizer, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from langadapt.core.adaptation.config import VocabConfig
from langadapt.core.adaptation.corpus import iter_documents, require_documents
from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.core.adaptation.tokens import Scheme, Vocabulary

BYTE_PIECES = [f"<0x{b:02X}>" for b in range(256)]
_TRAIN_BATCH_DOCS = 1000


@dataclass
class VocabReport:
    method: str
    vocab_size: int
    source_vocab_size: int
    new_tokens: int
    removed_tokens: int
    overlapping_tokens: int
    chars_per_token: float
    source_chars_per_token: float
    heldout_chars: int
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class VocabResult:
    tokenizer: PreTrainedTokenizerFast
    report: VocabReport
    removed: list[str] = field(default_factory=list)  # raw pieces of source tokens dropped (optimized)

    def save(self, directory: str) -> None:
        """The tokenizer files, `vocab_report.json` and (when tokens were dropped) `removed_tokens.json`."""
        self.tokenizer.save_pretrained(directory)
        files: dict[str, Any] = {"vocab_report.json": self.report.to_dict()}
        if self.removed:
            files["removed_tokens.json"] = self.removed
        for name, payload in files.items():
            with open(os.path.join(directory, name), "w", encoding="utf-8") as handle:
                json.dump(payload, handle, ensure_ascii=False, indent=2)


CharProgress = Callable[[int], None]  # characters of training text read so far


@dataclass(frozen=True)
class TargetText:
    """The target-language text a vocabulary is built from: the training `corpus`, an optional `heldout` file for
    the chars/token report (without it the corpus's first `heldout_chars` are held out, and not trained on), and
    who hears how many characters of training text have been read."""

    corpus: str
    heldout: str | None = None
    progress: CharProgress | None = None

    def training(self, config: VocabConfig, *, counted: bool = True) -> Iterator[str]:
        """The corpus minus its held-out head, cut at `train_chars`; reported to `progress` as it is consumed
        (`counted=False` for a side read, such as a frequency sample)."""
        docs: Iterable[str] = require_documents(self.corpus)
        if self.heldout is None:
            docs = _skip_chars(docs, config.heldout_chars)
        texts = take_chars(docs, config.train_chars)
        return texts if self.progress is None or not counted else _counted(texts, self.progress)

    def heldout_texts(self, config: VocabConfig) -> list[str]:
        """The first `heldout_chars` of the held-out file, or of the corpus when there is none."""
        return list(iter_documents(self.heldout or self.corpus, limit_chars=config.heldout_chars))


def _counted(texts: Iterable[str], progress: CharProgress) -> Iterator[str]:
    read = 0
    for text in texts:
        read += len(text)
        progress(read)
        yield text


def _skip_chars(docs: Iterable[str], chars: int) -> Iterator[str]:
    skipped = 0
    for doc in docs:
        if skipped >= chars:
            yield doc
        elif skipped + len(doc) > chars:
            yield doc[chars - skipped :]
            skipped = chars
        else:
            skipped += len(doc)


def take_chars(docs: Iterable[str], chars: int | None) -> Iterator[str]:
    taken = 0
    for doc in docs:
        if chars is not None and taken >= chars:
            return
        taken += len(doc)
        yield doc


def _batches(texts: Iterable[str]) -> Iterator[list[str]]:
    iterator = iter(texts)
    while batch := list(itertools.islice(iterator, _TRAIN_BATCH_DOCS)):
        yield batch


def count_tokens(tokenizer: PreTrainedTokenizerBase | Tokenizer, texts: list[str]) -> int:
    """Tokens of `texts` without special tokens."""
    backend = tokenizer if isinstance(tokenizer, Tokenizer) else tokenizer.backend_tokenizer
    return sum(len(enc.ids) for enc in backend.encode_batch(texts, add_special_tokens=False))


def chars_per_token(tokenizer: PreTrainedTokenizerBase | Tokenizer, texts: list[str]) -> float:
    """Characters per token over `texts`, special tokens excluded (the paper's "symbols per token")."""
    tokens = count_tokens(tokenizer, texts)
    return sum(len(text) for text in texts) / tokens if tokens else 0.0


def special_pieces(source: Vocabulary) -> list[str]:
    """The source's special (control) tokens in id order: they are carried into every new vocabulary."""
    return [source.pieces[i] for i in sorted(source.special_ids)]


def training_pre_tokenizer(source: Vocabulary) -> pre_tokenizers.PreTokenizer:
    """Pre-tokenizer for a new target tokenizer in the source's scheme, with digits split one by one.

    SentencePiece-style sources get a splitting Metaspace (pieces never cross a word boundary, as SentencePiece
    itself does), byte-level sources keep their own split regex / ByteLevel step.
    """
    digits = pre_tokenizers.Digits(individual_digits=True)
    if source.scheme is Scheme.METASPACE:
        metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
        return pre_tokenizers.Sequence([metaspace, digits])
    original = source.backend.pre_tokenizer
    if original is None:
        return digits
    return pre_tokenizers.Sequence([digits, original])


def train_tokenizer(
    source: Vocabulary,
    texts: Iterable[str],
    *,
    model: Literal["bpe", "unigram"],
    vocab_size: int,
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a BPE or Unigram tokenizer on `texts` in the source's scheme; the result never produces unknowns.

    Layout of the ids: the source's special tokens, then (SentencePiece-style scheme) the 256 byte-fallback
    pieces, then the learned pieces; `vocab_size` counts all of them. Byte-level schemes get the whole 256-symbol
    byte alphabet. The normalizer, decoder and post-processor are the source's.
    """
    from tokenizers import models

    specials = special_pieces(source)
    byte_pieces = BYTE_PIECES if source.scheme is Scheme.METASPACE else []
    reserved = specials + byte_pieces
    unk = source.unk_piece
    alphabet = pre_tokenizers.ByteLevel.alphabet() if source.scheme is Scheme.BYTE_LEVEL else []
    minimum = len(reserved) + len(alphabet) + 1
    if vocab_size < minimum:
        raise AdaptationInputError(f"vocab size {vocab_size} is too small (at least {minimum})")
    trainer: trainers.Trainer
    if model == "bpe":
        tokenizer = Tokenizer(models.BPE(unk_token=unk, byte_fallback=bool(byte_pieces)))
        # A SentencePiece-style vocabulary keeps the 1000 most frequent characters; rarer ones use byte fallback.
        alphabet_limit: dict[str, Any] = {} if alphabet else {"limit_alphabet": 1000}  # the binding refuses None
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=reserved,
            initial_alphabet=alphabet,
            max_token_length=24,
            show_progress=False,
            **alphabet_limit,
        )
    else:
        tokenizer = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size,
            special_tokens=reserved,
            unk_token=unk,
            initial_alphabet=alphabet,
            max_piece_length=16,
            show_progress=False,
        )
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = training_pre_tokenizer(source)
    tokenizer.train_from_iterator(_batches(texts), trainer=trainer)
    if tokenizer.get_vocab_size() <= len(reserved):
        raise AdaptationInputError("the corpus is too small to learn any token")
    data = json.loads(tokenizer.to_str())
    # The byte pieces were reserved through the trainer's special list; they are ordinary vocabulary entries.
    data["added_tokens"] = [tok for tok in data["added_tokens"] if tok["content"] not in set(byte_pieces)]
    data["model"]["byte_fallback"] = bool(byte_pieces)
    if model == "unigram":
        _demote_byte_pieces(data["model"], set(byte_pieces))
        pieces = [piece for piece, _ in data["model"]["vocab"]]
        data["model"]["unk_id"] = pieces.index(unk) if unk in pieces else None
    data["decoder"] = source.json.get("decoder")
    data["post_processor"] = source.json.get("post_processor")
    return finalize_json(data)


def _demote_byte_pieces(model: dict[str, Any], byte_pieces: set[str]) -> None:
    """Byte pieces in a Unigram vocabulary only serve byte fallback: give them the lowest score."""
    lowest = min(score for _, score in model["vocab"])
    for entry in model["vocab"]:
        if entry[0] in byte_pieces:
            entry[1] = lowest - 10.0


def finalize_json(data: dict[str, Any]) -> Tokenizer:
    """Rebuild a Tokenizer from edited tokenizer.json data, remapping special-token ids in the post-processor.

    A BPE model vocabulary also receives the added tokens it lacks, at their ids: `tokenizers` re-numbers added
    tokens that are missing from the model vocabulary by counting its entries, which collides with appended
    pieces as soon as the ids have a gap (LLaMa-3 keeps its 256 specials outside the model vocabulary).
    """
    ids: dict[str, int] = {}
    model = data["model"]
    if model["type"] == "Unigram":
        ids.update({piece: i for i, (piece, _) in enumerate(model["vocab"])})
    else:
        for tok in data.get("added_tokens", []):
            model["vocab"].setdefault(tok["content"], tok["id"])
        ids.update(model["vocab"])
    ids.update({tok["content"]: tok["id"] for tok in data.get("added_tokens", [])})
    _remap_post_processor(data.get("post_processor"), ids)
    return Tokenizer.from_str(json.dumps(data))


def _remap_post_processor(processor: dict[str, Any] | None, ids: dict[str, int]) -> None:
    if not processor:
        return
    for child in processor.get("processors", []):
        _remap_post_processor(child, ids)
    for name, entry in (processor.get("special_tokens") or {}).items():
        if name in ids:
            entry["ids"] = [ids[name]]
    if processor.get("type") in {"RobertaProcessing", "BertProcessing"}:
        for slot in ("sep", "cls"):
            piece = processor[slot][0]
            if piece in ids:
                processor[slot] = [piece, ids[piece]]


def wrap_like(tokenizer: Tokenizer, source: PreTrainedTokenizerBase) -> PreTrainedTokenizerFast:
    """A transformers tokenizer over `tokenizer` with the source's special-token roles and chat template."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    roles = {}
    for role in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = getattr(source, role, None)
        if value is not None and str(value) in vocab:
            roles[role] = str(value)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **roles)
    wrapped.chat_template = source.chat_template
    wrapped.model_max_length = source.model_max_length
    return wrapped


def merge_tuples(model: dict[str, Any]) -> list[tuple[str, str]]:
    """A BPE model's merges as tuples, whichever serialisation ("a b" strings or pairs) the file uses."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in model["merges"]]  # type: ignore[misc]


def require_bpe(source: Vocabulary, method: str) -> None:
    if source.json["model"]["type"] != "BPE":
        raise AdaptationInputError(
            f"method '{method}' extends a BPE vocabulary; the source tokenizer is {source.json['model']['type']}"
        )


def make_report(
    method: str,
    result: PreTrainedTokenizerBase,
    source_tokenizer: PreTrainedTokenizerBase,
    heldout: list[str],
    **details: Any,
) -> VocabReport:
    """Count new / removed / overlapping tokens by what they stand for (`TokenKey`) and measure chars/token."""
    old, new = Vocabulary(source_tokenizer), Vocabulary(result)
    old_keys = {k for k in old.keys if k is not None}
    new_keys = {k for k in new.keys if k is not None}
    return VocabReport(
        method=method,
        vocab_size=len(result),
        source_vocab_size=len(source_tokenizer),
        new_tokens=len(new_keys - old_keys),
        removed_tokens=len(old_keys - new_keys),
        overlapping_tokens=len(new_keys & old_keys),
        chars_per_token=round(chars_per_token(result, heldout), 4),
        source_chars_per_token=round(chars_per_token(source_tokenizer, heldout), 4),
        heldout_chars=sum(len(t) for t in heldout),
        details=details,
    )
