"""`focus` (Dobler & de Melo 2023): a new token's row is a combination of anchor rows, weighted by sparsemax over
the cosine similarities of its auxiliary vector to its `neighbours` nearest anchors."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from langadapt.core.adaptation.config import InitConfig
from langadapt.core.adaptation.init.anchored import QUERY_CHUNK, anchored_rows, combine
from langadapt.core.adaptation.init.base import InitContext


def sparsemax(scores: torch.Tensor) -> torch.Tensor:
    """Sparsemax over the last dimension (Martins & Astudillo 2016): the Euclidean projection onto the simplex."""
    ranked, _ = scores.sort(dim=-1, descending=True)
    cumulative = ranked.cumsum(dim=-1)
    k = torch.arange(1, scores.shape[-1] + 1, device=scores.device, dtype=scores.dtype)
    support = (1 + k * ranked > cumulative).sum(dim=-1, keepdim=True)
    threshold = (cumulative.gather(-1, support - 1) - 1) / support.to(scores.dtype)
    return (scores - threshold).clamp_min(0)


def focus_solve(queries: torch.Tensor, anchors: torch.Tensor, rows: torch.Tensor, config: InitConfig) -> torch.Tensor:
    directions = F.normalize(anchors, dim=1)
    result = []
    for chunk in F.normalize(queries, dim=1).split(QUERY_CHUNK):
        nearest, index = (chunk @ directions.T).topk(min(config.neighbours, len(anchors)), dim=1)
        result.append(combine(index, sparsemax(nearest), rows))
    return torch.cat(result)


def focus_init(ctx: InitContext, new_ids: torch.Tensor) -> torch.Tensor:
    return anchored_rows(ctx, new_ids, focus_solve)
