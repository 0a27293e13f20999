"""Micro-batch planning from measured peaks (the CUDA measurement itself runs on GPU workers only)."""

from __future__ import annotations

import pytest

from langadapt.core.adaptation.train.memory import MicroBatchPlan, plan_micro_batch

GIB = 2**30


@pytest.mark.parametrize(
    ("sequences", "peak_one", "peak_two", "reserved", "expected"),
    [
        (256, 10 * GIB, 12 * GIB, 0, MicroBatchPlan(32, 8, 72 * GIB)),  # 10 + 31 x 2 = 72 <= 0.85 x 100
        (256, 10 * GIB, 12 * GIB, 30 * GIB, MicroBatchPlan(16, 16, 40 * GIB)),  # optimizer state still to come
        (24, 10 * GIB, 12 * GIB, 0, MicroBatchPlan(24, 1, 56 * GIB)),  # all of a step fits in one pass
        (30, 10 * GIB, 20 * GIB, 0, MicroBatchPlan(6, 5, 60 * GIB)),  # a divisor of the step's sequences
        (8, 90 * GIB, 95 * GIB, 0, MicroBatchPlan(1, 8, 90 * GIB)),  # nothing fits better than one
    ],
)
def test_the_largest_dividing_micro_batch_within_the_headroom(sequences, peak_one, peak_two, reserved, expected):
    plan = plan_micro_batch(
        sequences, peak_one=peak_one, peak_two=peak_two, reserved=reserved, capacity=100 * GIB, headroom=0.85
    )
    assert plan == expected
    assert plan.micro_batch * plan.grad_accum == sequences
