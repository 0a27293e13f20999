"""Continued pretraining (CPT) on a target-language corpus: the training stage of language adaptation.

One accelerate loop for the CPU, one GPU and several GPUs (`accelerate launch`, plain DDP), readable top to
bottom: `run_cpt` (the loop), then checkpoints. Settings: `config.CPTConfig`; what it shares with SFT (trainable
set, AdamW, schedule, precision): `common.py`.

What learns (`trainable`):
- `embeddings`: the input embedding matrix only (in a tied model that matrix is the head as well).
- `embeddings+head`: input embeddings and LM head, every transformer layer frozen: the LEP authors' default
  (for a tied model the one shared matrix).
- `lora+head`: LoRA adapters (peft) on the q, k, v, o, gate, up and down projections, plus embeddings and head.
  The adapter is also saved on its own (`lora/`) so that propagation can merge it into the instruct model with a
  scale; `model/` is the base with the adapter merged.
- `full`: every parameter.

Batches are packed blocks of the streamed corpus (`packing.py`); the global batch is
`batch_size x grad_accum x processes` sequences of `seq_len` tokens. Every `checkpoint_every` steps
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
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast, set_seed
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from langadapt.core.adaptation.config import CPTConfig
from langadapt.core.adaptation.corpus import require_documents
from langadapt.core.adaptation.errors import AdaptationInputError, TrainingDiverged
from langadapt.core.adaptation.fsutil import atomic_output_dir
from langadapt.core.adaptation.rundir import TrainingDir
from langadapt.core.adaptation.sources import save_pretrained
from langadapt.core.adaptation.surgery import check_tokenizer_matches
from langadapt.core.adaptation.train.common import (
    OriginalState,
    ProgressCallback,
    adamw,
    apply_trainable,
    base_lr,
    fp32_masters,
    frozen_old_rows,
    lr_schedule,
    prepare_for_training,
    release_lora,
    trainable_parameters,
)
from langadapt.core.adaptation.train.packing import (
    MixedBlocks,
    Prefetcher,
    StreamPosition,
    eos_token_id,
    micro_batches,
)

# Fields that may change between a run and its resumption: they do not change what is computed.
# (`source_corpus` is a path: a retry on another machine finds the same text elsewhere; the position checks it.)
_RESUMABLE_CHANGES = {"checkpoint_every", "keep_checkpoints", "log_every", "compile", "source_corpus"}


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


# ---- the run ----


@dataclass
class _TrainState:
    step: int = 0
    tokens_seen: int = 0
    position: StreamPosition = field(default_factory=StreamPosition)
    loss: float | None = None


def run_cpt(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    corpus_path: str,
    config: CPTConfig,
    out_dir: str,
    *,
    new_rows: Sequence[int] | None = None,
    resume: bool = False,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> CPTResult:
    """Continue pretraining `model` (in place) on `corpus_path` and save it to `out_dir/model`.

    With `config.train_rows == "new"`, only the rows `new_rows` (the tokens the source vocabulary lacks) of the
    embeddings and head learn; every other row ends bit-identical. With `config.source_mix`, that share of the
    blocks comes from `config.source_corpus` (`packing.MixedBlocks`).

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
    for text in (corpus_path, config.source_corpus):  # a missing, empty or unreadable corpus fails now
        if text is not None:
            next(require_documents(text))
    if config.train_rows == "new" and not new_rows:
        raise AdaptationInputError("cpt.train_rows 'new' needs the ids of the new tokens (none given)")
    max_positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if max_positions is not None and config.seq_len > max_positions:
        raise AdaptationInputError(f"seq_len {config.seq_len} exceeds the model's {max_positions} positions")

    accelerator = _accelerator()
    device = accelerator.device
    cuda = device.type == "cuda"
    total_steps = config.steps
    tokens_per_step = config.tokens_per_step(accelerator.num_processes)
    paths = TrainingDir(os.path.abspath(out_dir))
    checkpoint = _prepare_out_dir(paths, config, resume, accelerator)

    # Model, trainable set, optimizer. Seeded first: LoRA's initialisation draws random numbers.
    set_seed(config.seed)
    original, precision = prepare_for_training(model, device)
    module: nn.Module = model
    try:
        module = apply_trainable(model, config.trainable, config)
        params = trainable_parameters(module)
        fp32_masters(params)
        frozen = frozen_old_rows(model, new_rows) if config.train_rows == "new" and new_rows else None
        optimizer = adamw(params, config, model=model, fused=cuda)
        scheduler = lr_schedule(optimizer, config, warmup_steps=config.warmup_steps, total_steps=total_steps)
        state = _TrainState()
        if checkpoint is not None:
            state = _load_checkpoint(checkpoint, config, params, optimizer, scheduler, accelerator)
        resumed_from = state.step
        ddp_module = accelerator.prepare(module)  # device placement; DistributedDataParallel with several processes
        forward = torch.compile(ddp_module) if config.compile else ddp_module

        blocks = MixedBlocks(
            tokenizer,
            corpus_path,
            config.seq_len,
            source_path=config.source_corpus,
            mix=config.source_mix,
            start=state.position,
        )
        batches = micro_batches(
            blocks,
            config.batch_size,
            num_processes=accelerator.num_processes,
            process_index=accelerator.process_index,
            pin_memory=cuda,
        )
        accum = config.grad_accum
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
                        with precision.autocast():
                            loss = forward(input_ids=input_ids, labels=input_ids, use_cache=False).loss
                        accelerator.backward(loss / accum)
                    loss_sum += loss.detach()
                if frozen is not None:
                    frozen.zero_grads()
                if config.max_grad_norm is not None:
                    grad_norm = accelerator.clip_grad_norm_(list(params.values()), config.max_grad_norm)
                lr = base_lr(optimizer)
                optimizer.step()
                if frozen is not None:
                    frozen.restore()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.tokens_seen += tokens_per_step
                state.position = position
                steps_since_log += 1

                done = state.step == total_steps
                cancelled = not done and _cancel_requested(should_cancel, state.step, config, accelerator)
                checkpointing = cancelled or done or state.step % config.checkpoint_every == 0
                if cancelled or done or state.step % config.log_every == 0:
                    # The only host syncs of the loop.
                    state.loss = accelerator.reduce(loss_sum, "mean").item() / (steps_since_log * accum)
                    if not math.isfinite(state.loss):
                        raise TrainingDiverged("cpt", state.step, state.loss)
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
                elif checkpointing and not bool(torch.isfinite(accelerator.reduce(loss_sum, "sum"))):
                    raise TrainingDiverged("cpt", state.step, float("nan"))  # never checkpoint diverged weights
                if checkpointing:
                    checkpoint_dir = _save_checkpoint(
                        paths, config, state, total_steps, params, optimizer, scheduler, accelerator
                    )
        loop_seconds = time.perf_counter() - loop_started
        trained_tokens = (state.step - resumed_from) * tokens_per_step

        model_dir = adapter_dir = None
        if cancelled:
            release_lora(module, model, merge=False)
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
        release_lora(module, model, merge=False)
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


