"""Continued pretraining (CPT) on a target-language corpus: the training stage of language adaptation.

One accelerate loop for the CPU, one GPU and several GPUs (`accelerate launch`, plain DDP), readable top to
bottom: `CPTConfig` (the paper's defaults), `apply_trainable` (what learns), `run_cpt` (the loop), checkpoints.

What learns (`trainable`):
- `embeddings`: the input embedding matrix only (in a tied model that matrix is the head as well).
- `embeddings+head`: input embeddings and LM head, every transformer layer frozen: the LEP authors' default
  (for a tied model the one shared matrix).
- `lora+head`: LoRA adapters (peft) on the q, k, v, o, gate, up and down projections, plus embeddings and head.
  The adapter is also saved on its own (`lora/`) so that propagation can merge it into the instruct model with a
  scale; `model/` is the base with the adapter merged.
- `full`: every parameter.

Batches are packed blocks of the streamed corpus (`packing.py`); the global batch is
`micro_batch_size x grad_accum_steps x processes` sequences of `seq_len` tokens. Every `checkpoint_every` steps
(and at the end, and on cancellation) a checkpoint holds the model delta (trainable parameters only), optimizer,
scheduler, data position, RNG states and step, so `run_cpt(..., resume=True)` continues exactly where it stopped:
N steps in one go and k steps + resume + N - k steps give the same weights.

Speed (the loop has to beat the Hugging Face `Trainer`; `bench/cpt_throughput.py` measures it):
- no host sync per micro-step: the loss is summed on the device and read every `log_every` steps only; the
  clipped gradient norm stays a device tensor; cancellation is a host-side poll (with several processes it is
  polled on log steps only, where the processes already sync, and broadcast). The `Trainer` syncs on every
  micro-step (its NaN filter on the loss).
- frozen parameters get `requires_grad=False`: autograd computes no weight gradient for them (for
  `embeddings+head` the backward pass through the layers computes activation gradients only) and AdamW holds
  state for the trainable ones only.
- CUDA: bf16 autocast over fp32 trainable weights, TF32 matmuls, fused AdamW, pinned batches copied with
  `non_blocking`, `use_cache=False` (no KV cache built in training). Frozen weights keep the dtype they were
  loaded in: load the model in bf16 on a GPU to halve their memory and skip autocast's per-step casts; the
  trainable ones are always held in fp32 and cast back at the end.
- tokenization and packing run in a background thread, a few micro-batches ahead.
- `compile=True` runs the model through `torch.compile` (off by default; fixed shapes, so one compilation; pays
  off on GPU runs longer than a few hundred steps).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast, set_seed
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from langadapt.core.adaptation.corpus import require_documents
from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.core.adaptation.fsutil import atomic_output_dir
from langadapt.core.adaptation.sources import save_pretrained
from langadapt.core.adaptation.surgery import check_tokenizer_matches
from langadapt.core.adaptation.train.packing import DataPosition, PackedBlocks, Prefetcher, eos_token_id, micro_batches

Trainable = Literal["embeddings", "embeddings+head", "lora+head", "full"]
TRAINABLE: tuple[Trainable, ...] = ("embeddings", "embeddings+head", "lora+head", "full")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

ProgressCallback = Callable[[dict[str, Any]], None]

# Fields that may change between a run and its resumption: they do not change what is computed.
_RESUMABLE_CHANGES = {"checkpoint_every", "keep_checkpoints", "log_every", "compile"}


@dataclass(frozen=True)
class CPTConfig:
    """Hyper-parameters of a CPT run; the defaults are the LEP paper's (arXiv 2412.21140).

    Give exactly one of `steps` (optimizer steps) and `max_tokens` (a token budget, rounded up to whole steps).
    `lr` 1e-4 is the paper's rate for Mistral-sized (32 K) vocabularies; it uses 2e-4 for LLaMa-3-sized (128 K)
    ones. The paper's global batch, 256 sequences of 1024 tokens, is `micro_batch_size x grad_accum_steps` on one
    GPU; with N GPUs divide `grad_accum_steps` by N to keep it.
    """

    trainable: str = "embeddings+head"
    steps: int | None = None
    max_tokens: int | None = None
    seq_len: int = 1024
    micro_batch_size: int = 8
    grad_accum_steps: int = 32
    lr: float = 1e-4
    min_lr_ratio: float = 0.0  # the cosine decays to lr x min_lr_ratio at the last step
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on matrices only, not on norms and biases
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # max global gradient norm; None: no clipping
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 1  # the last k checkpoints are kept
    log_every: int = 10  # progress reports (and the only host syncs of the loss) every N steps
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    compile: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        if self.trainable not in TRAINABLE:
            raise AdaptationInputError(f"unknown trainable set '{self.trainable}' (choose from {', '.join(TRAINABLE)})")
        if (self.steps is None) == (self.max_tokens is None):
            raise AdaptationInputError("give exactly one of steps and max_tokens")
        for name in ("steps", "max_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise AdaptationInputError(f"{name} must be positive, got {value}")
        if self.seq_len < 2:
            raise AdaptationInputError(f"seq_len must be at least 2, got {self.seq_len}")
        for name in ("micro_batch_size", "grad_accum_steps", "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise AdaptationInputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lora_r < 1 or self.lora_alpha <= 0:
            raise AdaptationInputError("lora_r and lora_alpha must be positive")
        if not self.lr > 0 or self.warmup_steps < 0 or self.weight_decay < 0 or self.eps <= 0:
            raise AdaptationInputError("lr and eps must be positive, warmup_steps and weight_decay not negative")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise AdaptationInputError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if not 0 <= self.min_lr_ratio <= 1 or not 0 <= self.lora_dropout < 1:
            raise AdaptationInputError("min_lr_ratio must be in [0, 1] and lora_dropout in [0, 1)")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise AdaptationInputError(f"grad_clip must be positive or None, got {self.grad_clip}")

    def tokens_per_step(self, num_processes: int = 1) -> int:
        return self.micro_batch_size * self.grad_accum_steps * num_processes * self.seq_len

    def total_steps(self, num_processes: int = 1) -> int:
        if self.steps is not None:
            return self.steps
        assert self.max_tokens is not None
        return math.ceil(self.max_tokens / self.tokens_per_step(num_processes))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AdaptationInputError(f"unknown CPT option(s): {', '.join(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class CPTResult:
    steps: int  # optimizer steps done, counting those before a resume
    total_steps: int
    tokens_seen: int  # tokens trained on, counting those before a resume
    final_loss: float | None  # mean loss over the last reported steps
    cancelled: bool  # stopped by `should_cancel` at step `steps` (a checkpoint of that step was written)
    seconds: float  # wall time of this call, saving included
    tokens_per_s: float  # training throughput of this call (tokens trained now / time in the loop)
    resumed_from: int  # the checkpoint step this call started from (0: a fresh run)
    model_dir: str | None  # the trained model (LoRA merged), when finished
    adapter_dir: str | None  # the LoRA adapter alone (lora+head), when finished
    checkpoint_dir: str | None  # the last checkpoint written


# ---- what learns ----


def apply_trainable(model: PreTrainedModel, config: CPTConfig) -> nn.Module:
    """Set `requires_grad` for `config.trainable` (in place); returns the module to train: `model` itself, or for
    `lora+head` a peft model wrapping it (LoRA layers injected into `model`)."""
    module: nn.Module = model
    if config.trainable == "lora+head":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(LORA_TARGETS),
            bias="none",
            task_type="CAUSAL_LM",
        )
        try:
            module = get_peft_model(model, lora)
        except ValueError as exc:  # no target module in this architecture
            raise AdaptationInputError(f"cannot add LoRA adapters to this model: {exc}") from exc
    else:
        model.requires_grad_(config.trainable == "full")
    if config.trainable != "full":
        model.get_input_embeddings().weight.requires_grad_(True)
        head = model.get_output_embeddings()
        if config.trainable != "embeddings" and head is not None:
            head.weight.requires_grad_(True)
    return module


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> parameter of the trainable parameters, each once (a tied matrix under its first name)."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warmup, then cosine decay."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _adamw(params: dict[str, nn.Parameter], config: CPTConfig, *, fused: bool) -> torch.optim.AdamW:
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=config.lr, betas=config.betas, eps=config.eps, fused=fused or None
    )


# ---- the run ----


@dataclass
class _TrainState:
    step: int = 0
    tokens_seen: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    loss: float | None = None


@dataclass(frozen=True)
class _Paths:
    root: str

    @property
    def checkpoints(self) -> str:
        return os.path.join(self.root, "checkpoints")

    @property
    def model(self) -> str:
        return os.path.join(self.root, "model")

    @property
    def adapter(self) -> str:
        return os.path.join(self.root, "lora")

    def checkpoint(self, step: int) -> str:
        return os.path.join(self.checkpoints, f"step-{step:08d}")


def run_cpt(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    corpus_path: str,
    config: CPTConfig,
    out_dir: str,
    *,
    resume: bool = False,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> CPTResult:
    """Continue pretraining `model` (in place) on `corpus_path` and save it to `out_dir/model`.

    `resume=True` continues from the last checkpoint in `out_dir` (a fresh start when there is none; without it a
    non-empty `out_dir` is an error). Pass the model as it was before the first run (loaded again): the
    checkpoint holds only the trainable parameters. `progress` gets `{step, total_steps, loss, lr, tokens_per_s,
    tokens_seen, grad_norm}` every `log_every` steps and at the end. `should_cancel()` is polled after every step;
    when it says True the run writes a checkpoint and returns with `cancelled=True`.

    Afterwards `model` holds the trained weights in their original dtypes and device (for `lora+head` the adapter
    merged in; after a cancellation it holds the unmerged partial state).
    """
    started = time.perf_counter()
    check_tokenizer_matches(model, tokenizer)
    eos_token_id(tokenizer)
    next(require_documents(corpus_path))  # a missing, empty or unreadable corpus fails now, not in a thread
    max_positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if max_positions is not None and config.seq_len > max_positions:
        raise AdaptationInputError(f"seq_len {config.seq_len} exceeds the model's {max_positions} positions")

    accelerator = _accelerator()
    device = accelerator.device
    cuda = device.type == "cuda"
    total_steps = config.total_steps(accelerator.num_processes)
    tokens_per_step = config.tokens_per_step(accelerator.num_processes)
    paths = _Paths(os.path.abspath(out_dir))
    checkpoint = _prepare_out_dir(paths, config, resume, accelerator)

    # Model, trainable set, optimizer. Seeded first: LoRA's initialisation draws random numbers.
    set_seed(config.seed)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    bf16 = cuda and torch.cuda.is_bf16_supported()
    original = OriginalState.capture(model)
    module: nn.Module = model
    try:
        if not bf16:
            model.float()  # no autocast: one dtype for every matmul (exact for fp16 / bf16 weights)
        model.to(device)
        module = apply_trainable(model, config)
        params = trainable_parameters(module)
        for p in params.values():
            p.data = p.data.float()  # fp32 master weights: bf16 would round small AdamW updates away
        optimizer = _adamw(params, config, fused=cuda)
        schedule = partial(
            lr_factor, warmup_steps=config.warmup_steps, total_steps=total_steps, min_lr_ratio=config.min_lr_ratio
        )
        scheduler = LambdaLR(optimizer, schedule)
        state = _TrainState()
        if checkpoint is not None:
            state = _load_checkpoint(checkpoint, config, params, optimizer, scheduler, accelerator)
        resumed_from = state.step
        ddp_module = accelerator.prepare(module)  # device placement; DistributedDataParallel with several processes
        forward = torch.compile(ddp_module) if config.compile else ddp_module

        blocks = PackedBlocks(tokenizer, corpus_path, config.seq_len, start=state.position)
        batches = micro_batches(
            blocks,
            config.micro_batch_size,
            num_processes=accelerator.num_processes,
            process_index=accelerator.process_index,
            pin_memory=cuda,
        )
        autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=bf16)
        accum = config.grad_accum_steps
        loss_sum = torch.zeros((), device=device)
        grad_norm: torch.Tensor | None = None
        steps_since_log = 0
        cancelled = False
        checkpoint_dir = checkpoint
        module.train()
        loop_started = last_log = time.perf_counter()

        with Prefetcher(batches) as prefetched:
            while state.step < total_steps and not cancelled:
                # One optimizer step: `accum` micro-batches, gradients all-reduced on the last one only.
                for micro in range(accum):
                    input_ids, position = next(prefetched)
                    input_ids = input_ids.to(device, non_blocking=True)
                    sync = nullcontext() if micro == accum - 1 else accelerator.no_sync(ddp_module)
                    with sync:
                        with autocast():
                            loss = forward(input_ids=input_ids, labels=input_ids, use_cache=False).loss
                        accelerator.backward(loss / accum)
                    loss_sum += loss.detach()
                if config.grad_clip is not None:
                    grad_norm = accelerator.clip_grad_norm_(list(params.values()), config.grad_clip)
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.tokens_seen += tokens_per_step
                state.position = position
                steps_since_log += 1

                done = state.step == total_steps
                cancelled = not done and _cancel_requested(should_cancel, state.step, config, accelerator)
                if cancelled or done or state.step % config.log_every == 0:
                    # The only host syncs of the loop.
                    state.loss = accelerator.reduce(loss_sum, "mean").item() / (steps_since_log * accum)
                    now = time.perf_counter()
                    report = {
                        "step": state.step,
                        "total_steps": total_steps,
                        "loss": state.loss,
                        "lr": lr,
                        "tokens_per_s": steps_since_log * tokens_per_step / max(now - last_log, 1e-9),
                        "tokens_seen": state.tokens_seen,
                        "grad_norm": None if grad_norm is None else float(grad_norm),
                    }
                    if progress is not None and accelerator.is_main_process:
                        progress(report)
                    loss_sum.zero_()
                    steps_since_log = 0
                    last_log = time.perf_counter()
                if cancelled or done or state.step % config.checkpoint_every == 0:
                    checkpoint_dir = _save_checkpoint(
                        paths, config, state, total_steps, params, optimizer, scheduler, accelerator
                    )
        loop_seconds = time.perf_counter() - loop_started
        trained_tokens = (state.step - resumed_from) * tokens_per_step

        model_dir = adapter_dir = None
        if cancelled:
            if module is not model:
                module.unload()  # type: ignore[operator]  # drop the LoRA layers; the base weights are untouched
            original.restore(model)
        else:
            model_dir, adapter_dir = _save_final(model, module, tokenizer, paths, original, accelerator)
        result = CPTResult(
            steps=state.step,
            total_steps=total_steps,
            tokens_seen=state.tokens_seen,
            final_loss=state.loss,
            cancelled=cancelled,
            seconds=time.perf_counter() - started,
            tokens_per_s=trained_tokens / loop_seconds if trained_tokens else 0.0,
            resumed_from=resumed_from,
            model_dir=model_dir,
            adapter_dir=adapter_dir,
            checkpoint_dir=checkpoint_dir,
        )
        if accelerator.is_main_process:
            _write_json(os.path.join(paths.root, "result.json"), asdict(result))
        return result
    except BaseException:
        # Leave the caller's model as it came (values aside): no LoRA layers, its dtypes, device and flags.
        if module is not model:
            module.unload()  # type: ignore[operator]
        original.restore(model)
        raise


def _accelerator() -> Accelerator:
    """An `Accelerator` without mixed precision: the loop's autocast is explicit, not a patched `forward`.

    accelerate keeps one process-wide state, and whatever ran before in this process (a `Trainer`, a run with
    other settings) may have set another precision, which `Accelerator` refuses to change; like the `Trainer`, start
    from a clean state (the distributed setup, `PartialState`, is kept).
    """
    AcceleratorState._reset_state()
    return Accelerator(mixed_precision="no")


def _cancel_requested(
    should_cancel: Callable[[], bool] | None, step: int, config: CPTConfig, accelerator: Accelerator
) -> bool:
    """Poll `should_cancel`: every step in one process; with several, on log steps on the main process, broadcast
    (a collective every step would sync the host with the GPUs every step)."""
    if should_cancel is None:
        return False
    if accelerator.num_processes == 1:
        return bool(should_cancel())
    if step % config.log_every:
        return False
    flag = torch.tensor([int(bool(should_cancel())) if accelerator.is_main_process else 0], device=accelerator.device)
    return bool(broadcast(flag).item())


@dataclass(frozen=True)
class OriginalState:
    """What `run_cpt` changes on the caller's model besides the trained values, to put back at the end."""

    dtypes: dict[str, torch.dtype]
    requires_grad: dict[str, bool]
    device: torch.device
    training: bool

    @classmethod
    def capture(cls, model: nn.Module) -> OriginalState:
        named = dict(model.named_parameters())
        return cls(
            dtypes={n: p.dtype for n, p in named.items()},
            requires_grad={n: p.requires_grad for n, p in named.items()},
            device=next(model.parameters()).device,
            training=model.training,
        )

    def restore(self, model: nn.Module) -> None:
        model.to(self.device)
        for name, p in model.named_parameters():
            p.grad = None
            if name in self.dtypes and p.dtype != self.dtypes[name]:
                p.data = p.data.to(self.dtypes[name])
            p.requires_grad_(self.requires_grad.get(name, True))
        model.train(self.training)


