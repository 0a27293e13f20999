"""`optimized` (the paper's LLaMa-3 variant): keep N source tokens, then add the tokens of a target BPE of size M.

Paper: N = M = 64 K on LLaMa-3, 114,504 tokens in all. Which N survive:
- `frequency` (the paper's text, "the most common 50 %"): token counts of the source tokenizer on a mixed sample
  of the target corpus and a source-language corpus, most common first;
- `first-ids` (the authors' code): the N lowest ids, i.e. the earliest BPE merges.
Special tokens and byte tokens (byte-fallback pieces, or the 256 single-byte symbols of a byte-level vocabulary)
are never dropped, and the kept set is closed under merges: a kept token brings the two pieces it is merged from,
so every kept token stays reachable. N counts the kept base vocabulary, byte tokens included; special tokens come
on top. Kept tokens are renumbered in their original order, target tokens follow, then special tokens that live
outside the base vocabulary. The removed pieces are reported.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from typing import Any

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

from langadapt.core.adaptation.config import VocabConfig
from langadapt.core.adaptation.corpus import iter_documents
from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.core.adaptation.tokens import Scheme, Vocabulary
from langadapt.core.adaptation.vocab.common import (
    BYTE_PIECES,
    TargetText,
    VocabResult,
    finalize_json,
    make_report,
    merge_tuples,
    require_bpe,
    take_chars,
    wrap_like,
)
from langadapt.core.adaptation.vocab.extended import extend_bpe, target_merge, train_target_bpe

FREQUENCY_SAMPLE_CHARS = 2_000_000  # per language


def build(source: PreTrainedTokenizerBase, text: TargetText, config: VocabConfig) -> VocabResult:
    vocab = Vocabulary(source)
    require_bpe(vocab, "optimized")
    assert config.keep_tokens is not None  # VocabConfig requires it for this method
    if config.keep_by == "frequency":
        counts = _token_counts(vocab, text, config)
        order = sorted(vocab.json["model"]["vocab"].values(), key=lambda i: (-counts[i], i))
    else:
        order = sorted(vocab.json["model"]["vocab"].values())
    kept = select_kept(vocab, order, config.keep_tokens)
    pruned, removed, outside_specials = prune_bpe(vocab, kept)
    target = train_target_bpe(vocab, text, config)
    merge_test = target_merge(vocab, text, config)
    combined = _append_specials(extend_bpe(pruned, target, config.priority, merge_test), outside_specials)
    tokenizer = wrap_like(combined, source)
    report = make_report(
        "optimized",
        tokenizer,
        source,
        text.heldout_texts(config),
        keep_by=config.keep_by,
        kept_source_tokens=len(kept),
        priority=config.priority,
        target_bpe_size=config.new_tokens,
        frequency_sample="target+source" if config.source_corpus else "target only",
    )
    return VocabResult(tokenizer=tokenizer, report=report, removed=removed)


def _token_counts(vocab: Vocabulary, text: TargetText, config: VocabConfig) -> Counter[int]:
    texts = list(take_chars(text.training(config, counted=False), FREQUENCY_SAMPLE_CHARS))
    if config.source_corpus:
        texts += list(iter_documents(config.source_corpus, limit_chars=FREQUENCY_SAMPLE_CHARS))
    counts: Counter[int] = Counter()
    for encoding in vocab.backend.encode_batch(texts, add_special_tokens=False):
        counts.update(encoding.ids)
    return counts


def _protected(vocab: Vocabulary) -> set[int]:
    model_vocab: dict[str, int] = vocab.json["model"]["vocab"]
    protected = {i for i in vocab.added_ids if i in model_vocab.values()}
    if vocab.scheme is Scheme.BYTE_LEVEL:
        protected |= {i for piece, i in model_vocab.items() if len(vocab.piece_to_bytes(piece)) == 1}
    else:
        protected |= {model_vocab[p] for p in BYTE_PIECES if p in model_vocab}
    unk = vocab.unk_piece
    if unk in model_vocab:
        protected.add(model_vocab[unk])
    return protected


def select_kept(vocab: Vocabulary, order: list[int], keep: int) -> set[int]:
    """Protected ids plus ids taken in `order`, each with its merge ancestors, until `keep` ids are kept."""
    pieces = vocab.pieces
    model_vocab: dict[str, int] = vocab.json["model"]["vocab"]
    parents: dict[int, tuple[int, int]] = {}
    for left, right in merge_tuples(vocab.json["model"]):
        merged = model_vocab.get(left + right)
        if merged is not None and merged not in parents and left in model_vocab and right in model_vocab:
            parents[merged] = (model_vocab[left], model_vocab[right])
    kept = _protected(vocab)
    if keep < len(kept):
        raise AdaptationInputError(f"--keep-tokens {keep} is below the {len(kept)} special and byte tokens")
    for token_id in order:
        if len(kept) >= keep:
            break
        stack = [token_id]
        while stack:
            current = stack.pop()
            if current in kept or current not in pieces:
                continue
            kept.add(current)
            stack.extend(parents.get(current, ()))
    return kept


def prune_bpe(vocab: Vocabulary, kept: set[int]) -> tuple[dict[str, Any], list[str], list[dict[str, Any]]]:
    """tokenizer.json data holding only the kept base tokens (renumbered in order) and the merges among them.

    Also returns the removed pieces and the special tokens that live outside the base vocabulary (taken out of
    the data, to be appended after the target tokens).
    """
    data = copy.deepcopy(vocab.json)
    model = data["model"]
    old_vocab: dict[str, int] = model["vocab"]
    ordered = sorted(old_vocab.items(), key=lambda item: item[1])
    new_vocab = {piece: new_id for new_id, (piece, _) in enumerate(p for p in ordered if p[1] in kept)}
    removed = [piece for piece, old_id in ordered if old_id not in kept]
    model["vocab"] = new_vocab
    model["merges"] = [
        [left, right]
        for left, right in merge_tuples(model)
        if left in new_vocab and right in new_vocab and left + right in new_vocab
    ]
    outside = [tok for tok in data.get("added_tokens", []) if tok["content"] not in new_vocab]
    data["added_tokens"] = [tok for tok in data.get("added_tokens", []) if tok["content"] in new_vocab]
    for tok in data["added_tokens"]:
        tok["id"] = new_vocab[tok["content"]]
    return data, removed, outside


def _append_specials(tokenizer: Tokenizer, specials: list[dict[str, Any]]) -> Tokenizer:
    """Give the special tokens that live outside the model vocabulary the ids right after everything else."""
    data = json.loads(tokenizer.to_str())
    next_id = 1 + max([*data["model"]["vocab"].values(), *(t["id"] for t in data.get("added_tokens", []))])
    for offset, tok in enumerate(sorted(specials, key=lambda t: t["id"])):
        data["added_tokens"].append({**tok, "id": next_id + offset})
    return finalize_json(data)
