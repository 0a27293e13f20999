"""`extended`: the source vocabulary kept whole plus the tokens of a new target-language BPE of size M it lacks.

Paper: M = 32 K for Mistral (32,000 -> 55,328 tokens), M = 64 K for LLaMa-3 (128,256 -> 174,816). Every source
token keeps its id, new ids are appended after the highest id in use (special tokens included), so any text
still round-trips. Merge priority is an option: `new-first` (the paper) lets the target merges outrank the source
ones (the target BPE's whole merge sequence runs first, then the source merges it lacks); `old-first` appends
the target merges after the source ones, which leaves source-language tokenization unchanged except where a
target merge joins two pieces the source left apart (rare: measured on English, see the tests and benchmark).
"""

from __future__ import annotations

import copy
import json
from typing import Any

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

from langadapt.core.adaptation.config import Priority, VocabConfig
from langadapt.core.adaptation.tokens import Vocabulary
from langadapt.core.adaptation.vocab.common import (
    TargetText,
    VocabResult,
    finalize_json,
    make_report,
    merge_tuples,
    require_bpe,
    train_tokenizer,
    wrap_like,
)


def build(source: PreTrainedTokenizerBase, text: TargetText, config: VocabConfig) -> VocabResult:
    vocab = Vocabulary(source)
    require_bpe(vocab, "extended")
    target = train_target_bpe(vocab, text, config)
    combined = extend_bpe(vocab.json, target, config.priority)
    tokenizer = wrap_like(combined, source)
    report = make_report(
        "extended",
        tokenizer,
        source,
        text.heldout_texts(config),
        priority=config.priority,
        target_bpe_size=config.new_tokens,
    )
    return VocabResult(tokenizer=tokenizer, report=report)


def train_target_bpe(source: Vocabulary, text: TargetText, config: VocabConfig) -> Tokenizer:
    return train_tokenizer(
        source,
        text.training(config),
        model="bpe",
        vocab_size=config.new_tokens,
        min_frequency=config.min_frequency,
    )


def extend_bpe(base: dict[str, Any], target: Tokenizer, priority: Priority) -> Tokenizer:
    """Append the target BPE's pieces missing from `base` (a tokenizer.json dict) and merge their merges in.

    Pieces are compared as stored: both vocabularies are in the same scheme, so equal pieces mean equal text.
    """
    data = copy.deepcopy(base)
    model = data["model"]
    vocab: dict[str, int] = model["vocab"]
    target_json = json.loads(target.to_str())
    target_specials = {tok["content"] for tok in target_json.get("added_tokens", [])}
    next_id = 1 + max([*vocab.values(), *(tok["id"] for tok in data.get("added_tokens", []))])
    for piece, _ in sorted(target_json["model"]["vocab"].items(), key=lambda item: item[1]):
        if piece not in vocab and piece not in target_specials:
            vocab[piece] = next_id
            next_id += 1
    old_merges = merge_tuples(model)
    new_merges = merge_tuples(target_json["model"])
    # The higher-priority list runs whole and in its own order; the other follows without the merges it repeats.
    first, second = (new_merges, old_merges) if priority == "new-first" else (old_merges, new_merges)
    seen = set(first)
    ordered = first + [m for m in second if m not in seen]
    model["merges"] = [list(m) for m in ordered]
    return finalize_json(data)
