"""Micro-Avg, the paper's headline number: the plain mean over datasets, each dataset weighing the same.

One accuracy-like number per dataset enters (`MICRO_AVG_METRICS`):
- `copy_ru` / `copy_en`: `f1` (matched-characters F1). Chosen over `exact_match` because it degrades gradually:
  one wrong character in a 300-character copy costs 0.3 % instead of the whole item, which separates adaptation
  variants that all fail to copy perfectly.
- `mc_ruworldtree`: `accuracy` (summed, not length-normalised, option log-likelihoods).
- `mera_arith`: `simplear_exact_match` and `rumultiar_exact_match`, two datasets.
`symbols_per_token` and `bits_per_char` are not accuracies (not in [0, 1], and lower is better for the latter),
so they never enter; neither do `accuracy_norm` or copy `exact_match`, which would weigh a dataset twice.
Only the datasets present in the rows count; `n` of the result is their number.
"""

from __future__ import annotations

from collections.abc import Iterable

from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.core.adaptation.evaluate.base import ScoreRow

MICRO_AVG_METRICS: tuple[tuple[str, str], ...] = (
    ("copy_ru", "f1"),
    ("copy_en", "f1"),
    ("mc_ruworldtree", "accuracy"),
    ("mera_arith", "simplear_exact_match"),
    ("mera_arith", "rumultiar_exact_match"),
)


def micro_avg(rows: Iterable[ScoreRow]) -> ScoreRow:
    """The mean of the `MICRO_AVG_METRICS` rows among `rows` (a dataset given twice is an error)."""
    picked: dict[tuple[str, str], float] = {}
    for row in rows:
        key = (row.task, row.metric)
        if key in MICRO_AVG_METRICS:
            if key in picked:
                raise ValueError(f"micro_avg: {row.task}/{row.metric} appears twice")
            picked[key] = row.value
    if not picked:
        names = ", ".join(sorted({task for task, _ in MICRO_AVG_METRICS}))
        raise AdaptationInputError(f"micro_avg needs at least one of the tasks {names}")
    return ScoreRow("micro_avg", "mean", sum(picked.values()) / len(picked), len(picked))
