"""Where models run: one place picks the device and the dtype, and every stage that runs a model asks it."""

from __future__ import annotations

import torch

from langadapt.core.adaptation import device as device_module
from langadapt.core.adaptation.device import compute_device, inference_dtype


def test_cuda_when_present_with_bf16_for_inference(monkeypatch) -> None:
    assert compute_device() == torch.device("cpu") and inference_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setattr(device_module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(device_module.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(device_module.torch.cuda, "is_bf16_supported", lambda: True)
    assert compute_device() == torch.device("cuda", 0)
    assert inference_dtype(torch.device("cuda", 0)) == torch.bfloat16
