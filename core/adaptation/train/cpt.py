"""Continued pretraining (CPT) on a target-language corpus: the training stage of language adaptation.

One accelerate loop for the CPU, one GPU and several GPUs of one machine (under `torchrun`, started by
`launch.launch_cpt`: DDP, or FSDP2 with distributed checkpoints, `distributed.py`), readable top to bottom:
`run_cpt` (the loop), then checkpoints. Settings: `config.CPTConfig`; what it shares with SFT (trainable
set, AdamW, schedule, precision): `common.py`.

What learns (`trainable`):
- `embeddings`: the input embedding matrix only (in a tied model that matrix is the head as well).
- `embeddings+head`: input embeddings and LM head, every transformer layer frozen: the LEP authors' default
  (for a tied model the one shared matrix).
- `lora+head`: LoRA adapters (peft) on the q, k, v, o, gate, up and down projections, plus embeddings and head.
  The adapter is also saved on its own (`lora/`) so that propagation can merge it into the instruct model with a
  scale; `model/` is the base with the adapter merged.
- `full`: every parameter.

Batches are packed blocks of the streamed corpus (`packing.py`); the global batch is `global_batch` (whatever the
number of processes: 1 or N processes train on the same sequences per step, the accumulation is derived) or else
`batch_size x grad_accum x processes` sequences of `seq_len` tokens (on a GPU a step's sequences are regrouped
into the largest micro-batches that fit: `memory.py`; not under FSDP2, whose micro-batch is the configured one).
Every `checkpoint_every` steps (and at the end, and on cancellation) a checkpoint holds the model delta (trainable
parameters only), optimizer, scheduler, data position, RNG states and step, so `run_cpt(..., resume=True)`
continues exactly where it stopped: N steps in one go and k steps + resume + N - k steps give the same weights.

Speed (the loop has to beat the Hugging Face `Trainer`; `bench/cpt_throughput.py` measures it):
- no host sync per micro-step: the loss is summed on the device and read every `log_every` steps only; the
  clipped gradient norm stays a device tensor; cancellation is a host-side poll (with several processes it is
  polled on log steps only, where the processes already sync, and broadcast). The `Trainer` syncs on every
  micro-step (its NaN filter on the loss).
- frozen parameters get `requires_grad=False`: autograd computes no weight gradient for them (for
  `embeddings+head` the backward pass through the layers computes activation gradients only) and AdamW holds
  state for the trainable ones only.
- CUDA: bf16 autocast over fp32 trainable weights, TF32 matmuls, fused AdamW, pinned batches copied with
  `non_blocking`, `use_cache=False` (no KV cache built in training). Frozen weights are held in bf16 for
  `embeddings` and `embeddings+head` (half the memory, no per-step autocast casts; their float32 values wait on
  the host and come back unchanged); the trainable ones are always held in fp32 and cast back at the end.
- tokenization and packing run in a background thread, a few micro-batches ahead.
- the LM head and its cross-entropy run in chunks of tokens (`lm_loss.py`): the float32 [tokens x vocab] logits
  and their gradient are never materialised (8 GiB each for 16 K tokens x 128 K vocabulary).
- `compile` (default: on CUDA) runs the transformer stack through `torch.compile` (fixed packed shapes: one
  compilation, timed apart as `first_step_s`); a failed compilation falls back to eager with a warning.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
import warnings
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

from langadapt.core.adaptation.config import CPTConfig, SpecConflict, Strategy
from langadapt.core.adaptation.corpus import require_documents
from langadapt.core.adaptation.errors import AdaptationInputError, TrainingDiverged
from langadapt.core.adaptation.fsutil import atomic_output_dir
from langadapt.core.adaptation.lm_loss import CausalLMLoss
from langadapt.core.adaptation.rundir import TrainingDir
from langadapt.core.adaptation.sources import save_pretrained
from langadapt.core.adaptation.surgery import check_tokenizer_matches
from langadapt.core.adaptation.train.common import (
    OriginalState,
    Precision,
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
from langadapt.core.adaptation.train.distributed import (
    gather_model,
    load_sharded,
    save_sharded,
    shard_for_training,
    to_float,
)
from langadapt.core.adaptation.train.memory import MicroBatchPlan, fit_micro_batch
from langadapt.core.adaptation.train.packing import (
    MixedBlocks,
    Prefetcher,
    StreamPosition,
    eos_token_id,
    micro_batches,
)
from langadapt.core.adaptation.weights import input_rows

# Fields that may change between a run and its resumption: they do not change what is computed.
# (`source_corpus` is a path: a retry on another machine finds the same text elsewhere; the position checks it.)
_RESUMABLE_CHANGES = {
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
    "compile",
    "source_corpus",
    "auto_micro_batch",
}


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
    processes: int  # training processes (torchrun ranks)
    micro_batch: int  # sequences per forward / backward pass (per process): `batch_size`, or fitted on a GPU
    compiled: bool  # the transformer stack ran through torch.compile (false also after a failed compilation)
    first_step_s: float | None  # wall time of this call's first optimizer step (compilation included)
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
    micro_batch: int | None = None  # sequences per pass; kept by a resumed run (the same sums, bit for bit)


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
    strategy: Strategy = "ddp",
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

    Under `torchrun` (several processes) `strategy` says how they share the model: `ddp` (a replica each, gradients
    all-reduced) or `fsdp2` (sharded: `distributed.py`; `model` is then sharded in place and left so: the result is
    `model/`, written by process 0). Checkpoints are then distributed (DCP); a resume must use the same number of
    processes and strategy. One process ignores `strategy`.
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
    world = accelerator.num_processes
    sharded = world > 1 and strategy == "fsdp2"
    try:
        config.accumulation(world)
    except SpecConflict as exc:
        raise AdaptationInputError(str(exc), "invalid_global_batch") from exc
    total_steps = config.steps
    tokens_per_step = config.tokens_per_step(world)
    paths = TrainingDir(os.path.abspath(out_dir))
    checkpoint = _prepare_out_dir(paths, config, resume, accelerator)

    # Model, trainable set, optimizer. Seeded first: LoRA's initialisation draws random numbers.
    set_seed(config.seed)
    original, precision = prepare_for_training(model, device, place=not sharded)
    module: nn.Module = model
    try:
        module = apply_trainable(model, config.trainable, config)
        fp32_masters(trainable_parameters(module))
        if precision.bf16 and module is model and not sharded:  # FSDP2 all-gathers in bf16 instead
            original.park_frozen_in_bf16(model)
        # The loss head computes the LM head and cross-entropy in chunks (`lm_loss.py`): no full logits. It wraps
        # `model`, whose layers hold the LoRA adapters too. prepare: device placement; DDP with several processes.
        # (compile by default on one GPU or DDP; FSDP2's per-unit hooks are not compiled unless asked)
        compile = cuda and not sharded if config.compile is None else config.compile
        loss_module = CausalLMLoss(model, compile=compile)
        if sharded:
            shard_for_training(loss_module, model, device, bf16=precision.bf16)
            train_module: nn.Module = loss_module
        else:
            train_module = accelerator.prepare(loss_module)
        params = trainable_parameters(module)  # after sharding: the sharded parameters
        frozen = frozen_old_rows(model, new_rows) if config.train_rows == "new" and new_rows else None
        optimizer = adamw(params, config, model=model, fused=cuda)
        scheduler = lr_schedule(optimizer, config, warmup_steps=config.warmup_steps, total_steps=total_steps)
        state = _TrainState()
        if checkpoint is not None:
            state = _load_checkpoint(
                checkpoint, config, strategy, loss_module, params, optimizer, scheduler, accelerator
            )
        resumed_from = state.step
        plan = _micro_batch_plan(model, config, state, params, optimizer, precision, accelerator, fit=not sharded)
        state.micro_batch = plan.micro_batch

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
            plan.micro_batch,
            num_processes=accelerator.num_processes,
            process_index=accelerator.process_index,
            pin_memory=cuda,
        )
        accum = plan.grad_accum
        loss_sum = torch.zeros((), device=device)
        grad_norm: torch.Tensor | None = None
        steps_since_log = 0
        cancelled = False
        checkpoint_dir = checkpoint
        first_step_s: float | None = None
        module.train()
        loop_started = last_log = time.perf_counter()

        def micro_step(input_ids: torch.Tensor, last: bool) -> torch.Tensor:
            # DDP all-reduces on the last micro-batch only; FSDP2 reduce-scatters each (gradients stay sharded).
            with nullcontext() if last or sharded else accelerator.no_sync(train_module):
                with precision.autocast():
                    loss = train_module(input_ids, labels=input_ids).mean()
                accelerator.backward(loss / accum)
            return loss.detach()

        with Prefetcher(batches) as prefetched:
            while state.step < total_steps and not cancelled:
                # One optimizer step: `accum` micro-batches, gradients all-reduced on the last one only.
                for micro in range(accum):
                    input_ids, position = next(prefetched)
                    input_ids = input_ids.to(device, non_blocking=True)
                    if first_step_s is None and micro == 0 and loss_module.compiled:
                        try:  # compilation happens here, on the first call
                            loss_sum += micro_step(input_ids, last=accum == 1)
                        except Exception as exc:  # noqa: BLE001  (any backend failure: train eagerly instead)
                            warnings.warn(f"torch.compile failed, training eagerly: {exc}", stacklevel=1)
                            optimizer.zero_grad(set_to_none=True)
                            loss_module.disable_compile()
                            loss_sum += micro_step(input_ids, last=accum == 1)
                    else:
                        loss_sum += micro_step(input_ids, last=micro == accum - 1)
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
                if first_step_s is None:
                    first_step_s = time.perf_counter() - loop_started
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
                        "grad_norm": None if grad_norm is None else to_float(grad_norm),
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
                        paths,
                        config,
                        strategy,
                        state,
                        total_steps,
                        loss_module,
                        params,
                        optimizer,
                        scheduler,
                        accelerator,
                    )
        loop_seconds = time.perf_counter() - loop_started
        trained_tokens = (state.step - resumed_from) * tokens_per_step
        if loss_module.compiled and first_step_s is not None and state.step - resumed_from > 1:
            # Steady state: the first step's compilation is reported on its own (`first_step_s`).
            loop_seconds -= first_step_s
            trained_tokens -= tokens_per_step

        model_dir = adapter_dir = None
        if sharded:
            if not cancelled:
                model_dir, adapter_dir = _save_gathered(loss_module, model, tokenizer, config, paths, original)
        elif cancelled:
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
            processes=world,
            micro_batch=plan.micro_batch,
            compiled=loss_module.compiled,
            first_step_s=first_step_s,
            model_dir=model_dir,
            adapter_dir=adapter_dir,
            checkpoint_dir=checkpoint_dir,
        )
        if accelerator.is_main_process:
            _write_json(os.path.join(paths.root, "result.json"), asdict(result))
        return result
    except BaseException:
        # Leave the caller's model as it came (values aside): no LoRA layers, its dtypes, device and flags.
        if not sharded:
            release_lora(module, model, merge=False)
            original.restore(model)
        raise


def _accelerator() -> Accelerator:
    """An `Accelerator` without mixed precision: the loop's autocast is explicit, not a patched `forward`.

    accelerate keeps one process-wide state, and whatever ran before in this process (a `Trainer`, a run with
    other settings) may have set another precision, which `Accelerator` refuses to change; like the `Trainer`, start
    from a clean state (the distributed setup, `PartialState`, is kept).

    Without CUDA, `cpu=True`: only then does accelerate join the processes that torchrun started (gloo).
    """
    AcceleratorState._reset_state()
    return Accelerator(mixed_precision="no", cpu=not torch.cuda.is_available())


def _micro_batch_plan(
    model: PreTrainedModel,
    config: CPTConfig,
    state: _TrainState,
    params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    accelerator: Accelerator,
    *,
    fit: bool,
) -> MicroBatchPlan:
    """The configured micro-batches, those of the run being resumed, or with `fit` on a GPU the largest that fit
    (`memory.fit_micro_batch`, measured eagerly on random ids; every process takes the smallest of their choices)."""
    accum = config.accumulation(accelerator.num_processes)
    sequences = config.batch_size * accum  # per process
    if state.micro_batch is not None:
        return MicroBatchPlan(state.micro_batch, sequences // state.micro_batch, None)
    device = accelerator.device
    if device.type != "cuda" or not config.auto_micro_batch or not fit:
        return MicroBatchPlan(config.batch_size, accum, None)
    probe = CausalLMLoss(model)
    vocab = input_rows(model).shape[0]
    generator = torch.Generator().manual_seed(0)

    def run_pass(m: int) -> None:
        ids = torch.randint(0, vocab, (m, config.seq_len), generator=generator).to(device)
        rng = torch.cuda.get_rng_state(device)  # dropout draws: the training run must not see the probe
        try:
            with precision.autocast():
                probe(ids, labels=ids).mean().backward()
        finally:
            torch.cuda.set_rng_state(rng, device)
            for p in params.values():
                p.grad = None

    optimizer_bytes = 0 if optimizer.state else sum(8 * p.numel() for p in params.values())  # AdamW's two moments
    plan = fit_micro_batch(run_pass, sequences, device=device, optimizer_bytes=optimizer_bytes)
    if accelerator.num_processes > 1:
        smallest = int(accelerator.gather(torch.tensor([plan.micro_batch], device=device)).min())
        plan = MicroBatchPlan(smallest, sequences // smallest, None)
    return plan


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
    if module is not model:
        if accelerator.is_main_process:
            _save_adapter(module, paths)
        release_lora(module, model, merge=True)  # merges into `model`'s own layers
    original.restore(model)
    if accelerator.is_main_process:
        _save_model(model, tokenizer, paths)
    accelerator.wait_for_everyone()
    return paths.model, paths.adapter if module is not model else None


def _save_gathered(
    loss_module: CausalLMLoss,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: CPTConfig,
    paths: TrainingDir,
    original: OriginalState,
) -> tuple[str, str | None]:
    """`_save_final` for a sharded model: process 0 gathers it into a new model on the host and writes that."""
    gathered = gather_model(
        loss_module, model, prefix="model", add_trainable=lambda m: apply_trainable(m, config.trainable, config)
    )
    if gathered is not None:
        new_model, module = gathered
        if module is not new_model:
            _save_adapter(module, paths)
            release_lora(module, new_model, merge=True)
        original.restore(new_model)  # the caller's dtypes, on the host
        _save_model(new_model, tokenizer, paths)
    torch.distributed.barrier()
    return paths.model, paths.adapter if config.trainable == "lora+head" else None


def _save_adapter(module: nn.Module, paths: TrainingDir) -> None:
    with atomic_output_dir(paths.adapter, overwrite=True) as tmp:
        module.save_pretrained(tmp, save_embedding_layers=False)  # type: ignore[operator]


def _save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, paths: TrainingDir) -> None:
    shutil.rmtree(paths.model, ignore_errors=True)  # a resumed run that had already finished
    save_pretrained(model, tokenizer, paths.model)


# ---- checkpoints ----
#
# The layout of out_dir is `rundir.TrainingDir`. A checkpoint directory holds:
#     trainable.safetensors                   one process: the model delta, the trainable parameters by name (fp32)
#     optimizer.pt                            one process: AdamW's state dict
#     .metadata, __<process>_0.distcp         several processes: the same two as a DCP checkpoint, in shards
#     scheduler.pt                            LambdaLR's state dict
#     rng-<process>.pt                        python / numpy / torch / CUDA RNG states of each process
#     state.json                              step, tokens, data position, loss, config, processes, strategy,
#                                             parameter names


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
    strategy: Strategy,
    state: _TrainState,
    total_steps: int,
    loss_module: nn.Module,
    params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    accelerator: Accelerator,
) -> str:
    final = paths.checkpoint(state.step)
    tmp = os.path.join(paths.checkpoints, f".tmp-{os.path.basename(final)}")
    distributed = accelerator.num_processes > 1
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), os.path.join(tmp, f"rng-{accelerator.process_index}.pt"))
    if distributed:
        save_sharded(tmp, loss_module, optimizer)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if not distributed:
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
            "micro_batch": state.micro_batch,
            "num_processes": accelerator.num_processes,
            "strategy": strategy if distributed else None,
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
    strategy: Strategy,
    loss_module: nn.Module,
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
    world = accelerator.num_processes
    if meta["num_processes"] != world:
        raise AdaptationInputError(
            f"cannot resume {path}: it ran on {meta['num_processes']} processes, this run has {world} "
            "(a resumed run keeps its number of GPUs)",
            "world_size_changed",
        )
    if world > 1 and meta.get("strategy") != strategy:
        raise AdaptationInputError(
            f"cannot resume {path}: it ran with strategy {meta.get('strategy')}, this run has {strategy}",
            "strategy_changed",
        )
    if meta["trainable"] != list(params):
        raise AdaptationInputError(f"cannot resume {path}: its trainable parameters are not this model's")
    if world > 1:
        load_sharded(path, loss_module, optimizer)
    else:
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
        micro_batch=meta.get("micro_batch"),
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
