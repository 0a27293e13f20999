"""`unigram`: a new Unigram (SentencePiece-style) vocabulary trained on the target corpus replaces the source's.

Same contract as `bpe` (source scheme, byte fallback or byte alphabet, source specials and chat template kept).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from langadapt.core.adaptation.vocab.bpe import build_replacement
from langadapt.core.adaptation.vocab.common import VocabOptions, VocabResult


def build(source: PreTrainedTokenizerBase, corpus: str, options: VocabOptions) -> VocabResult:
    return build_replacement(source, corpus, options, model="unigram")