def _save_final(
    model: PreTrainedModel,
    module: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    paths: _Paths,
    original: OriginalState,
    accelerator: Accelerator,
) -> tuple[str, str | None]:
    """Write `model/` (and `lora/` for lora+head: the adapter alone, before merging it into `model`)."""
    adapter_dir = None
    if module is not model:
        adapter_dir = paths.adapter
        if accelerator.is_main_process:
            with atomic_output_dir(adapter_dir, overwrite=True) as tmp:
                module.save_pretrained(tmp, save_embedding_layers=False)  # type: ignore[operator]
        module.merge_and_unload()  # type: ignore[operator]  # merges into `model`'s own layers
    original.restore(model)
    if accelerator.is_main_process:
        shutil.rmtree(paths.model, ignore_errors=True)  # a resumed run that had already finished
        save_pretrained(model, tokenizer, paths.model)
    accelerator.wait_for_everyone()
    return paths.model, adapter_dir


# ---- checkpoints ----
#
# out_dir/cpt_config.json                     the config of the run (written when it starts)
# out_dir/checkpoints/step-00000500/          one per checkpoint, the last `keep_checkpoints` kept
#     trainable.safetensors                   the model delta: the trainable parameters by name (fp32)
#     optimizer.pt, scheduler.pt              AdamW and LambdaLR state dicts
#     rng-<process>.pt                        python / numpy / torch / CUDA RNG states of each process
#     state.json                              step, tokens, data position, loss, config, parameter names
# out_dir/model/, out_dir/lora/, out_dir/result.json   at the end
#
# A checkpoint is written into `checkpoints/.tmp-step-...` and renamed into place when complete.

