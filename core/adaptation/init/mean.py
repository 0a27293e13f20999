"""`mean` (the LEP paper's choice): a new token's row is the mean of the old rows of the old tokenizer's
tokenisation of the token's decoded text, repeats counted. A token whose tokenisation is empty (a special token the
old vocabulary does not know, or an empty text) gets the mean of all old rows."""

from __future__ import annotations

import torch

from langadapt.core.adaptation.init.base import InitContext


def mean_init(ctx: InitContext, new_ids: torch.Tensor) -> torch.Tensor:
    return ctx.mapping.mean_rows(ctx.old_rows, new_ids.tolist())
