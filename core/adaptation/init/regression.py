"""`regression` (SALT-style): a linear map from the auxiliary space to the model's rows, fitted by ridge least
squares on the anchors and applied to the new tokens. The ridge strength is the one of a fixed grid that predicts
a held-out tenth of the anchors best.

The fit reads the anchor rows once, in chunks, into sufficient statistics (sums and cross-products in float64), so
it never copies the [anchors, d] matrix: at LLaMa-3 scale that matrix alone is gigabytes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from langadapt.core.adaptation.config import InitConfig
from langadapt.core.adaptation.init.anchored import anchored_rows
from langadapt.core.adaptation.init.base import InitContext

RIDGE_GRID = tuple(10.0**power for power in range(-4, 3))  # times the mean eigenvalue of the anchors' Gram matrix
HELDOUT_EVERY = 10  # every 10th anchor validates the ridge strength
ROW_CHUNK = 8192


@dataclass(frozen=True)
class Moments:
    """Sufficient statistics of a least-squares fit of targets [n, d] on inputs [n, k]."""

    count: int
    input_sum: torch.Tensor  # [k]
    input_gram: torch.Tensor  # [k, k], Σ x xᵀ
    cross: torch.Tensor  # [k, d], Σ x yᵀ
    target_sum: torch.Tensor  # [d]

    @classmethod
    def of(cls, inputs: torch.Tensor, targets: torch.Tensor) -> Moments:
        x = inputs.to(torch.float64)
        cross = torch.zeros(x.shape[1], targets.shape[1], dtype=torch.float64, device=x.device)
        target_sum = torch.zeros(targets.shape[1], dtype=torch.float64, device=x.device)
        for start in range(0, len(x), ROW_CHUNK):
            y = targets[start : start + ROW_CHUNK].to(torch.float64)
            cross += x[start : start + ROW_CHUNK].T @ y
            target_sum += y.sum(dim=0)
        return cls(len(x), x.sum(dim=0), x.T @ x, cross, target_sum)

    def __sub__(self, other: Moments) -> Moments:
        return Moments(
            self.count - other.count,
            self.input_sum - other.input_sum,
            self.input_gram - other.input_gram,
            self.cross - other.cross,
            self.target_sum - other.target_sum,
        )


def ridge_fit(moments: Moments, strength: float) -> tuple[torch.Tensor, ...]:
    """(input mean, map, target mean): targets ≈ (inputs - input mean) @ map + target mean."""
    in_mean, out_mean = moments.input_sum / moments.count, moments.target_sum / moments.count
    gram = moments.input_gram - moments.count * torch.outer(in_mean, in_mean)  # of the centred inputs
    cross = moments.cross - torch.outer(in_mean, moments.target_sum)  # centred inputs against the targets
    scale = gram.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    weights = torch.linalg.solve(gram + strength * scale * eye, cross)
    return in_mean, weights, out_mean


def regression_solve(
    queries: torch.Tensor, anchors: torch.Tensor, rows: torch.Tensor, config: InitConfig
) -> torch.Tensor:
    heldout = torch.arange(0, len(anchors), HELDOUT_EVERY, device=anchors.device)
    held_inputs, held_rows = anchors[heldout].to(torch.float64), rows[heldout].to(torch.float64)
    everything = Moments.of(anchors, rows)
    training = everything - Moments.of(held_inputs, held_rows)

    def error(strength: float) -> float:
        in_mean, weights, out_mean = ridge_fit(training, strength)
        return float(((held_inputs - in_mean) @ weights + out_mean - held_rows).pow(2).sum())

    in_mean, weights, out_mean = ridge_fit(everything, min(RIDGE_GRID, key=error))
    return (queries.to(torch.float64) - in_mean) @ weights + out_mean


def regression_init(ctx: InitContext, new_ids: torch.Tensor) -> torch.Tensor:
    return anchored_rows(ctx, new_ids, regression_solve)
