"""Load tokenizers and causal LMs from offline shortcuts or local files; save them as plain Hugging Face dirs.

A `spec` is one of:

- a named shortcut (`available_shortcuts()`), resolved from installed packages, never from the Hub;
- a Hugging Face directory (`config.json` + weights and/or tokenizer files);
- a `.gguf` file (model and tokenizer);
- a SentencePiece model (BPE or Unigram), a tiktoken BPE file or a `tokenizer.json` (tokenizer only).

Files are recognised by their content, not their name. Tokenizers are always `tokenizers`-backed fast tokenizers.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from google.protobuf.message import DecodeError
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE, Unigram
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter, generate_merges, import_protobuf

from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.core.adaptation.fsutil import atomic_output_dir
from langadapt.core.adaptation.shortcuts import SHORTCUTS, available_shortcuts
from langadapt.core.adaptation.weights import input_rows

T = TypeVar("T")

# Copied from llama_models/llama3/tokenizer.py (`Tokenizer.pat_str` and the special tokens built in its
# `__init__`); the tests check them against the installed package.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_NAMED_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
]
LLAMA3_SPECIAL_TOKENS = _LLAMA3_NAMED_SPECIALS + [
    f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(_LLAMA3_NAMED_SPECIALS))
]

_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} \d+\r?$")
_TOKENIZER_KINDS = {"hf_tokenizer", "tokenizer_json", "tiktoken", "sentencepiece"}
# SentencePiece piece types and model types (sentencepiece_model.proto)
_SPM_NORMAL, _SPM_UNKNOWN, _SPM_CONTROL, _SPM_USER_DEFINED = 1, 2, 3, 4
_SPM_UNIGRAM, _SPM_BPE = 1, 2  # model types


def load_tokenizer(spec: str) -> PreTrainedTokenizerFast:
    """Load the tokenizer named by `spec` (shortcut, HF dir, .gguf, SentencePiece, tiktoken or tokenizer.json)."""
    path = resolve(spec)
    kind = _sniff(path)
    if kind == "tokenizer_json":
        return _tokenizer_json(path)
    if kind == "tiktoken":
        return _tiktoken_tokenizer(path, LLAMA3_SPECIAL_TOKENS if spec == "llama-3" else [])
    if kind == "sentencepiece":
        return _sentencepiece_tokenizer(path)
    return _auto_tokenizer(spec, *_pretrained_source(path, kind))


def load_model(
    spec: str, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load a causal LM and its tokenizer from a shortcut, HF dir or .gguf file; GGUF weights come de-quantized.

    The model is placed on `device` in `dtype`; stages that run it pass `device.compute_device()` (and
    `device.inference_dtype` when they only run it forward)."""
    path = resolve(spec)
    kind = _sniff(path)
    if kind in _TOKENIZER_KINDS:
        raise AdaptationInputError(f"{spec} is a tokenizer, not a model")
    directory, extra = _pretrained_source(path, kind)
    model = _plain_model(_load(spec, AutoModelForCausalLM.from_pretrained, directory, dtype=dtype, **extra))
    model.to(device)  # type: ignore[arg-type]  # transformers wraps `to`; mypy reads the wrapper's signature
    return model, _auto_tokenizer(spec, directory, extra)


def save_pretrained(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, out_dir: str) -> None:
    """Write a standard HF dir (safetensors, config without quantization, generation config, tokenizer files).

    The directory is written atomically; an existing non-empty `out_dir` is an `AdaptationInputError`.
    """
    model = _plain_model(model)
    model.config.get_text_config().vocab_size = input_rows(model).shape[0]
    with atomic_output_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def resolve(spec: str) -> str:
    """The local path a spec names: a shortcut's file or an existing path (`AdaptationInputError` otherwise)."""
    if spec in SHORTCUTS:
        path = available_shortcuts().get(spec)
        if path is None:
            package, _, pip_args = SHORTCUTS[spec]
            raise AdaptationInputError(f"shortcut {spec!r} needs {package}: pip install {pip_args}")
        return path
    if os.path.exists(spec):
        return spec
    known = ", ".join(sorted(SHORTCUTS))
    raise AdaptationInputError(f"no such file or directory, nor a known shortcut ({known}): {spec}")


def _sniff(path: str) -> str:
    """Classify a path by its content: hf_model, hf_tokenizer, gguf, tokenizer_json, tiktoken or sentencepiece.

    Anything unrecognised is called sentencepiece here and rejected when its protobuf is parsed.
    """
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return "hf_model"
        if any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
            return "hf_tokenizer"
        raise AdaptationInputError(f"directory has neither config.json nor tokenizer files: {path}")
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"GGUF"):
        return "gguf"
    if head.lstrip().startswith(b"{"):
        return "tokenizer_json"
    if _TIKTOKEN_LINE.match(head.split(b"\n", 1)[0]):
        return "tiktoken"
    return "sentencepiece"


def _pretrained_source(path: str, kind: str) -> tuple[str, dict[str, str]]:
    """(directory, extra `from_pretrained` kwargs): a GGUF file is passed as its directory plus `gguf_file`."""
    if kind != "gguf":
        return path, {}
    directory, name = os.path.split(os.path.abspath(path))
    return directory, {"gguf_file": name}


