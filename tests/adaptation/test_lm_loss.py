"""The chunked LM loss equals the plain path (full logits + cross-entropy): values and gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from langadapt.core.adaptation.lm_loss import (
    IGNORE_INDEX,
    CausalLMLoss,
    chunk_tokens,
    has_linear_head,
    linear_nll,
)


def _plain_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = (hidden @ weight.T).float()
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_linear_nll_matches_full_logits_values_and_gradients(chunk: int) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(13, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (13,))
    targets[[2, 9]] = IGNORE_INDEX
    upstream = torch.randn(13, dtype=torch.float64)

    ours = linear_nll(hidden, weight, targets, chunk=chunk)
    ours_grads = torch.autograd.grad((ours.double() * upstream).sum(), (hidden, weight))
    plain = _plain_nll(hidden, weight, targets)
    plain_grads = torch.autograd.grad((plain.double() * upstream).sum(), (hidden, weight))

    assert ours.dtype == torch.float32
    assert ours[[2, 9]].tolist() == [0.0, 0.0]
    torch.testing.assert_close(ours.double(), plain.double(), rtol=1e-6, atol=1e-6)
    for mine, theirs in zip(ours_grads, plain_grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_linear_nll_skips_the_gradient_of_a_frozen_head() -> None:
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(20, 8)  # frozen
    nll = linear_nll(hidden, weight, torch.randint(0, 20, (5,)), chunk=2)
    nll.sum().backward()
    assert hidden.grad is not None and weight.grad is None


def test_linear_nll_in_bf16_stays_within_bf16_tolerance() -> None:
    torch.manual_seed(1)
    hidden = torch.randn(64, 32)
    weight = torch.randn(300, 32) * 0.2
    targets = torch.randint(0, 300, (64,))
    reference = _plain_nll(hidden, weight, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_nll(hidden, weight, targets, chunk=10)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference, rtol=2e-2, atol=5e-2)


def test_chunk_size_follows_the_memory_budget() -> None:
    assert chunk_tokens(128_256, budget_bytes=256 * 2**20) == 523
    assert chunk_tokens(10**9, budget_bytes=1) == 1


@pytest.mark.parametrize("tied", [True, False])
def test_causal_lm_loss_equals_the_model_loss_and_its_gradients(tiny_model, tied: bool) -> None:
    model = tiny_model(97, tied=tied, seed=3)
    input_ids = torch.randint(0, 97, (3, 12))
    params = [p for p in model.parameters() if p.requires_grad]

    plain = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    plain_grads = torch.autograd.grad(plain, params)
    loss = CausalLMLoss(model, chunk=5)
    assert loss.fused
    ours = loss(input_ids, labels=input_ids).mean()
    ours_grads = torch.autograd.grad(ours, params)

    torch.testing.assert_close(ours, plain, rtol=1e-6, atol=1e-6)
    for mine, theirs in zip(ours_grads, plain_grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)
    assert sum(1 for _ in loss.parameters()) == len(params)  # the decoder is not registered twice


def test_causal_lm_loss_masks_padding_and_ignored_labels(tiny_model) -> None:
    model = tiny_model(61, seed=4)
    input_ids = torch.randint(0, 61, (2, 9))
    mask = torch.ones_like(input_ids)
    mask[1, 6:] = 0
    labels = input_ids.clone()
    labels[0, :4] = IGNORE_INDEX
    nll = CausalLMLoss(model)(input_ids, labels=labels, attention_mask=mask)

    logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
    expected = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), labels[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX), reduction="none"
    )
    assert nll.shape == (2, 8)
    assert (nll[0, :3] == 0).all() and (nll[1, 5:] == 0).all()
    torch.testing.assert_close(nll, expected, rtol=1e-5, atol=1e-6)


def test_a_soft_capped_head_uses_the_models_own_forward() -> None:
    config = Gemma2Config(
        vocab_size=80,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        final_logit_softcapping=5.0,
    )
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config)
    assert not has_linear_head(model)
    input_ids = torch.randint(0, 80, (2, 7))
    loss = CausalLMLoss(model)
    assert not loss.fused
    torch.testing.assert_close(
        loss(input_ids, labels=input_ids).mean(), model(input_ids=input_ids, labels=input_ids).loss
    )
