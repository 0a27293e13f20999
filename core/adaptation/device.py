"""Where models run: the one place that picks the device and the dtypes, so that on a GPU worker nothing heavy runs
on the CPU by accident (training, propagation, initialisation, generation and evaluation all ask here)."""

from __future__ import annotations

import torch


def compute_device() -> torch.device:
    """The current CUDA device when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def inference_dtype(device: torch.device) -> torch.dtype:
    """bf16 for forward-only work on a GPU that supports it (half the memory and bandwidth of float32, the dtype
    such models are trained in); float32 elsewhere (CPUs are slow and inexact in bf16)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32
