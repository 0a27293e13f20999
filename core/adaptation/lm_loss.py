"""The causal-LM loss without the full logits: the LM head and the cross-entropy computed a chunk of tokens at a time.

The standard path (`model(input_ids, labels=...)`) materialises float32 logits of shape [tokens x vocab] and then
their gradient: for 8 x 2048 tokens and a 128 K vocabulary, 8 GiB each. Adaptation is heavy exactly there (the new
vocabulary rows are what it trains). `linear_nll` applies the head to `chunk` tokens at a time and keeps only each
token's log-sum-exp; the backward pass recomputes a chunk's logits to form its gradient, so memory holds one chunk's
logits whatever the number of tokens, at the price of a second head matmul. The math per token t with hidden h_t,
head W, target y_t: nll_t = logsumexp(W h_t) - (W h_t)[y_t]; d nll_t / d logits = softmax(W h_t) - onehot(y_t).

`CausalLMLoss` wraps a model so that training loops (CPT, SFT) and the log-likelihood evaluation tasks get per-token
negative log-likelihoods from it; models whose head is not a plain linear map (logit soft-capping or scaling, a
bias) go through their own forward instead. Both paths give the same numbers within float tolerance
(tests/adaptation/test_lm_loss.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

IGNORE_INDEX = -100
# Bytes of float32 logits one chunk may hold (its softmax gradient takes as much again).
CHUNK_BYTES = 256 * 2**20


def chunk_tokens(vocab_size: int, budget_bytes: int = CHUNK_BYTES) -> int:
    """Tokens per chunk so that a chunk's float32 logits take about `budget_bytes`."""
    return max(1, budget_bytes // (4 * vocab_size))


class _LinearNLL(torch.autograd.Function):
    """nll = logsumexp(hidden @ weight.T) - (hidden @ weight.T)[targets], chunk by chunk (see the module doc)."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk: int,
        compute_dtype: torch.dtype,
    ) -> torch.Tensor:
        tokens = hidden.shape[0]
        nll = torch.zeros(tokens, dtype=torch.float32, device=hidden.device)
        lse = torch.zeros(tokens, dtype=torch.float32, device=hidden.device)
        w = weight.to(compute_dtype)
        valid = targets != IGNORE_INDEX
        safe_targets = targets.clamp_min(0)
        for start in range(0, tokens, chunk):
            end = min(start + chunk, tokens)
            logits = (hidden[start:end].to(compute_dtype) @ w.T).float()
            chunk_lse = logits.logsumexp(-1)
            target_logits = logits.gather(1, safe_targets[start:end, None]).squeeze(1)
            nll[start:end] = torch.where(valid[start:end], chunk_lse - target_logits, 0.0)
            lse[start:end] = chunk_lse
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        ctx.compute_dtype = compute_dtype
        return nll

    @staticmethod
    def backward(ctx: Any, grad_nll: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, targets, lse = ctx.saved_tensors
        dtype = ctx.compute_dtype
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        w = weight.to(dtype)
        scale = torch.where(targets != IGNORE_INDEX, grad_nll.float(), 0.0)
        safe_targets = targets.clamp_min(0)
        for start in range(0, hidden.shape[0], ctx.chunk):
            end = min(start + ctx.chunk, hidden.shape[0])
            h = hidden[start:end].to(dtype)
            probs = ((h @ w.T).float() - lse[start:end, None]).exp_()
            probs.scatter_add_(1, safe_targets[start:end, None], torch.full_like(probs[:, :1], -1.0))
            grad_logits = (probs * scale[start:end, None]).to(dtype)
            if grad_hidden is not None:
                grad_hidden[start:end] = (grad_logits @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ h).float()
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None,
            None,
            None,
        )


def linear_nll(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, chunk: int | None = None
) -> torch.Tensor:
    """Per-token negative log-likelihood (nats, float32; 0 where the target is `IGNORE_INDEX`) of `targets` [N]
    under the logits `hidden` [N, d] @ `weight` [V, d].T, never holding more than `chunk` tokens' logits.

    Under autocast the matmuls run in the autocast dtype (as `nn.Linear` would), the softmax in float32."""
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    chunk = chunk or chunk_tokens(weight.shape[0])
    with torch.autocast(device_type, enabled=False):
        return _LinearNLL.apply(hidden, weight, targets, chunk, dtype)


def has_linear_head(model: PreTrainedModel) -> bool:
    """Whether the model's logits are exactly `head(last hidden state)`: a bias-free linear head, no soft-capping
    or scaling of the logits, and a decoder that returns the last hidden state."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:
        return False
    text = model.config.get_text_config()
    if getattr(text, "final_logit_softcapping", None) is not None:
        return False
    if any(getattr(text, name, 1.0) not in (None, 1.0) for name in ("logit_scale", "logits_scaling")):
        return False
    try:
        return isinstance(model.get_decoder(), nn.Module)
    except (AttributeError, NotImplementedError):
        return False


class CausalLMLoss(nn.Module):
    """`model` with a loss head: `forward` returns the per-token negative log-likelihood [batch, seq - 1] of
    `labels[:, 1:]` given the tokens before them (0 where a label is `IGNORE_INDEX` or masked out).

    The decoder may be compiled (`compile=True`: `torch.compile` of the transformer stack only; the chunked loss
    stays eager). A model without a plain linear head runs its own forward and full logits."""

    _run: Callable[..., Any]  # the decoder (or the whole model), maybe compiled

    def __init__(self, model: PreTrainedModel, *, compile: bool = False, chunk: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.chunk = chunk
        self.fused = has_linear_head(model)
        self.compiled = False
        self._set_runner(compile)

    def _set_runner(self, compile: bool) -> None:
        decoder = self.model.get_decoder() if self.fused else self.model
        # Kept out of the registered submodules: its parameters are `self.model`'s, listed once.
        self.__dict__["_run"] = torch.compile(decoder) if compile else decoder
        self.compiled = compile

    def disable_compile(self) -> None:
        """Run the decoder eagerly from now on (after a failed compilation)."""
        self._set_runner(False)

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        targets = labels[:, 1:]
        if attention_mask is not None:
            targets = targets.masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)
        out = self._run(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        if self.fused:
            hidden = out.last_hidden_state[:, :-1]
            head = self.model.get_output_embeddings().weight
            nll = linear_nll(hidden.flatten(0, 1), head, targets.flatten(), chunk=self.chunk)
        else:
            logits = out.logits[:, :-1].float()
            nll = nn.functional.cross_entropy(
                logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
            )
        return nll.view(targets.shape)