def _save_final(
    model: PreTrainedModel,
    module: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    paths: TrainingDir,
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
        release_lora(module, model, merge=True)  # merges into `model`'s own layers
    original.restore(model)
    if accelerator.is_main_process:
        shutil.rmtree(paths.model, ignore_errors=True)  # a resumed run that had already finished
        save_pretrained(model, tokenizer, paths.model)
    accelerator.wait_for_everyone()
    return paths.model, adapter_dir


# ---- checkpoints ----
#
# The layout of out_dir is `rundir.TrainingDir`. A checkpoint directory holds:
#     trainable.safetensors                   the model delta: the trainable parameters by name (fp32)
#     optimizer.pt, scheduler.pt              AdamW and LambdaLR state dicts
#     rng-<process>.pt                        python / numpy / torch / CUDA RNG states of each process
#     state.json                              step, tokens, data position, loss, config, parameter names


def latest_checkpoint(out_dir: str) -> str | None:
    """The newest complete checkpoint directory under `out_dir`, or None."""
    return TrainingDir(os.path.abspath(out_dir)).latest_checkpoint()


def _prepare_out_dir(paths: TrainingDir, config: CPTConfig, resume: bool, accelerator: Accelerator) -> str | None:
    """Check `out_dir` against `resume`; returns the checkpoint to resume from, if any."""
    checkpoint = latest_checkpoint(paths.root) if resume else None
    if not resume and os.path.isdir(paths.root) and os.listdir(paths.root):
        raise AdaptationInputError(f"output directory is not empty (pass resume to continue it): {paths.root}")
    accelerator.wait_for_everyone()  # every process has looked before the main one writes
    if accelerator.is_main_process:
        os.makedirs(paths.checkpoints, exist_ok=True)
        _write_json(paths.config, config.model_dump(mode="json"))
    accelerator.wait_for_everyone()
    return checkpoint


def _save_checkpoint(
    paths: TrainingDir,
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
            "config": config.model_dump(mode="json"),
            "trainable": list(params),
        }
        _write_json(os.path.join(tmp, "state.json"), meta)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for step in paths.checkpoint_steps()[: -config.keep_checkpoints]:
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
    saved = CPTConfig.model_validate(meta["config"])
    changed = sorted(
        name
        for name in CPTConfig.model_fields
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
        position=StreamPosition.from_dict(meta["position"]),
        loss=meta["loss"],
    )


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
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


__all__ = ["CPTConfig", "CPTResult", "latest_checkpoint", "run_cpt"]
