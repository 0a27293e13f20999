"""focus, omp and regression: planted structure recovered, the auxiliary space deterministic and cached, named
errors, and the surgery contract (overlapping rows bit-exact, tied heads tied, untied heads their own rows)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from langadapt.core.adaptation.config import AuxiliaryConfig, InitConfig, VocabConfig
from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.core.adaptation.init import INIT_METHODS, InitContext, auxiliary, regression
from langadapt.core.adaptation.init.auxiliary import AuxiliarySpace, auxiliary_space, train_auxiliary
from langadapt.core.adaptation.init.focus import sparsemax
from langadapt.core.adaptation.init.omp import convex
from langadapt.core.adaptation.mapping import VocabMapping
from langadapt.core.adaptation.surgery import change_vocabulary, has_tied_head
from langadapt.core.adaptation.tokens import TokenKey
from langadapt.core.adaptation.vocab import build_vocab

SMALL_AUX = AuxiliaryConfig(dim=24, epochs=2, window=3, train_chars=200_000)


def planted_context(
    method: str, anchor_vectors: torch.Tensor, anchor_rows: torch.Tensor, new_vectors: torch.Tensor, **options
) -> tuple[InitContext, torch.Tensor]:
    """Old vocabulary = the anchors; new vocabulary = the anchors (overlapping, same ids) then the new tokens,
    each new token's one old piece being anchor 0. Every token occurs often enough to be trained."""
    m, n = len(anchor_vectors), len(new_vectors)
    mapping = VocabMapping(
        old_size=m, new_size=m + n, overlap={i: i for i in range(m)}, pieces=[[i] for i in range(m)] + [[0]] * n
    )
    vectors = torch.cat([anchor_vectors, new_vectors]).numpy().astype(np.float64)
    space = AuxiliarySpace(vectors=vectors, counts=np.full(m + n, 100))
    keys = [TokenKey("text", b"ab")] * m + [TokenKey("text", b"abcd")] * n
    config = InitConfig(method=method, **{"head_norm": "none", "mean_weight": 0.0, **options})  # type: ignore[arg-type]
    ctx = InitContext(
        old_rows=anchor_rows,
        mapping=mapping,
        old_vocab=SimpleNamespace(),  # type: ignore[arg-type]
        new_vocab=SimpleNamespace(keys=keys),  # type: ignore[arg-type]
        generator=torch.Generator().manual_seed(0),
        config=config,
        auxiliary=space,
    )
    return ctx, torch.arange(m, m + n)


