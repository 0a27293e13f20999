"""What the CPT and SFT loops share: the trainable set (LoRA via peft), fp32 master weights, AdamW, the learning-rate
schedule, precision and device placement, and putting the caller's model back as it came."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import PreTrainedModel

from langadapt.core.adaptation.config import TrainingConfig
from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.core.adaptation.train.distributed import local, local_rows
from langadapt.core.adaptation.weights import input_rows, output_rows

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def apply_trainable(
    model: PreTrainedModel, trainable: str, config: TrainingConfig, *, lora_layers: Sequence[int] | None = None
) -> nn.Module:
    """Set `requires_grad` for `trainable` (in place); returns the module to train: `model` itself, or for
    `lora+head` a peft model wrapping it (LoRA layers injected into `model`, on `lora_layers` or every layer).

    `embeddings`: the input embeddings only (in a tied model also the head); `embeddings+head`: both;
    `lora+head`: LoRA adapters on the attention and MLP projections plus embeddings and head; `full`: everything.
    """
    if trainable == "full":
        model.requires_grad_(True)
        return model
    module: nn.Module = model
    if trainable == "lora+head":
        module = _add_lora(model, config, lora_layers)
    else:
        model.requires_grad_(False)
    model.get_input_embeddings().weight.requires_grad_(True)
    head = model.get_output_embeddings()
    if trainable != "embeddings" and head is not None:
        head.weight.requires_grad_(True)
    return module


def _add_lora(model: PreTrainedModel, config: TrainingConfig, layers: Sequence[int] | None) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(LORA_TARGETS),
        layers_to_transform=None if layers is None else list(layers),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:  # no target module in this architecture (or in those layers)
        raise AdaptationInputError(f"cannot add LoRA adapters to this model: {exc}") from exc


def release_lora(module: nn.Module, model: PreTrainedModel, *, merge: bool) -> None:
    """Take the LoRA layers out of `model`: merged into its weights, or dropped (the base weights untouched)."""
    if module is model:
        return
    if merge:
        module.merge_and_unload()  # type: ignore[operator]
    else:
        module.unload()  # type: ignore[operator]


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> parameter of the trainable parameters, each once (a tied matrix under its first name)."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def fp32_masters(params: dict[str, nn.Parameter]) -> None:
    """Hold trained weights in float32 whatever the model's dtype: bf16 would round small AdamW updates away."""
    for p in params.values():
        p.data = p.data.float()