_CHECKPOINT = re.compile(r"step-(\d{8})")
CONFIG_FILE = "cpt_config.json"


def latest_checkpoint(out_dir: str) -> str | None:
    """The newest complete checkpoint directory under `out_dir`, or None."""
    root = _Paths(os.path.abspath(out_dir)).checkpoints
    if not os.path.isdir(root):
        return None
    steps = [int(m.group(1)) for name in os.listdir(root) if (m := _CHECKPOINT.fullmatch(name))]
    return os.path.join(root, f"step-{max(steps):08d}") if steps else None


def _prepare_out_dir(paths: _Paths, config: CPTConfig, resume: bool, accelerator: Accelerator) -> str | None:
    """Check `out_dir` against `resume`; returns the checkpoint to resume from, if any."""
    checkpoint = latest_checkpoint(paths.root) if resume else None
    if not resume and os.path.isdir(paths.root) and os.listdir(paths.root):
        raise AdaptationInputError(f"output directory is not empty (pass resume to continue it): {paths.root}")
    accelerator.wait_for_everyone()  # every process has looked before the main one writes
    if accelerator.is_main_process:
        os.makedirs(paths.checkpoints, exist_ok=True)
        _write_json(os.path.join(paths.root, CONFIG_FILE), config.to_dict())
    accelerator.wait_for_everyone()
    return checkpoint


