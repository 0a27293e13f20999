"""Supervised fine-tuning (SFT) on chat examples: the training step of LEP's self-calibration (arXiv 2412.21140,
§2.4.2) and of the stand-in instruct model of `bench/make_instruct_pair.py`.

An example is `{"messages": [{"role": ..., "content": ...}, ...]}`. It is formatted with the tokenizer's own chat
template (`apply_chat_template`), so the model is trained on exactly the token sequence it sees at inference, and
only the assistant turns carry loss (labels are -100 elsewhere): the model learns to answer, not to write prompts.
An assistant turn is the span between the template's rendering of the conversation up to it with the generation
prompt (where generation would start) and its rendering including that turn, so the end-of-turn marker the template
writes is learned too (the model must learn to stop). Control-token look-alikes inside messages are encoded as text
(`sanitize_control_tokens`), as `evaluate/generation.py` does at inference. Examples longer than `max_len` tokens
are cut at the end; one whose assistant tokens are all cut away is skipped.

What learns (`trainable`):
- `lora+head` (the paper's calibration): LoRA adapters (r 8, alpha 1) on the attention and MLP projections of the
  first and last transformer layers only (`lora_layers`), plus the input embeddings and the LM head trained in
  full (one matrix when tied). At the end the adapter is merged into the weights (peft `merge_and_unload`): the
  result is a plain model of the same architecture and state-dict keys, and every other parameter is bit-identical.
- `full`: every parameter.

The loop: a fixed seed, a seeded shuffle per epoch, right-padded micro-batches, `grad_accum` micro-batches
per optimizer step, the loss averaged over the assistant tokens of the whole step (not per micro-batch, so short
and long answers weigh per token whatever the batching), AdamW (decay on matrices only), linear warmup then cosine
(`common.lr_factor`), global-norm clipping. On CUDA: bf16 autocast over fp32 trainable weights, like CPT.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import set_seed
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from langadapt.core.adaptation.config import SFTConfig
from langadapt.core.adaptation.device import compute_device
from langadapt.core.adaptation.errors import AdaptationInputError, TrainingDiverged
from langadapt.core.adaptation.evaluate.generation import chat_ids, has_chat_template, pad_token_id
from langadapt.core.adaptation.lm_loss import IGNORE_INDEX, CausalLMLoss
from langadapt.core.adaptation.train.common import (
    ProgressCallback,
    adamw,
    apply_trainable,
    base_lr,
    fp32_masters,
    lr_schedule,
    prepare_for_training,
    release_lora,
    trainable_parameters,
)
from langadapt.core.adaptation.weights import input_rows

Message = Mapping[str, str]
Example = Mapping[str, Sequence[Message]]


@dataclass(frozen=True)
class SFTResult:
    steps: int  # optimizer steps done
    total_steps: int
    examples: int  # examples trained on (per epoch)
    skipped: int  # examples left out: no assistant token within max_len
    truncated: int  # examples cut to max_len (and still trained on)
    tokens: int  # assistant (loss-bearing) tokens trained on, all epochs
    first_loss: float | None  # mean loss per assistant token over the first reported steps
    final_loss: float | None  # mean loss per assistant token over the last reported steps
    cancelled: bool  # stopped by `should_cancel`: the model holds a partial state, the adapter dropped unmerged
    seconds: float


# ---- formatting ----


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]  # the token where it is learned (an assistant token), IGNORE_INDEX elsewhere
    truncated: bool

    @property
    def loss_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels[1:])  # the first token is never predicted


def _validate(example: Any, index: int) -> list[dict[str, str]]:
    messages = example.get("messages") if isinstance(example, Mapping) else None
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise AdaptationInputError(f"example {index}: expected {{'messages': [...]}} with at least one message")
    clean = []
    for turn, message in enumerate(messages):
        role = message.get("role") if isinstance(message, Mapping) else None
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(role, str) or not isinstance(content, str):
            raise AdaptationInputError(f"example {index}, message {turn}: needs string 'role' and 'content'")
        clean.append({"role": role, "content": content})
    assistant_turns = [turn for turn, message in enumerate(clean) if message["role"] == "assistant"]
    if not assistant_turns:
        raise AdaptationInputError(f"example {index}: no assistant message (nothing to learn)")
    if assistant_turns[0] == 0:
        raise AdaptationInputError(f"example {index}: starts with an assistant message (nothing prompts it)")
    return clean


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def encode_chat(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], max_len: int, *, index: int = 0
) -> EncodedExample:
    """Token ids and labels of one conversation (see the module docstring); `index` names it in errors.

    Where a template rewrites earlier turns as the conversation grows (so a shorter rendering is not a prefix of
    the full one), an assistant span starts where the two renderings first differ: a little prompt may carry
    loss, never less than the answer.
    """
    if not has_chat_template(tokenizer):
        raise AdaptationInputError("the tokenizer has no chat template: SFT formats examples with it")
    clean = _validate({"messages": messages}, index)
    full = chat_ids(tokenizer, clean, add_generation_prompt=False)
    labels = [IGNORE_INDEX] * len(full)
    for turn, message in enumerate(clean):
        if message["role"] != "assistant":
            continue
        start = _common_prefix(chat_ids(tokenizer, clean[:turn], add_generation_prompt=True), full)
        end = _common_prefix(chat_ids(tokenizer, clean[: turn + 1], add_generation_prompt=False), full)
        labels[start:end] = full[start:end]
    truncated = len(full) > max_len
    return EncodedExample(full[:max_len], labels[:max_len], truncated)


def _collate(batch: Sequence[EncodedExample], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (-100 on padding)."""
    width = max(len(example.input_ids) for example in batch)
    input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
        mask[row, :n] = 1
    return input_ids, mask, labels


