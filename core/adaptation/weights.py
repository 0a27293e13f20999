"""Typed access to a causal LM's vocabulary matrices (transformers types them as modules or tensors)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


def input_rows(model: PreTrainedModel) -> torch.Tensor:
    """The input embedding matrix, rows: [V, d]."""
    weight = model.get_input_embeddings().weight
    assert isinstance(weight, torch.Tensor)
    return weight


def output_rows(model: PreTrainedModel) -> torch.Tensor | None:
    """The LM head matrix, rows: [V, d] (the input matrix itself when tied); None for a model without a head."""
    head = model.get_output_embeddings()
    if head is None:
        return None
    weight = head.weight
    assert isinstance(weight, torch.Tensor)
    return weight
