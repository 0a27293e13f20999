"""Generation speed: characters of target-language text a model generates per second and per decoding step.

This is what a user adapts for: with a vocabulary that covers the target language, each decoding step yields more
characters, so the same text takes fewer steps, less time and less money. The prompts are the openings of
held-out target documents (their first `PROMPT_CHARS` characters, as plain text, so base and instruct models see
the same input); every model generates exactly `NEW_TOKENS` tokens greedily (end tokens are suppressed, so every
model runs the same number of steps), once one prompt at a time and once in batches of 8, on the device the model
is on. Characters are those of the decoded continuations (special tokens dropped).

Metrics: `chars_per_step` (characters per generated token), `chars_per_s_batch1` and `chars_per_s_batch8`
(characters per second of wall time, generation only); `n` is the number of prompts (at most `MAX_PROMPTS`).
"""

from __future__ import annotations

import time

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from langadapt.core.adaptation.evaluate.base import EvalData, ItemProgress, ScoreRow, require_texts, take
from langadapt.core.adaptation.evaluate.generation import greedy_generations, model_device

PROMPT_CHARS = 200
NEW_TOKENS = 64
MAX_PROMPTS = 16
BATCH_SIZES = (1, 8)


def _timed_generation(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]], batch_size: int
) -> tuple[int, float]:
    """(characters generated, seconds) for every prompt at `batch_size`."""
    device = model_device(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    outputs = greedy_generations(
        model, tokenizer, prompts, [NEW_TOKENS] * len(prompts), batch_size=batch_size, fixed_length=True
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return sum(len(output.text) for output in outputs), time.perf_counter() - started


def generation_speed(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: EvalData,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    progress: ItemProgress | None = None,
) -> list[ScoreRow]:
    """`batch_size` is not used: the task measures the two batch sizes of `BATCH_SIZES` itself."""
    openings = [
        text[:PROMPT_CHARS] for text in take(require_texts(data.target_texts, "generation_speed", "target"), limit)
    ]
    prompts = [list(tokenizer.encode(opening, add_special_tokens=True)) for opening in openings[:MAX_PROMPTS]]
    greedy_generations(model, tokenizer, prompts[:1], [2], batch_size=1)  # warm-up: first-call costs are not speed
    rows: list[ScoreRow] = []
    for done, batch in enumerate(BATCH_SIZES, start=1):
        chars, seconds = _timed_generation(model, tokenizer, prompts, batch)
        if batch == 1:
            rows.append(
                ScoreRow("generation_speed", "chars_per_step", chars / (len(prompts) * NEW_TOKENS), len(prompts))
            )
        rows.append(ScoreRow("generation_speed", f"chars_per_s_batch{batch}", chars / seconds, len(prompts)))
        if progress is not None:
            progress(done, len(BATCH_SIZES))
    return rows