def test_regression_recovers_a_linear_map_between_the_spaces() -> None:
    torch.manual_seed(0)
    anchors = torch.randn(200, 12, dtype=torch.float64)
    planted, offset = torch.randn(12, 20, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    new = torch.randn(30, 12, dtype=torch.float64)
    ctx, new_ids = planted_context("regression", anchors, anchors @ planted + offset, new)
    rows = INIT_METHODS["regression"](ctx, new_ids)
    assert torch.allclose(rows, new @ planted + offset, atol=1e-2)


def test_the_ridge_fit_reads_rows_in_chunks_into_moments_that_subtract(monkeypatch) -> None:
    monkeypatch.setattr(regression, "ROW_CHUNK", 7)  # several chunks
    torch.manual_seed(2)
    inputs, targets = torch.randn(50, 4, dtype=torch.float64), torch.randn(50, 6, dtype=torch.float32)
    rest = regression.Moments.of(inputs, targets) - regression.Moments.of(inputs[:10], targets[:10])
    direct = regression.Moments.of(inputs[10:], targets[10:])
    for got, want in zip(dataclasses.astuple(rest), dataclasses.astuple(direct), strict=True):
        torch.testing.assert_close(torch.as_tensor(got), torch.as_tensor(want))
    in_mean, weights, out_mean = regression.ridge_fit(direct, strength=0.0)
    design = torch.cat([inputs[10:], torch.ones(40, 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, targets[10:].double()).solution
    torch.testing.assert_close(weights, solution[:4])
    torch.testing.assert_close(out_mean - in_mean @ weights, solution[4])


def test_omp_recovers_sparse_convex_combinations_of_anchors() -> None:
    torch.manual_seed(1)
    anchors, rows = torch.randn(60, 96, dtype=torch.float64), torch.randn(60, 16, dtype=torch.float64)
    picks = torch.stack([torch.randperm(60)[:3] for _ in range(10)])
    weights = torch.rand(10, 3, dtype=torch.float64) + 0.1
    weights = weights / weights.sum(dim=1, keepdim=True)  # convex combinations
    new = torch.einsum("nt,ntk->nk", weights, anchors[picks])
    ctx, new_ids = planted_context("omp", anchors, rows, new, terms=4)  # greedy: one spare term absorbs a miss
    expected = torch.einsum("nt,ntd->nd", weights, rows[picks])
    assert torch.allclose(INIT_METHODS["omp"](ctx, new_ids), expected, atol=1e-6)


def test_focus_weights_the_anchors_a_token_resembles() -> None:
    anchors = torch.eye(30, dtype=torch.float64)  # orthogonal directions: unrelated anchors score 0
    rows = torch.randn(30, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    new = torch.stack([3 * anchors[4], anchors[7] + anchors[9], 2 * anchors[1] - 0.3 * anchors[2]])
    ctx, new_ids = planted_context("focus", anchors, rows, new, neighbours=10)
    result = INIT_METHODS["focus"](ctx, new_ids)
    assert torch.allclose(result[0], rows[4])  # the one anchor it is
    assert torch.allclose(result[1], (rows[7] + rows[9]) / 2)  # two equally similar anchors
    assert torch.allclose(result[2], rows[1], atol=0.05)  # sparsemax: anchors 1 % as similar get ~1 % weight
    assert torch.allclose(sparsemax(torch.tensor([[0.9, 0.8, -2.0]])), torch.tensor([[0.55, 0.45, 0.0]]))


def test_omp_transplants_a_convex_combination() -> None:
    weights = convex(torch.tensor([[1.8, -0.9, 0.1], [-1.0, -2.0, -0.5]]))
    assert torch.allclose(weights, torch.tensor([[1.8 / 1.9, 0.0, 0.1 / 1.9], [1 / 3, 1 / 3, 1 / 3]]))


def test_mean_weight_and_norm_cap_bound_the_new_rows() -> None:
    anchors = torch.eye(30, dtype=torch.float64)
    rows = 5 * torch.randn(30, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    new = torch.stack([anchors[4], anchors[5]])
    ctx, new_ids = planted_context("focus", anchors, rows, new, mean_weight=0.25)
    blended = INIT_METHODS["focus"](ctx, new_ids)
    assert torch.allclose(blended, 0.75 * rows[4:6] + 0.25 * rows[0])  # the mean row: the one piece, anchor 0
    capped_ctx = dataclasses.replace(ctx, config=ctx.config.model_copy(update={"head_norm": "cap"}))
    capped = INIT_METHODS["focus"](capped_ctx, new_ids)
    assert torch.all(capped.norm(dim=1) <= rows[0].norm() * (1 + 1e-9))
    assert torch.allclose(capped / capped.norm(dim=1, keepdim=True), blended / blended.norm(dim=1, keepdim=True))


def test_too_few_anchors_is_a_named_error() -> None:
    anchors = torch.eye(5, dtype=torch.float64)
    ctx, new_ids = planted_context("regression", anchors, anchors.clone(), anchors[:2].clone())
    with pytest.raises(AdaptationInputError) as error:
        INIT_METHODS["regression"](ctx, new_ids)
    assert error.value.code == "too_few_anchors"


@pytest.fixture(scope="module")
def extended(english_byte_level_tokenizer, ru_corpus):
    return build_vocab(english_byte_level_tokenizer, ru_corpus, VocabConfig(new_tokens=1500)).tokenizer


def test_auxiliary_space_is_deterministic_per_seed_and_cached(extended, ru_corpus, tmp_path, monkeypatch) -> None:
    first = train_auxiliary(extended, ru_corpus, SMALL_AUX, seed=0)
    again = train_auxiliary(extended, ru_corpus, SMALL_AUX, seed=0)
    other = train_auxiliary(extended, ru_corpus, SMALL_AUX, seed=1)
    assert first.vectors.shape == (len(extended), SMALL_AUX.dim)
    assert np.array_equal(first.vectors, again.vectors) and np.array_equal(first.counts, again.counts)
    assert not np.array_equal(first.vectors, other.vectors)
    assert first.counts.sum() > 50_000 and (first.counts >= SMALL_AUX.min_count).sum() > 500

    cached = auxiliary_space(extended, ru_corpus, SMALL_AUX, 0, str(tmp_path))
    assert len(list(tmp_path.glob("auxiliary-*.npz"))) == 1 and np.array_equal(cached.vectors, first.vectors)

    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of reading the cache")

    monkeypatch.setattr(auxiliary, "train_auxiliary", no_training)
    assert np.array_equal(auxiliary_space(extended, ru_corpus, SMALL_AUX, 0, str(tmp_path)).vectors, first.vectors)
    with pytest.raises(AssertionError):  # another setting is another space
        auxiliary_space(extended, ru_corpus, SMALL_AUX.model_copy(update={"window": 4}), 0, str(tmp_path))


def test_a_corpus_too_small_for_the_auxiliary_space_is_a_named_error(extended, tmp_path: Path) -> None:
    corpus = tmp_path / "tiny.jsonl"
    corpus.write_text(json.dumps({"text": "Мал золотник, да дорог. " * 20}, ensure_ascii=False) + "\n")
    with pytest.raises(AdaptationInputError) as error:
        train_auxiliary(extended, str(corpus), SMALL_AUX, seed=0)
    assert error.value.code == "corpus_too_small"


@pytest.mark.parametrize("method", ["focus", "omp", "regression"])
@pytest.mark.parametrize("tied", [True, False])
def test_surgery_with_each_method(
    tiny_model, english_byte_level_tokenizer, extended, ru_corpus, tmp_path, method: str, tied: bool
) -> None:
    old_tok = english_byte_level_tokenizer
    model = tiny_model(len(old_tok), tied=tied)
    old_emb = model.get_input_embeddings().weight.detach().clone()
    old_head = model.get_output_embeddings().weight.detach().clone()
    config = InitConfig(method=method, auxiliary=SMALL_AUX, cache_dir=str(tmp_path), scale=1.0)  # type: ignore[arg-type]
    mapping = change_vocabulary(model, old_tok, extended, config, corpus=ru_corpus).mapping
    emb = model.get_input_embeddings().weight.detach()
    head = model.get_output_embeddings().weight.detach()
    assert has_tied_head(model) is tied and torch.isfinite(emb).all() and torch.isfinite(head).all()
    new_idx, old_idx = mapping.overlap_index()
    assert torch.equal(emb[new_idx], old_emb[old_idx])
    assert torch.equal(head[new_idx], (old_emb if tied else old_head)[old_idx])

    fresh = torch.tensor(mapping.new_ids)
    mean_emb = mapping.mean_rows(old_emb, mapping.new_ids).float()
    assert torch.all(emb[fresh].norm(dim=1) <= mean_emb.norm(dim=1) * (1 + 1e-5))  # head_norm cap
    assert (emb[fresh] - mean_emb).abs().max() > 1e-3  # not simply the mean
    if not tied:  # the head's own combination of head rows, not a copy of the embeddings
        assert not torch.allclose(head[fresh], emb[fresh])
        mean_head = mapping.mean_rows(old_head, mapping.new_ids).float()
        assert torch.all(head[fresh].norm(dim=1) <= mean_head.norm(dim=1) * (1 + 1e-5))

    again = tiny_model(len(old_tok), tied=tied)
    change_vocabulary(again, old_tok, extended, config, corpus=ru_corpus)  # the cached space, the same rows
    assert torch.equal(again.get_input_embeddings().weight, model.get_input_embeddings().weight)
    assert len(list(tmp_path.glob("auxiliary-*.npz"))) == 1


def test_the_auxiliary_methods_need_a_corpus(tiny_model, english_byte_level_tokenizer, extended) -> None:
    model = tiny_model(len(english_byte_level_tokenizer))
    with pytest.raises(AdaptationInputError, match="corpus"):
        change_vocabulary(model, english_byte_level_tokenizer, extended, InitConfig(method="focus"))


def test_init_settings_that_the_method_ignores_are_refused() -> None:
    with pytest.raises(ValidationError, match="init.terms only applies"):
        InitConfig(method="focus", terms=4)
    with pytest.raises(ValidationError, match="does not apply to init.method 'mean'"):
        InitConfig(method="mean", auxiliary=AuxiliaryConfig(dim=50))
    assert InitConfig(method="omp", terms=4).terms == 4
