"""What focus, omp and regression share: new rows built from *anchors*, tokens that have both a row in the model
and a trained vector in the auxiliary space.

Anchors are the overlapping tokens the corpus shows at least `auxiliary.min_count` times. With `grow_anchors` the
new tokens are initialised in groups of increasing byte length and each group joins the anchors of the next, so a
long Russian token is built from the shorter Russian tokens it resembles, not only from the few old tokens that
occur in Russian text (mostly Latin letters and punctuation). A new token the corpus does not show keeps its `mean`
row. Then `mean_weight` blends the mean row in, and `head_norm="cap"` shortens any row longer than its mean row: in
a tied model (and in the head) a longer row means larger logits, so a new token would take probability in
source-language contexts that its averaged pieces never had.

A `Solver` maps (query vectors [n, k], anchor vectors [m, k], anchor rows [m, d], config) to rows [n, d] float64.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from langadapt.core.adaptation.config import InitConfig
from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.core.adaptation.init.base import InitContext

Solver = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, InitConfig], torch.Tensor]

MIN_ANCHORS = 20
QUERY_CHUNK = 256  # queries a solver handles at once: bounds its [chunk, anchors] similarity matrices


def combine(index: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Σ_j weights[:, j] · rows[index[:, j]]: [n, d] float64, one term at a time (never an [n, terms, d] tensor)."""
    result = torch.zeros(len(index), rows.shape[1], dtype=torch.float64, device=rows.device)
    for term in range(index.shape[1]):
        result += weights[:, term : term + 1].to(torch.float64) * rows[index[:, term]]
    return result


def anchored_rows(ctx: InitContext, new_ids: torch.Tensor, solve: Solver) -> torch.Tensor:
    """Rows [n, d] float64 for `new_ids`. Memory: the mean rows (which become the result, blended in place) and one
    pool of anchor rows in the model's dtype, preallocated for the overlapping tokens and the new ones that join."""
    if ctx.auxiliary is None:
        raise AdaptationInputError(f"init method '{ctx.config.method}' needs a corpus for its auxiliary space")
    config, device = ctx.config, ctx.old_rows.device
    result = ctx.mapping.mean_rows(ctx.old_rows, new_ids.tolist())
    vectors = torch.from_numpy(ctx.auxiliary.vectors).to(device=device, dtype=torch.float32)
    seen = torch.from_numpy(ctx.auxiliary.counts >= config.auxiliary.min_count).to(device)

    overlap_new, overlap_old = (index.to(device) for index in ctx.mapping.overlap_index())
    usable = seen[overlap_new]
    anchors = int(usable.sum())
    if anchors < MIN_ANCHORS:
        raise AdaptationInputError(
            f"only {anchors} overlapping tokens occur at least {config.auxiliary.min_count} times in the "
            f"corpus: init method '{config.method}' needs {MIN_ANCHORS} to fit (use more text, or mean)",
            code="too_few_anchors",
        )

    new_ids = new_ids.to(device)
    solved = seen[new_ids]
    pool = anchors + (int(solved.sum()) if config.grow_anchors else 0)
    anchor_vectors = torch.empty(pool, vectors.shape[1], dtype=vectors.dtype, device=device)
    anchor_rows = torch.empty(pool, ctx.old_rows.shape[1], dtype=ctx.old_rows.dtype, device=device)
    anchor_vectors[:anchors] = vectors[overlap_new[usable]]
    anchor_rows[:anchors] = ctx.old_rows[overlap_old[usable]]

    lengths = torch.tensor([len(key.value) if key else 0 for key in ctx.new_vocab.keys], device=device)[new_ids]
    groups = lengths[solved].unique().tolist() if config.grow_anchors else [None]
    for length in groups:
        positions = torch.nonzero(solved & (lengths == length if length is not None else solved)).flatten()
        queries = vectors[new_ids[positions]]
        rows = solve(queries, anchor_vectors[:anchors], anchor_rows[:anchors], config)
        if config.grow_anchors:
            anchor_vectors[anchors : anchors + len(rows)] = queries
            anchor_rows[anchors : anchors + len(rows)] = rows
            anchors += len(rows)
        mean = result[positions]
        rows.mul_(1 - config.mean_weight).add_(mean, alpha=config.mean_weight)
        if config.head_norm == "cap":
            norms = rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
            rows.mul_((mean.norm(dim=1, keepdim=True) / norms).clamp(max=1.0))
        result[positions] = rows
    return result
