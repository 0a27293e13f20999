"""`unigram`: a new Unigram (SentencePiece-style) vocabulary trained on the target corpus replaces the source's.

Same contract as `bpe` (source scheme, byte fallback or byte alphabet, source specials and chat template kept).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from langadapt.core.adaptation.config import VocabConfig
from langadapt.core.adaptation.vocab.bpe import build_replacement
from langadapt.core.adaptation.vocab.common import TargetText, VocabResult


def build(source: PreTrainedTokenizerBase, text: TargetText, config: VocabConfig) -> VocabResult:
    return build_replacement(source, text, config, model="unigram")