def adamw(
    params: dict[str, nn.Parameter], config: TrainingConfig, *, model: PreTrainedModel, fused: bool
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms and biases), one parameter group per role
    (`embeddings`, `head`, `layers`) and decay, each at `lr x lr_scale[role]`. Each group records its `lr_scale`."""
    embeddings, head = input_rows(model), output_rows(model)
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for p in params.values():
        role = "embeddings" if p is embeddings else "head" if p is head else "layers"
        groups.setdefault((role, p.ndim >= 2), []).append(p)
    scales = config.lr_scale.model_dump()
    param_groups = [
        {
            "params": members,
            "weight_decay": config.weight_decay if decayed else 0.0,
            "lr": config.lr * scales[role],
            "lr_scale": scales[role],
        }
        for (role, decayed), members in groups.items()
    ]
    return torch.optim.AdamW(param_groups, lr=config.lr, betas=config.betas, eps=config.eps, fused=fused or None)


def base_lr(optimizer: torch.optim.Optimizer) -> float:
    """The scheduled learning rate before the per-group scales (what progress reports show)."""
    group = optimizer.param_groups[0]
    return float(group["lr"]) / float(group["lr_scale"])


class FrozenRows:
    """Keeps some rows of trained vocabulary matrices exactly as they are: their gradients are zeroed before
    clipping (so they neither move nor weigh in the gradient norm) and their values are written back after every
    optimizer step (AdamW's decoupled weight decay would otherwise shrink them).

    `keep` marks the kept rows of the whole matrix; a matrix sharded over processes (FSDP2) keeps those of its
    rows this process holds."""

    @torch.no_grad()
    def __init__(self, matrices: list[nn.Parameter], keep: torch.Tensor) -> None:
        self._kept = []
        for m in matrices:
            rows = keep[local_rows(m)].nonzero().flatten().to(m.device)
            self._kept.append((m, rows, local(m)[rows].clone()))

    @torch.no_grad()
    def zero_grads(self) -> None:
        for matrix, rows, _ in self._kept:
            if matrix.grad is not None:
                local(matrix.grad).index_fill_(0, rows, 0.0)

    @torch.no_grad()
    def restore(self) -> None:
        for matrix, rows, values in self._kept:
            local(matrix).index_copy_(0, rows, values)


def frozen_old_rows(model: PreTrainedModel, new_rows: Sequence[int]) -> FrozenRows:
    """`FrozenRows` for every row not in `new_rows` of the trainable input and output matrices (one when tied)."""
    embeddings, head = input_rows(model), output_rows(model)
    matrices = [m for m in (embeddings, head) if m is not None and m.requires_grad]
    matrices = list({id(m): m for m in matrices}.values())  # a tied head is the embedding matrix
    keep = torch.ones(embeddings.shape[0], dtype=torch.bool)
    keep[torch.tensor(list(new_rows), dtype=torch.long)] = False
    return FrozenRows([m for m in matrices if isinstance(m, nn.Parameter)], keep)


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warmup, then cosine decay."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_schedule(
    optimizer: torch.optim.Optimizer, config: TrainingConfig, *, warmup_steps: int, total_steps: int
) -> LambdaLR:
    factor = partial(lr_factor, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=config.min_lr_ratio)
    return LambdaLR(optimizer, factor)


@dataclass(frozen=True)
class OriginalState:
    """What training changes on the caller's model besides the trained values, to put back at the end."""

    dtypes: dict[str, torch.dtype]
    requires_grad: dict[str, bool]
    device: torch.device
    training: bool
    parked: dict[str, torch.Tensor] = field(default_factory=dict)  # frozen originals held on the host (see below)

    @classmethod
    def capture(cls, model: nn.Module) -> OriginalState:
        named = dict(model.named_parameters())
        return cls(
            dtypes={n: p.dtype for n, p in named.items()},
            requires_grad={n: p.requires_grad for n, p in named.items()},
            device=next(model.parameters()).device,
            training=model.training,
        )

    def park_frozen_in_bf16(self, model: nn.Module) -> None:
        """Hold the frozen float32 weights of `model` in bf16 on its device: no float32 copy in GPU memory and no
        autocast cast per step. Their float32 values wait on the host and come back bit-identical in `restore`.
        Only for trainable sets without LoRA (LoRA merges into frozen weights, which must then stay as they are)."""
        for name, p in model.named_parameters():
            if not p.requires_grad and p.dtype == torch.float32:
                self.parked[name] = p.data.to("cpu", copy=True)
                p.data = p.data.to(torch.bfloat16)

    def restore(self, model: nn.Module) -> None:
        model.to(self.device)
        for name, p in model.named_parameters():
            p.grad = None
            if name in self.parked:
                p.data = self.parked.pop(name).to(self.device)
            elif name in self.dtypes and p.dtype != self.dtypes[name]:
                p.data = p.data.to(self.dtypes[name])
            p.requires_grad_(self.requires_grad.get(name, True))
        model.train(self.training)


@dataclass(frozen=True)
class Precision:
    """How a loop computes on `device`: bf16 autocast over fp32 trained weights on a bf16 GPU, plain fp32 else."""

    device: torch.device
    bf16: bool

    def autocast(self) -> AbstractContextManager[None]:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)


def prepare_for_training(
    model: PreTrainedModel, device: torch.device, *, place: bool = True
) -> tuple[OriginalState, Precision]:
    """Capture the caller's model state, then place the model for training on `device` (`place=False`: leave it
    where it is, for FSDP2, which moves each unit's shards to the device as it shards it).

    On CUDA: TF32 matmuls and bf16 autocast (after `apply_trainable`, `OriginalState.park_frozen_in_bf16` holds the
    frozen weights in bf16). Elsewhere the model runs in float32 (no autocast: one dtype for every matmul).
    """
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    precision = Precision(device=device, bf16=cuda and torch.cuda.is_bf16_supported())
    original = OriginalState.capture(model)
    try:
        if not precision.bf16:
            model.float()
        if place:
            model.to(device)  # type: ignore[arg-type]  # transformers wraps `to`; mypy reads the wrapper's signature
    except BaseException:
        original.restore(model)
        raise
    return original, precision


ProgressCallback = Callable[[dict[str, object]], None]
