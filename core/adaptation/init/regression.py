"""`regression` (SALT-style): a linear map from the auxiliary space to the model's rows, fitted by ridge least
squares on the anchors and applied to the new tokens. The ridge strength is the one of a fixed grid that predicts
a held-out tenth of the anchors best."""

from __future__ import annotations

import torch

from langadapt.core.adaptation.config import InitConfig
from langadapt.core.adaptation.init.anchored import anchored_rows
from langadapt.core.adaptation.init.base import InitContext

RIDGE_GRID = tuple(10.0**power for power in range(-4, 3))  # times the mean eigenvalue of the anchors' Gram matrix
HELDOUT_EVERY = 10  # every 10th anchor validates the ridge strength


def ridge_fit(inputs: torch.Tensor, targets: torch.Tensor, strength: float) -> tuple[torch.Tensor, ...]:
    """(input mean, map, target mean): targets ≈ (inputs - input mean) @ map + target mean."""
    in_mean, out_mean = inputs.mean(dim=0), targets.mean(dim=0)
    centered = inputs - in_mean
    gram = centered.T @ centered
    scale = gram.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    weights = torch.linalg.solve(gram + strength * scale * eye, centered.T @ (targets - out_mean))
    return in_mean, weights, out_mean


def regression_solve(
    queries: torch.Tensor, anchors: torch.Tensor, rows: torch.Tensor, config: InitConfig
) -> torch.Tensor:
    heldout = torch.zeros(len(anchors), dtype=torch.bool, device=anchors.device)
    heldout[::HELDOUT_EVERY] = True

    def error(strength: float) -> float:
        in_mean, weights, out_mean = ridge_fit(anchors[~heldout], rows[~heldout], strength)
        predicted = (anchors[heldout] - in_mean) @ weights + out_mean
        return float((predicted - rows[heldout]).pow(2).sum())

    best = min(RIDGE_GRID, key=error)
    in_mean, weights, out_mean = ridge_fit(anchors, rows, best)
    return (queries - in_mean) @ weights + out_mean


def regression_init(ctx: InitContext, new_ids: torch.Tensor) -> torch.Tensor:
    return anchored_rows(ctx, new_ids, regression_solve)
