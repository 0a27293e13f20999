"""New-token initialisation methods: one function each, same signature (`InitFn`), picked by name.

An init function returns rows for the *new* tokens only (those with no counterpart in the old vocabulary);
overlapping tokens always copy their old rows exactly (see `core.adaptation.surgery`). `focus`, `omp` and
`regression` read the auxiliary space (`auxiliary.py`) through their shared driver (`anchored.py`).
"""

from __future__ import annotations

from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.core.adaptation.init.base import InitContext, InitFn
from langadapt.core.adaptation.init.focus import focus_init
from langadapt.core.adaptation.init.mean import mean_init
from langadapt.core.adaptation.init.omp import omp_init
from langadapt.core.adaptation.init.random import random_init
from langadapt.core.adaptation.init.regression import regression_init

INIT_METHODS: dict[str, InitFn] = {
    "mean": mean_init,
    "random": random_init,
    "focus": focus_init,
    "omp": omp_init,
    "regression": regression_init,
}


def get_init(name: str) -> InitFn:
    if name not in INIT_METHODS:
        raise AdaptationInputError(f"unknown init method '{name}' (choose from {', '.join(INIT_METHODS)})")
    return INIT_METHODS[name]


__all__ = ["INIT_METHODS", "InitContext", "InitFn", "get_init"]
