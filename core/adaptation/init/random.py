"""`random` (baseline): new rows drawn from N(mu, Sigma), the mean and covariance of the old rows."""

from __future__ import annotations

import torch

from langadapt.core.adaptation.init.base import InitContext

_JITTER = 1e-6  # keeps the Cholesky factor defined when the covariance is rank-deficient


def random_init(ctx: InitContext, new_ids: torch.Tensor) -> torch.Tensor:
    rows = ctx.old_rows.detach().to(torch.float64)
    mean = rows.mean(dim=0)
    centered = rows - mean
    cov = centered.T @ centered / max(len(rows) - 1, 1)
    scale = cov.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(len(cov), dtype=torch.float64, device=rows.device)
    factor = torch.linalg.cholesky(cov + _JITTER * scale * eye)
    # Drawn on the CPU generator wherever the rows are: the same seed gives the same rows on every device.
    noise = torch.randn(len(new_ids), len(mean), generator=ctx.generator, dtype=torch.float64).to(rows.device)
    return mean + noise @ factor.T
