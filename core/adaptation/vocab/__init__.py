"""The paper's four vocabulary methods, one module each, behind one entry point."""

from __future__ import annotations

from collections.abc import Callable

from transformers import PreTrainedTokenizerBase

from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.core.adaptation.vocab import bpe, extended, optimized, unigram
from langadapt.core.adaptation.vocab.common import VocabOptions, VocabReport, VocabResult

Builder = Callable[[PreTrainedTokenizerBase, str, VocabOptions], VocabResult]

METHODS: dict[str, Builder] = {
    "bpe": bpe.build,
    "unigram": unigram.build,
    "extended": extended.build,
    "optimized": optimized.build,
}


def build_vocab(method: str, source: PreTrainedTokenizerBase, corpus: str, options: VocabOptions) -> VocabResult:
    """Build the target vocabulary of `method` from the `source` tokenizer and the target-language `corpus`."""
    if method not in METHODS:
        raise AdaptationInputError(f"unknown vocab method '{method}' (choose from {', '.join(METHODS)})")
    return METHODS[method](source, corpus, options)


__all__ = ["METHODS", "VocabOptions", "VocabReport", "VocabResult", "build_vocab"]