def _steps(n: int, config: SFTConfig, epoch: int) -> list[list[list[int]]]:
    """Optimizer steps of one epoch, each a list of micro-batches of example indices (seeded shuffle)."""
    order = list(range(n))
    random.Random(config.seed * 1_000_003 + epoch).shuffle(order)
    micro = [order[i : i + config.batch_size] for i in range(0, n, config.batch_size)]
    return [micro[i : i + config.grad_accum] for i in range(0, len(micro), config.grad_accum)]


# ---- what learns ----


def lora_layer_indices(model: PreTrainedModel, layers: Sequence[int] | None) -> list[int] | None:
    """Non-negative, sorted, distinct indices of `layers` (negative ones from the end); None stays None (all)."""
    if layers is None:
        return None
    count = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    if not isinstance(count, int) or count < 1:
        raise AdaptationInputError("cannot tell the model's number of layers (config.num_hidden_layers)")
    resolved = set()
    for layer in layers:
        if not -count <= layer < count:
            raise AdaptationInputError(f"lora layer {layer} out of range for a model of {count} layers")
        resolved.add(layer % count)
    return sorted(resolved)


# ---- the run ----


def run_sft(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    config: SFTConfig,
    *,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> SFTResult:
    """Fine-tune `model` in place on chat `examples` (loss on assistant tokens only).

    `progress` gets `{step, total_steps, epoch, loss, lr, grad_norm}` every `log_every` steps and at the end;
    `should_cancel()` is polled after every step. Afterwards `model` holds the trained weights in their original
    dtypes, device and train/eval mode, with the LoRA adapter merged in (a cancelled run drops it unmerged: the
    other trained weights then hold a partial state, to be discarded).
    """
    started = time.perf_counter()
    encoded: list[EncodedExample] = []
    skipped = truncated = 0
    for index, example in enumerate(examples):
        if not isinstance(example, Mapping):
            raise AdaptationInputError(f"example {index}: expected {{'messages': [...]}}")
        item = encode_chat(tokenizer, example.get("messages"), config.max_len, index=index)  # type: ignore[arg-type]
        if item.loss_tokens == 0:
            skipped += 1
            continue
        truncated += item.truncated
        encoded.append(item)
    if not encoded:
        raise AdaptationInputError(
            f"no SFT example has an assistant token within max_len {config.max_len} ({skipped} skipped)"
        )
    vocab = input_rows(model).shape[0]
    if max(max(item.input_ids) for item in encoded) >= vocab:
        raise AdaptationInputError(f"the tokenizer yields ids beyond the model's {vocab} embeddings")

    epochs = [_steps(len(encoded), config, epoch) for epoch in range(config.epochs)]
    total_steps = sum(len(steps) for steps in epochs)
    warmup_steps = round(config.warmup_ratio * total_steps)
    set_seed(config.seed)  # LoRA's initialisation draws random numbers
    original, precision = prepare_for_training(model, compute_device())
    layers = lora_layer_indices(model, config.lora_layers) if config.trainable == "lora+head" else None
    module = apply_trainable(model, config.trainable, config, lora_layers=layers)
    params = trainable_parameters(module)
    fp32_masters(params)
    optimizer = adamw(params, config, model=model, fused=precision.device.type == "cuda")
    scheduler = lr_schedule(optimizer, config, warmup_steps=warmup_steps, total_steps=total_steps)
    device = precision.device
    pad = pad_token_id(tokenizer)
    loss_module = CausalLMLoss(model)  # the CPT engine's chunked LM head + loss (`lm_loss.py`)

    step = tokens = 0
    first_loss = final_loss = None
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    tokens_since_log = steps_since_log = 0
    cancelled = False
    module.train()
    for epoch, steps in enumerate(epochs):
        for micro_batches in steps:
            step_tokens = sum(encoded[i].loss_tokens for batch in micro_batches for i in batch)
            for batch in micro_batches:
                input_ids, mask, labels = (t.to(device) for t in _collate([encoded[i] for i in batch], pad))
                with precision.autocast():
                    nats = loss_module(input_ids, labels=labels, attention_mask=mask).sum()
                (nats / step_tokens).backward()
                loss_sum += nats.detach()
            grad_norm = None
            if config.max_grad_norm is not None:
                grad_norm = nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm)
            lr = base_lr(optimizer)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += step_tokens
            tokens_since_log += step_tokens
            steps_since_log += 1
            cancelled = step < total_steps and should_cancel is not None and bool(should_cancel())
            if cancelled or step == total_steps or step % config.log_every == 0:
                final_loss = float(loss_sum) / tokens_since_log  # the host sync
                if not math.isfinite(final_loss):
                    release_lora(module, model, merge=False)
                    original.restore(model)
                    raise TrainingDiverged("sft", step, final_loss)
                first_loss = final_loss if first_loss is None else first_loss
                if progress is not None:
                    progress(
                        {
                            "step": step,
                            "total_steps": total_steps,
                            "epoch": epoch,
                            "loss": final_loss,
                            "lr": lr,
                            "grad_norm": None if grad_norm is None else float(grad_norm),
                        }
                    )
                loss_sum.zero_()
                tokens_since_log = steps_since_log = 0
            if cancelled:
                break
        if cancelled:
            break

    release_lora(module, model, merge=not cancelled)
    original.restore(model)
    return SFTResult(
        steps=step,
        total_steps=total_steps,
        examples=len(encoded),
        skipped=skipped,
        truncated=truncated,
        tokens=tokens,
        first_loss=first_loss,
        final_loss=final_loss,
        cancelled=cancelled,
        seconds=time.perf_counter() - started,
    )


__all__ = ["IGNORE_INDEX", "EncodedExample", "Example", "SFTConfig", "SFTResult", "encode_chat", "run_sft"]
