"""Micro-batch from memory: on a GPU, each optimizer step's `batch_size x grad_accum` sequences are regrouped into
the largest micro-batches that fit, so a step trains on the same sequences and tokens with fewer, fuller passes.

The peak memory of a forward + backward pass is measured at micro-batches of 1 and 2 sequences (activations grow
linearly in the micro-batch; weights, gradients and the optimizer state do not), then extrapolated:
`peak(m) = peak(1) + (m - 1) x (peak(2) - peak(1))`. The chosen micro-batch divides the step's sequences and keeps
`peak(m)` plus the optimizer state not yet allocated within `headroom` of the device's memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.core.adaptation.train.plan import HEADROOM  # the share of a GPU the submit-time plan counts on


@dataclass(frozen=True)
class MicroBatchPlan:
    micro_batch: int  # sequences per forward / backward pass (per process)
    grad_accum: int  # passes per optimizer step
    peak_bytes: int | None  # the extrapolated peak of one pass at `micro_batch` (None: not measured)


def plan_micro_batch(
    sequences_per_step: int, *, peak_one: int, peak_two: int, reserved: int, capacity: int, headroom: float = HEADROOM
) -> MicroBatchPlan:
    """The largest divisor m of `sequences_per_step` with `peak(m) + reserved <= headroom x capacity` (at least 1)."""
    per_sequence = max(peak_two - peak_one, 1)
    budget = headroom * capacity - reserved
    best = 1
    for m in range(1, sequences_per_step + 1):
        if sequences_per_step % m == 0 and peak_one + (m - 1) * per_sequence <= budget:
            best = m
    return MicroBatchPlan(best, sequences_per_step // best, peak_one + (best - 1) * per_sequence)


def fit_micro_batch(
    run_pass: Callable[[int], None],
    sequences_per_step: int,
    *,
    device: torch.device,
    optimizer_bytes: int,
) -> MicroBatchPlan:
    """Measure `run_pass(m)` (one forward + backward of m sequences, gradients cleared after) at m = 1 and 2 on the
    CUDA `device` and plan from the peaks. A pass of one sequence that does not fit is an `AdaptationInputError`."""

    def peak(m: int) -> int:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        run_pass(m)
        return int(torch.cuda.max_memory_allocated(device))

    capacity = torch.cuda.get_device_properties(device).total_memory
    try:
        peak_one = peak(1)
    except torch.cuda.OutOfMemoryError as exc:
        raise AdaptationInputError(
            "one sequence of cpt.seq_len tokens does not fit in GPU memory with this trainable set: "
            "lower cpt.seq_len or train fewer parameters"
        ) from exc
    if sequences_per_step == 1:
        return MicroBatchPlan(1, 1, peak_one)
    try:
        peak_two = peak(2)
    except torch.cuda.OutOfMemoryError:
        return MicroBatchPlan(1, sequences_per_step, peak_one)
    finally:
        torch.cuda.empty_cache()
    return plan_micro_batch(
        sequences_per_step, peak_one=peak_one, peak_two=peak_two, reserved=optimizer_bytes, capacity=capacity
    )