def _save_checkpoint(
    paths: _Paths,
    config: CPTConfig,
    state: _TrainState,
    total_steps: int,
    params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    accelerator: Accelerator,
) -> str:
    final = paths.checkpoint(state.step)
    tmp = os.path.join(paths.checkpoints, f".tmp-{os.path.basename(final)}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), os.path.join(tmp, f"rng-{accelerator.process_index}.pt"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tensors = {name: p.detach().to("cpu", copy=True).contiguous() for name, p in params.items()}
        save_file(tensors, os.path.join(tmp, "trainable.safetensors"), metadata={"format": "pt"})
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        meta = {
            "step": state.step,
            "total_steps": total_steps,
            "tokens_seen": state.tokens_seen,
            "position": state.position.to_dict(),
            "loss": state.loss,
            "num_processes": accelerator.num_processes,
            "config": config.to_dict(),
            "trainable": list(params),
        }
        _write_json(os.path.join(tmp, "state.json"), meta)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        kept = sorted(int(m.group(1)) for n in os.listdir(paths.checkpoints) if (m := _CHECKPOINT.fullmatch(n)))
        for step in kept[: -config.keep_checkpoints]:
            shutil.rmtree(paths.checkpoint(step), ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _load_checkpoint(
    path: str,
    config: CPTConfig,
    params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    accelerator: Accelerator,
) -> _TrainState:
    with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
        meta = json.load(f)
    saved = CPTConfig.from_dict(meta["config"])
    changed = sorted(
        name
        for name in config.to_dict()
        if name not in _RESUMABLE_CHANGES and getattr(saved, name) != getattr(config, name)
    )
    if changed:
        raise AdaptationInputError(f"cannot resume {path}: the config differs in {', '.join(changed)}")
    if meta["num_processes"] != accelerator.num_processes:
        raise AdaptationInputError(
            f"cannot resume {path}: it ran on {meta['num_processes']} processes, "
            f"this run has {accelerator.num_processes}"
        )
    if meta["trainable"] != list(params):
        raise AdaptationInputError(f"cannot resume {path}: its trainable parameters are not this model's")
    delta = load_file(os.path.join(path, "trainable.safetensors"))
    with torch.no_grad():
        for name, p in params.items():
            if delta[name].shape != p.shape:
                raise AdaptationInputError(f"cannot resume {path}: {name} has shape {tuple(delta[name].shape)}")
            p.copy_(delta[name])
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), map_location="cpu", weights_only=True))
    rng_path = os.path.join(path, f"rng-{accelerator.process_index}.pt")
    if os.path.isfile(rng_path):
        _set_rng_state(torch.load(rng_path, weights_only=True))
    return _TrainState(
        step=meta["step"],
        tokens_seen=meta["tokens_seen"],
        position=DataPosition.from_dict(meta["position"]),
        loss=meta["loss"],
    )


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_json(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


__all__ = [
    "LORA_TARGETS",
    "TRAINABLE",
    "CPTConfig",
    "CPTResult",
    "ProgressCallback",
    "apply_trainable",
    "latest_checkpoint",
    "lr_factor",
    "run_cpt",
    "trainable_parameters",
]
