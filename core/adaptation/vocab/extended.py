"""`extended`: the source vocabulary kept whole plus the tokens of a new target-language BPE of size M it lacks.

Paper: M = 32 K for Mistral (32,000 -> 55,328 tokens), M = 64 K for LLaMa-3 (128,256 -> 174,816). Every source
token keeps its id, new ids are appended after the highest id in use (special tokens included), so any text
still round-trips. Merge priority is an option: `new-first` (the paper) lets the target merges outrank the source
ones (the target BPE's whole merge sequence runs first, then the source merges it lacks); `old-first` appends
the target merges after the source ones, which leaves source-language tokenization unchanged except where a
target merge joins two pieces the source left apart (rare: measured on English, see the tests and benchmark);
`target-first` splits the target merges: those whose result holds a letter of the target script (the corpus's
dominant script, `scripts.py`) run first, the others after the source merges. Pieces are compared as bytes, and a
piece "holds" a target letter when it holds the first byte of one: a byte-level BPE also merges a space with the
lead byte of a letter before the letter is complete, and such steps must keep their rank. Target-script merges can
never apply to text without that script, so source-language text written in another script is tokenized exactly as
by `old-first`, while target text gets the new-first segmentation for everything written in its script. (When
both languages share a script, every target merge counts and `target-first` amounts to `new-first`.)
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

from langadapt.core.adaptation.config import Priority, VocabConfig
from langadapt.core.adaptation.scripts import char_script, script_profile
from langadapt.core.adaptation.tokens import Vocabulary
from langadapt.core.adaptation.vocab.common import (
    TargetText,
    VocabResult,
    finalize_json,
    make_report,
    merge_tuples,
    require_bpe,
    take_chars,
    train_tokenizer,
    wrap_like,
)

SCRIPT_SAMPLE_CHARS = 1_000_000  # corpus characters that measure the target script (target-first)


def build(source: PreTrainedTokenizerBase, text: TargetText, config: VocabConfig) -> VocabResult:
    vocab = Vocabulary(source)
    require_bpe(vocab, "extended")
    target = train_target_bpe(vocab, text, config)
    combined = extend_bpe(vocab.json, target, config.priority, target_merge(vocab, text, config))
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


MergeTest = Callable[[tuple[str, str]], bool]


def target_merge(vocab: Vocabulary, text: TargetText, config: VocabConfig) -> MergeTest | None:
    """For `target-first`: whether a merge's result holds (the first byte of) a letter in the corpus's dominant
    script (None for the other priorities)."""
    if config.priority != "target-first":
        return None
    sample = list(take_chars(text.training(config, counted=False), SCRIPT_SAMPLE_CHARS))
    script = script_profile(sample).script
    lead_bytes = {ch.encode()[0] for ch in set("".join(sample)) if char_script(ch) == script}

    def produces_target_script(merge: tuple[str, str]) -> bool:
        return not lead_bytes.isdisjoint(vocab.piece_to_bytes(merge[0] + merge[1]))

    return produces_target_script


def extend_bpe(
    base: dict[str, Any], target: Tokenizer, priority: Priority, is_target_merge: MergeTest | None = None
) -> Tokenizer:
    """Append the target BPE's pieces missing from `base` (a tokenizer.json dict) and merge their merges in, in
    the order `priority` says (`target-first` needs `is_target_merge`).

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
    # Each list keeps its own order; a merge already placed is not repeated.
    if priority == "new-first":
        groups = [new_merges, old_merges]
    elif priority == "old-first":
        groups = [old_merges, new_merges]
    else:
        assert is_target_merge is not None
        target_first = [m for m in new_merges if is_target_merge(m)]
        groups = [target_first, old_merges, new_merges]
    ordered = list(dict.fromkeys(m for group in groups for m in group))
    model["merges"] = [list(m) for m in ordered]
    return finalize_json(data)
