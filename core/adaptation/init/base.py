"""The contract every initialisation method follows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from langadapt.core.adaptation.config import InitConfig
from langadapt.core.adaptation.init.auxiliary import AuxiliarySpace
from langadapt.core.adaptation.mapping import VocabMapping
from langadapt.core.adaptation.tokens import Vocabulary


@dataclass(frozen=True)
class InitContext:
    """What an init method may look at. `old_rows`: [V_old, d], one matrix (input embeddings or output head).
    `auxiliary`: the new vocabulary's auxiliary space, present for the methods that need one."""

    old_rows: torch.Tensor
    mapping: VocabMapping
    old_vocab: Vocabulary
    new_vocab: Vocabulary
    generator: torch.Generator
    config: InitConfig
    auxiliary: AuxiliarySpace | None = None


class InitFn(Protocol):
    def __call__(self, ctx: InitContext, new_ids: torch.Tensor) -> torch.Tensor:
        """Rows for `new_ids` ([n] new-vocabulary ids): a float64 tensor [n, d]."""
        ...
