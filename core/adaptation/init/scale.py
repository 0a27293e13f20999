"""Logit control of the new rows: one factor multiplies every new row, chosen on target-language text.

A row built from a token's pieces (by any method here) gives the new token larger logits than an old token of its
kind: on SmolLM2-135M the mean rows' logit along the mean final hidden state is 21.9 against 10.9 for old rows, so
new tokens take probability wherever their pieces are plausible, in English text too. Scaling all new rows by one
factor below 1 lowers those logits; `fit_scale` picks the factor that gives the lowest bits per character on a
slice of the target corpus, by golden-section search over the model's own forward passes (the unscaled rows are
scored too, so the result is never worse than them on that slice). In a tied model the factor scales the one
matrix's new rows, which the input side then also sees; in an untied model it scales the head's new rows only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from langadapt.core.adaptation.device import compute_device
from langadapt.core.adaptation.evaluate.bits_per_char import bits_per_char
from langadapt.core.adaptation.weights import input_rows, output_rows

BOUNDS = (0.25, 1.25)
TRIALS = 9  # factors scored by the golden-section search: the bracket shrinks to 0.618^7 of BOUNDS (0.034)
_GOLDEN = (math.sqrt(5) - 1) / 2


@dataclass(frozen=True)
class ScaleFit:
    scale: float
    bits_per_char: float  # on the fitting slice, at `scale`
    unscaled_bits_per_char: float  # the same slice with the rows as the method made them


def head_matrix(model: PreTrainedModel) -> torch.Tensor:
    """The matrix the output layer reads (`output_rows`: the input matrix itself when tied); a model without a head
    has only its input matrix."""
    head = output_rows(model)
    return input_rows(model) if head is None else head


@torch.no_grad()
def scale_rows(model: PreTrainedModel, new_ids: list[int], scale: float) -> None:
    head_matrix(model)[new_ids] *= scale


def golden_section(score: Callable[[float], float], low: float, high: float, steps: int) -> dict[float, float]:
    """The `steps` points (x -> score) tried while bracketing the minimum of a unimodal `score` on [low, high]."""
    tried: dict[float, float] = {}

    def at(x: float) -> float:
        if x not in tried:
            tried[x] = score(x)
        return tried[x]

    left, right = high - _GOLDEN * (high - low), low + _GOLDEN * (high - low)
    for _ in range(steps - 2):
        if at(left) <= at(right):
            high, right = right, left
            left = high - _GOLDEN * (high - low)
        else:
            low, left = left, right
            right = low + _GOLDEN * (high - low)
    at(left)
    at(right)
    return tried


@torch.no_grad()
def fit_scale(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    new_ids: list[int],
    texts: list[str],
    progress: Callable[[int, int], None] | None = None,
) -> ScaleFit:
    """Scale the new rows of `model` (in place) by the factor in BOUNDS with the lowest bits per character on
    `texts`. The forward passes run on the compute device; the model returns to where it was."""
    unscaled = head_matrix(model)[new_ids].clone()
    home = unscaled.device
    model.to(compute_device())
    trials = 0

    def write(scale: float) -> None:
        matrix = head_matrix(model)  # the same parameter, now on the compute device
        matrix[new_ids] = (unscaled * scale).to(matrix.device)

    def score(scale: float) -> float:
        nonlocal trials
        write(scale)
        result = bits_per_char(model, tokenizer, texts).bits_per_char
        trials += 1
        if progress is not None:
            progress(trials, TRIALS + 1)
        return result

    try:
        tried = golden_section(score, *BOUNDS, steps=TRIALS)
        tried[1.0] = score(1.0)
        best = min(tried, key=lambda scale: tried[scale])
        write(best)
    finally:
        model.to(home)  # type: ignore[arg-type]  # transformers wraps `to`; mypy reads the wrapper
    return ScaleFit(scale=best, bits_per_char=tried[best], unscaled_bits_per_char=tried[1.0])