def _load(spec: str, loader: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call a transformers loader, turning its errors about unusable files into `AdaptationInputError`."""
    try:
        return loader(*args, **kwargs)
    except (OSError, ValueError) as exc:
        raise AdaptationInputError(f"cannot load {spec}: {_reason(exc)}") from exc


def _reason(exc: Exception) -> str:
    """The first line of an exception's message, for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _auto_tokenizer(spec: str, directory: str, extra: dict[str, str]) -> PreTrainedTokenizerFast:
    tokenizer = _load(spec, AutoTokenizer.from_pretrained, directory, **extra)
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise AdaptationInputError(f"{spec}: {type(tokenizer).__name__} is not a tokenizers-backed tokenizer")
    return tokenizer


def _plain_model(model: PreTrainedModel) -> PreTrainedModel:
    """The model without `quantization_config`: a GGUF-loaded model holds de-quantized weights but keeps the
    config and quantizer, which block saving and training. Rebuilt from a cleaned config; ties are kept."""
    if getattr(model.config, "quantization_config", None) is None:
        return model
    config_dict = model.config.to_dict()
    del config_dict["quantization_config"]
    plain = AutoModelForCausalLM.from_config(type(model.config).from_dict(config_dict), dtype=model.dtype)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    return plain


def _tokenizer_json(path: str) -> PreTrainedTokenizerFast:
    try:
        backend = Tokenizer.from_file(path)
    except Exception as exc:  # the tokenizers library raises a bare Exception for unparsable files
        raise AdaptationInputError(f"not a valid tokenizer.json: {path} ({_reason(exc)})") from exc
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def _read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """Parse `base64-token rank` lines. (tiktoken's own loader caches local files by path: stale on change.)"""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise AdaptationInputError(f"{path}: line {number} is not '<base64 token> <rank>'") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise AdaptationInputError(f"{path}: tiktoken ranks are not 0..{len(ranks) - 1} without gaps")
    return ranks


class _TikTokenFileConverter(TikTokenConverter):
    """`TikTokenConverter` reading and validating the ranks with `_read_tiktoken_ranks`."""

    @staticmethod
    def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
        return _read_tiktoken_ranks(tiktoken_url)


def _tiktoken_tokenizer(path: str, special_tokens: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE with LLaMa-3's split regex; with special tokens, BOS/EOS are LLaMa-3's and BOS is added."""
    converter = _TikTokenFileConverter(vocab_file=path, pattern=LLAMA3_PATTERN, extra_special_tokens=special_tokens)
    backend = converter.converted()
    if not special_tokens:
        return PreTrainedTokenizerFast(tokenizer_object=backend)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        add_bos_token=True,
    )


def _read_spm_proto(path: str) -> Any:
    """Parse and sanity-check a SentencePiece ModelProto."""
    proto = import_protobuf().ModelProto()
    with open(path, "rb") as f:
        data = f.read()
    try:
        proto.ParseFromString(data)
    except DecodeError:
        proto.Clear()  # reported as unrecognised below
    unk_id = proto.trainer_spec.unk_id
    if not proto.pieces or not 0 <= unk_id < len(proto.pieces) or proto.pieces[unk_id].type != _SPM_UNKNOWN:
        raise AdaptationInputError(
            f"unrecognised file (not a HF dir, .gguf, tokenizer.json, SentencePiece or tiktoken model): {path}"
        )
    if proto.trainer_spec.model_type not in (_SPM_UNIGRAM, _SPM_BPE):
        raise AdaptationInputError(f"only BPE and Unigram SentencePiece models are supported: {path}")
    return proto


def _sentencepiece_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """Fast tokenizer equivalent to SentencePiece: its normalizer, dummy prefix, byte fallback and special pieces.

    BOS is added when the model defines one (as for Llama / Mistral). As in transformers' Llama tokenizer, text
    that starts with a space gets no extra dummy-prefix "▁" (SentencePiece adds one).
    """
    proto = _read_spm_proto(path)
    spec = proto.trainer_spec
    backend = Tokenizer(_spm_model(proto))
    norm = proto.normalizer_spec
    steps: list[normalizers.Normalizer] = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if steps:
        backend.normalizer = normalizers.Sequence(steps)
    prefix = norm.add_dummy_prefix
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first" if prefix else "never", split=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(content=" ", left=1)] if prefix else [])
    )
    backend.add_tokens(
        [
            AddedToken(p.piece, special=p.type == _SPM_CONTROL, normalized=False)
            for p in proto.pieces
            if p.type in (_SPM_CONTROL, _SPM_USER_DEFINED)
        ]
    )
    bos = _piece(proto, spec.bos_id)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=spec.unk_piece,
        bos_token=bos,
        eos_token=_piece(proto, spec.eos_id),
        pad_token=_piece(proto, spec.pad_id),
        add_bos_token=bos is not None,
    )


def _piece(proto: Any, index: int) -> str | None:
    """The piece at `index`, or None for SentencePiece's "not defined" id (-1)."""
    return proto.pieces[index].piece if 0 <= index < len(proto.pieces) else None


def _spm_model(proto: Any) -> BPE | Unigram:
    """The BPE or Unigram model of a SentencePiece proto.

    BPE merges are ordered by piece score, the order SentencePiece applies them in (transformers' own
    `SentencePieceExtractor` orders them by id, which mis-merges runs of spaces in Mistral's vocabulary).
    """
    spec = proto.trainer_spec
    if spec.model_type == _SPM_UNIGRAM:
        pieces = [(p.piece, p.score) for p in proto.pieces]
        return Unigram(pieces, unk_id=spec.unk_id, byte_fallback=spec.byte_fallback)
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    scores = {p.piece: p.score for p in proto.pieces}
    not_mergeable = [p.piece for p in proto.pieces if p.type != _SPM_NORMAL]
    return BPE(
        vocab,
        generate_merges(vocab, scores, skip_tokens=not_mergeable),
        unk_token=spec.unk_piece,
        fuse_unk=True,
        byte_fallback=spec.byte_fallback,
    )
