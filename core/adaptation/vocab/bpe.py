"""`bpe`: a new BPE vocabulary trained on the target corpus replaces the source vocabulary.

Paper sizes: 32 K for Mistral, 128 K for LLaMa-3. The tokenizer is trained in the source's scheme (byte-level or
SentencePiece-style with byte fallback), so it never produces an unknown token, splits digits one by one and
round-trips every text; the source's special tokens and chat template are carried over.
"""

from __future__ import annotations

from typing import Literal

from transformers import PreTrainedTokenizerBase

from langadapt.core.adaptation.config import VocabConfig
from langadapt.core.adaptation.tokens import Vocabulary
from langadapt.core.adaptation.vocab.common import (
    TargetText,
    VocabResult,
    make_report,
    train_tokenizer,
    wrap_like,
)


def build(source: PreTrainedTokenizerBase, text: TargetText, config: VocabConfig) -> VocabResult:
    return build_replacement(source, text, config, model="bpe")


def build_replacement(
    source: PreTrainedTokenizerBase, text: TargetText, config: VocabConfig, *, model: Literal["bpe", "unigram"]
) -> VocabResult:
    """Shared by `bpe` and `unigram`: train a `model` tokenizer of `vocab_size` that replaces the source's."""
    assert config.vocab_size is not None  # VocabConfig requires it for these methods
    trained = train_tokenizer(
        Vocabulary(source),
        text.training(config),
        model=model,
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
    )
    tokenizer = wrap_like(trained, source)
    report = make_report(model, tokenizer, source, text.heldout_texts(config))
    return VocabResult(tokenizer=tokenizer, report=report)
