"""Symbols per token: how many characters of held-out text one token of the model's tokenizer covers.

The paper's tokenizer-efficiency measure (Table 2): a better target vocabulary means more characters per token,
hence shorter sequences and cheaper generation. It looks at the tokenizer only; `model` is accepted for the common
task signature. Metrics `target` and `source` (the latter shows what the adaptation costs the source language),
each emitted when its texts are given; `n` is the number of characters measured.
"""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from langadapt.core.adaptation.evaluate.base import EvalData, ItemProgress, ScoreRow, per_language_rows
from langadapt.core.adaptation.vocab.common import chars_per_token


def symbols_per_token(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: EvalData,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    progress: ItemProgress | None = None,  # tokenizing takes no time worth reporting
) -> list[ScoreRow]:
    return per_language_rows(
        "symbols_per_token", data, limit, lambda texts: (chars_per_token(tokenizer, texts), sum(map(len, texts)))
    )
