"""Training stages of language adaptation: continued pretraining (CPT) on the target-language corpus."""

from langadapt.core.adaptation.train.cpt import (
    LORA_TARGETS,
    TRAINABLE,
    CPTConfig,
    CPTResult,
    ProgressCallback,
    apply_trainable,
    latest_checkpoint,
    run_cpt,
    trainable_parameters,
)
from langadapt.core.adaptation.train.packing import DataPosition, PackedBlocks

__all__ = [
    "LORA_TARGETS",
    "TRAINABLE",
    "CPTConfig",
    "CPTResult",
    "DataPosition",
    "PackedBlocks",
    "ProgressCallback",
    "apply_trainable",
    "latest_checkpoint",
    "run_cpt",
    "trainable_parameters",
]
