"""`bpe`: a new BPE vocabulary trained on the target corpus replaces the source vocabulary.

Paper sizes: 32 K for Mistral, 128 K for LLaMa-3. The tokenizer is trained in the source's scheme (byte-level or
SentencePiece-style with byte fallback), so it never produces an unknown token, splits digits one by one and
round-trips every text; the source's special tokens and chat template are carried over.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.core.adaptation.tokens import Vocabulary
from langadapt.core.adaptation.vocab.common import (
    VocabOptions,
    VocabResult,
    heldout_texts,
    make_report,
    train_tokenizer,
    training_texts,
    wrap_like,
)


def build(source: PreTrainedTokenizerBase, corpus: str, options: VocabOptions) -> VocabResult:
    return build_replacement(source, corpus, options, model="bpe")


def build_replacement(
    source: PreTrainedTokenizerBase, corpus: str, options: VocabOptions, *, model: str
) -> VocabResult:
    """Shared by `bpe` and `unigram`: train a `model` tokenizer of `vocab_size` that replaces the source's."""
    if not options.vocab_size:
        raise AdaptationInputError(f"method '{model}' needs --vocab-size")
    trained = train_tokenizer(
        Vocabulary(source),
        training_texts(corpus, options),
        model=model,  # type: ignore[arg-type]
        vocab_size=options.vocab_size,
        min_frequency=options.min_frequency,
    )
    tokenizer = wrap_like(trained, source)
    report = make_report(model, tokenizer, source, heldout_texts(corpus, options))
    return VocabResult(tokenizer=tokenizer, report=report)
