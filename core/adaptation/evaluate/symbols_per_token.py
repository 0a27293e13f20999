"""Symbols per token: how many characters of held-out text one token of the model's tokenizer covers.

The paper's tokenizer-efficiency measure (Table 2): a better target vocabulary means more characters per token,
hence shorter sequences and cheaper generation. It looks at the tokenizer only; `model` is accepted for the common
task signature. Metrics `target` and `source` (the latter shows what the adaptation costs the source language),
each emitted when its texts are given; `n` is the number of characters measured.
"""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from core.adaptation.errors import AdaptationInputError
from core.adaptation.evaluate.base import EvalData, ScoreRow, take
from core.adaptation.vocab.common import chars_per_token


def symbols_per_token(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: EvalData,
    *,
    limit: int | None = None,
    batch_size: int = 8,
) -> list[ScoreRow]:
    rows = []
    for metric, texts in (("target", data.target_texts), ("source", data.source_texts)):
        kept = take([text for text in texts if text], limit)
        if kept:
            rows.append(ScoreRow("symbols_per_token", metric, chars_per_token(tokenizer, kept), sum(map(len, kept))))
    if not rows:
        raise AdaptationInputError("task 'symbols_per_token' needs held-out target or source texts, got none")
    return rows
