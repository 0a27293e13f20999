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

The loop: a fixed seed, a seeded shuffle per epoch, right-padded micro-batches, `grad_accum_steps` micro-batches
per optimizer step, the loss averaged over the assistant tokens of the whole step (not per micro-batch, so short
and long answers weigh per token whatever the batching), AdamW (decay on matrices only), linear warmup then cosine
(`cpt.lr_factor`), global-norm clipping. On CUDA: bf16 autocast over fp32 trainable weights, like CPT.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from functools import partial
from typing import Any

import torch
from accelerate.utils import set_seed
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.core.adaptation.evaluate.generation import has_chat_template, pad_token_id
from langadapt.core.adaptation.train.cpt import (
    LORA_TARGETS,
    OriginalState,  # what training changes on the caller's model besides the values: put back at the end
    ProgressCallback,
    lr_factor,
    trainable_parameters,
)

SFT_TRAINABLE = ("lora+head", "full")
IGNORE_INDEX = -100

Message = Mapping[str, str]
Example = Mapping[str, Sequence[Message]]


@dataclass(frozen=True)
class SFTConfig:
    """Hyper-parameters of an SFT run; the defaults are the LEP paper's self-calibration (§2.4.2).

    `lora_layers` are indices of transformer layers, negative ones counted from the end: `(0, -1)` is the first
    and the last layer; None puts adapters on every layer. `warmup_ratio` is the share of optimizer steps spent in
    linear warmup.
    """

    trainable: str = "lora+head"
    lora_r: int = 8
    lora_alpha: float = 1.0
    lora_dropout: float = 0.0
    lora_layers: tuple[int, ...] | None = (0, -1)
    lr: float = 2.5e-5
    weight_decay: float = 0.1  # on matrices only, not on norms and biases
    epochs: int = 1
    batch_size: int = 8  # sequences per micro-batch
    grad_accum_steps: int = 4  # micro-batches per optimizer step
    max_len: int = 1024  # tokens per example; longer ones are cut at the end
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0  # the cosine decays to lr x min_lr_ratio at the last step
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # max global gradient norm; None: no clipping
    seed: int = 0
    log_every: int = 10  # progress reports (and host syncs of the loss) every N optimizer steps

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        if self.lora_layers is not None:
            object.__setattr__(self, "lora_layers", tuple(self.lora_layers))
        if self.trainable not in SFT_TRAINABLE:
            choices = ", ".join(SFT_TRAINABLE)
            raise AdaptationInputError(f"unknown SFT trainable set '{self.trainable}' (choose from {choices})")
        for name in ("epochs", "batch_size", "grad_accum_steps", "log_every", "lora_r"):
            if getattr(self, name) < 1:
                raise AdaptationInputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_len < 2:
            raise AdaptationInputError(f"max_len must be at least 2, got {self.max_len}")
        if self.lora_layers is not None and not self.lora_layers:
            raise AdaptationInputError("lora_layers must name at least one layer (or be None for all)")
        if not self.lr > 0 or not self.lora_alpha > 0 or self.eps <= 0 or self.weight_decay < 0:
            raise AdaptationInputError("lr, lora_alpha and eps must be positive, weight_decay not negative")
        if not 0 <= self.warmup_ratio < 1 or not 0 <= self.min_lr_ratio <= 1 or not 0 <= self.lora_dropout < 1:
            raise AdaptationInputError("warmup_ratio and lora_dropout must be in [0, 1), min_lr_ratio in [0, 1]")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise AdaptationInputError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise AdaptationInputError(f"grad_clip must be positive or None, got {self.grad_clip}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SFTConfig:
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise AdaptationInputError(f"unknown SFT option(s): {', '.join(unknown)}")
        return cls(**data)


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


def _template_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(
        messages,
        add_generation_prompt=prompt,
        tokenize=True,
        return_dict=False,
        sanitize_control_tokens=True,
    )
    return [int(i) for i in ids]


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
    full = _template_ids(tokenizer, clean, prompt=False)
    labels = [IGNORE_INDEX] * len(full)
    for turn, message in enumerate(clean):
        if message["role"] != "assistant":
            continue
        start = _common_prefix(_template_ids(tokenizer, clean[:turn], prompt=True), full)
        end = _common_prefix(_template_ids(tokenizer, clean[: turn + 1], prompt=False), full)
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
    return [micro[i : i + config.grad_accum_steps] for i in range(0, len(micro), config.grad_accum_steps)]


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


def apply_sft_trainable(model: PreTrainedModel, config: SFTConfig) -> nn.Module:
    """Set `requires_grad` for `config.trainable` (in place); returns the module to train: `model`, or for
    `lora+head` a peft model wrapping it (LoRA layers injected into `model`'s chosen layers)."""
    if config.trainable == "full":
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(LORA_TARGETS),
        layers_to_transform=lora_layer_indices(model, config.lora_layers),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        module = get_peft_model(model, lora)
    except ValueError as exc:  # no target module in this architecture or in those layers
        raise AdaptationInputError(f"cannot add LoRA adapters to this model: {exc}") from exc
    model.get_input_embeddings().weight.requires_grad_(True)
    head = model.get_output_embeddings()
    if head is not None:
        head.weight.requires_grad_(True)
    return module


def _adamw(params: dict[str, nn.Parameter], config: SFTConfig, *, fused: bool) -> torch.optim.AdamW:
    matrices = [p for p in params.values() if p.ndim >= 2]
    vectors = [p for p in params.values() if p.ndim < 2]
    groups = [{"params": matrices, "weight_decay": config.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    groups = [group for group in groups if group["params"]]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps, fused=fused or None)


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
    vocab = model.get_input_embeddings().weight.shape[0]
    if max(max(item.input_ids) for item in encoded) >= vocab:
        raise AdaptationInputError(f"the tokenizer yields ids beyond the model's {vocab} embeddings")

    epochs = [_steps(len(encoded), config, epoch) for epoch in range(config.epochs)]
    total_steps = sum(len(steps) for steps in epochs)
    warmup_steps = round(config.warmup_ratio * total_steps)
    device = torch.device("cuda") if torch.cuda.is_available() else next(model.parameters()).device
    cuda = device.type == "cuda"
    bf16 = cuda and torch.cuda.is_bf16_supported()
    pad = pad_token_id(tokenizer)

    set_seed(config.seed)  # LoRA's initialisation draws random numbers
    original = OriginalState.capture(model)
    if not bf16:
        model.float()  # no autocast: one dtype for every matmul
    model.to(device)
    module = apply_sft_trainable(model, config)
    params = trainable_parameters(module)
    for p in params.values():
        p.data = p.data.float()  # fp32 master weights: bf16 would round small AdamW updates away
    optimizer = _adamw(params, config, fused=cuda)
    scheduler = LambdaLR(
        optimizer,
        partial(lr_factor, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=config.min_lr_ratio),
    )
    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=bf16)

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
                with autocast():
                    logits = module(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
                nats = nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(),
                    labels[:, 1:].flatten(),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
                (nats / step_tokens).backward()
                loss_sum += nats.detach()
            grad_norm = None
            if config.grad_clip is not None:
                grad_norm = nn.utils.clip_grad_norm_(list(params.values()), config.grad_clip)
            lr = optimizer.param_groups[0]["lr"]
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

    if module is not model:
        if cancelled:
            module.unload()  # type: ignore[operator]  # drop the LoRA layers, the base weights untouched
        else:
            module.merge_and_unload()  # type: ignore[operator]  # merges into `model`'s own layers
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


__all__ = [
    "IGNORE_INDEX",
    "SFT_TRAINABLE",
    "EncodedExample",
    "Example",
    "SFTConfig",
    "SFTResult",
    "apply_sft_trainable",
    "encode_chat",
    "lora_layer_indices",
    "run_sft",
]
