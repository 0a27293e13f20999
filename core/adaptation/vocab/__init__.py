"""The paper's four vocabulary methods, one module each, behind one entry point."""

from __future__ import annotations

from collections.abc import Callable

from transformers import PreTrainedTokenizerBase

from langadapt.core.adaptation.config import VocabConfig
from langadapt.core.adaptation.vocab import bpe, extended, optimized, unigram
from langadapt.core.adaptation.vocab.common import CharProgress, TargetText, VocabReport, VocabResult

Builder = Callable[[PreTrainedTokenizerBase, TargetText, VocabConfig], VocabResult]

METHODS: dict[str, Builder] = {
    "bpe": bpe.build,
    "unigram": unigram.build,
    "extended": extended.build,
    "optimized": optimized.build,
}


def build_vocab(
    source: PreTrainedTokenizerBase,
    corpus: str,
    config: VocabConfig,
    *,
    heldout: str | None = None,
    progress: CharProgress | None = None,
) -> VocabResult:
    """Build the target vocabulary of `config.method` from the `source` tokenizer and the target-language `corpus`.

    `heldout` is target text kept out of training to measure chars/token; without it the corpus's first
    `config.heldout_chars` characters are held out (and not trained on). `progress` hears the characters of
    training text read so far.
    """
    return METHODS[config.method](source, TargetText(corpus, heldout, progress), config)


__all__ = ["METHODS", "VocabConfig", "VocabReport", "VocabResult", "build_vocab"]
