"""Bits per character: the model's negative log-likelihood of a text divided by its length in characters.

Unlike perplexity it does not depend on the tokenizer, so models with old and new vocabularies compare directly.
Each document is prefixed with the BOS token (EOS when there is none) so that every text token is predicted, and
long documents are cut into windows of `window` predictions that overlap by one token.

`bits_per_char` gives the raw numbers (the benchmarks use it); `bits_per_char_rows` is the suite task: metrics
`target` and `source` on the held-out texts given (`limit` caps the documents), `n` the characters scored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.core.adaptation.evaluate.base import EvalData, ItemProgress, ScoreRow, per_language_rows
from langadapt.core.adaptation.lm_loss import CausalLMLoss


@dataclass(frozen=True)
class BitsPerChar:
    bits_per_char: float
    chars: int
    tokens: int


def _windows(ids: list[int], window: int) -> list[list[int]]:
    return [ids[start : start + window + 1] for start in range(0, len(ids) - 1, window)]


@torch.inference_mode()
def bits_per_char(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    *,
    window: int = 512,
    batch_size: int = 8,
    progress: ItemProgress | None = None,
) -> BitsPerChar:
    chars = sum(len(text) for text in texts)
    if chars == 0:
        raise AdaptationInputError("bits per char needs at least one non-empty text")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start documents with")
    chunks: list[list[int]] = []
    tokens = 0
    for text in texts:
        ids = [start, *tokenizer.encode(text, add_special_tokens=False)]
        tokens += len(ids) - 1
        chunks.extend(_windows(ids, window))
    chunks.sort(key=len)  # similar lengths together: less padding
    device = next(model.parameters()).device
    loss = CausalLMLoss(model)
    total_nats = 0.0
    for first in range(0, len(chunks), batch_size):
        batch = chunks[first : first + batch_size]
        width = max(map(len, batch))
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, chunk in enumerate(batch):
            input_ids[row, : len(chunk)] = torch.tensor(chunk)
            mask[row, : len(chunk)] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        total_nats += float(loss(input_ids, labels=input_ids, attention_mask=mask).sum())
        if progress is not None:
            progress(min(first + batch_size, len(chunks)), len(chunks))
    return BitsPerChar(bits_per_char=total_nats / math.log(2) / chars, chars=chars, tokens=tokens)


def bits_per_char_rows(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: EvalData,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    progress: ItemProgress | None = None,
) -> list[ScoreRow]:
    def measure(texts: list[str]) -> tuple[float, int]:
        result = bits_per_char(model, tokenizer, texts, batch_size=batch_size, progress=progress)
        return result.bits_per_char, result.chars

    return per_language_rows("bits_per_char", data, limit, measure)
