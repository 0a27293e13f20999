"""Continued pretraining on a tiny random Llama and a real Russian corpus slice: packing, trainable sets, loss,
checkpoints, exact resumption, cancellation, progress reports and config validation."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM, PreTrainedTokenizerFast

from langadapt.core.adaptation import lm_loss
from langadapt.core.adaptation.config import CPTConfig, SpecConflict
from langadapt.core.adaptation.errors import AdaptationInputError, TrainingDiverged
from langadapt.core.adaptation.train.common import (
    OriginalState,
    adamw,
    apply_trainable,
    base_lr,
    trainable_parameters,
)
from langadapt.core.adaptation.train.cpt import latest_checkpoint, run_cpt
from langadapt.core.adaptation.train.packing import DataPosition, MixedBlocks, PackedBlocks, StreamPosition

SEQ = 32


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices gain nothing from intra-op threads, and on a busy machine OpenMP's barriers make them up to 100
    times slower; one thread keeps the file fast."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, ru_texts: list[str]) -> str:
    """~30 K characters of Russian prose, a paragraph per document (many document boundaries per block)."""
    paragraphs = [p.strip() for text in ru_texts for p in text.split("\n") if p.strip()]
    docs, chars = [], 0
    for paragraph in paragraphs:
        docs.append(paragraph)
        chars += len(paragraph)
        if chars > 30_000:
            break
    path = tmp_path_factory.mktemp("cpt") / "ru.jsonl"
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return str(path)


@pytest.fixture()
def tok(english_byte_level_tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    return english_byte_level_tokenizer


def config(**overrides: Any) -> CPTConfig:
    values: dict[str, Any] = dict(
        steps=3, seq_len=SEQ, batch_size=2, grad_accum=2, lr=1e-2, warmup_steps=1, log_every=1
    )
    return CPTConfig(**{**values, **overrides})


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


# ---- packing ----


def test_packing_joins_documents_with_eos_and_pads_nothing(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    docs = ["The cat sat on the mat.", "Hello", "A somewhat longer third document, with a comma.", "x"]
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(docs) + "\n", encoding="utf-8")
    stream = [i for d in docs for i in [*tok.encode(d), tok.eos_token_id]]
    blocks = [b for b, _ in _take(PackedBlocks(tok, str(path), 7), 3 * len(stream) // 7)]
    assert all(len(b) == 7 for b in blocks)
    flat = [int(i) for b in blocks for i in b]
    assert flat == (stream * 3)[: len(flat)]  # epochs follow each other without a gap
    assert tok.pad_token_id not in flat
    assert flat.count(tok.eos_token_id) == sum(1 for i in (stream * 3)[: len(flat)] if i == tok.eos_token_id)


def test_packing_resumes_from_every_position(corpus: str, tok: PreTrainedTokenizerFast) -> None:
    items = _take(PackedBlocks(tok, corpus, SEQ), 40)
    for k in (0, 1, 7, 23):
        resumed = _take(PackedBlocks(tok, corpus, SEQ, start=items[k][1]), 5)
        for (a, pa), (b, pb) in zip(resumed, items[k + 1 : k + 6], strict=True):
            assert a.tolist() == b.tolist() and pa == pb
    assert any(pos.offset > 0 for _, pos in items) and len({pos.document for _, pos in items}) > 5


def test_packing_rejects_a_position_past_the_corpus(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = tmp_path / "docs.txt"
    path.write_text("one\ntwo\n", encoding="utf-8")
    with pytest.raises(AdaptationInputError, match="not the corpus"):
        next(iter(PackedBlocks(tok, str(path), 4, start=DataPosition(0, 5, 0))))
    with pytest.raises(AdaptationInputError, match="not the corpus"):
        next(iter(PackedBlocks(tok, str(path), 4, start=DataPosition(0, 1, 99))))


def _take(blocks: PackedBlocks, n: int) -> list:
    out = []
    for item in blocks:
        out.append(item)
        if len(out) == n:
            return out
    return out


# ---- config ----


@pytest.mark.parametrize(
    "overrides",
    [
        {"trainable": "layers"},
        {"steps": None},
        {"steps": 3, "max_tokens": 1000},
        {"steps": 0},
        {"seq_len": 1},
        {"batch_size": 0},
        {"lr": 0.0},
        {"betas": (0.9, 1.0)},
        {"max_grad_norm": 0.0},
        {"keep_checkpoints": 0},
        {"steps": 20, "warmup_steps": 100},
        {"steps": 5, "warmup_steps": 5},
        {"source_mix": 0.6, "source_corpus": "en.txt"},
        {"source_mix": 0.1},
        {"source_corpus": "en.txt"},
        {"train_rows": "some"},
        {"lr": float("inf")},
        {"lr": float("nan")},
        {"lr": 1e308},
        {"lr_scale": {"head": float("inf")}},
        {"betas": (0.9, float("nan"))},
        {"seed": -1},
        {"seed": 2**32},
        {"steps": 2**64},
        {"lora_r": 10**30},
        {"global_batch": 3},  # not a multiple of batch_size 2
        {"global_batch": 8, "grad_accum": 4},  # grad_accum is derived from it
    ],
)
def test_invalid_config_is_refused(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        config(**overrides)


def test_config_defaults_are_the_papers_and_round_trip() -> None:
    c = CPTConfig()
    assert (c.trainable, c.lr, c.warmup_steps, c.weight_decay, c.betas, c.max_grad_norm, c.seed) == (
        "embeddings+head",
        1e-4,
        100,
        0.1,
        (0.9, 0.95),
        1.0,
        0,
    )
    assert c.batch_size * c.grad_accum == 256 and c.seq_len == 1024 and c.steps == 1000
    assert CPTConfig.model_validate(json.loads(c.model_dump_json())) == c
    # warm-up defaults to 10 % of the steps, at most 100, and is written out
    assert CPTConfig(steps=20).warmup_steps == 2 and CPTConfig(steps=5000).warmup_steps == 100
    assert CPTConfig(steps=20).model_dump()["warmup_steps"] == 2
    with pytest.raises(ValidationError, match="learning_rate"):
        CPTConfig.model_validate({"steps": 1, "learning_rate": 1.0})


def test_global_batch_fixes_the_batch_whatever_the_number_of_processes() -> None:
    c = CPTConfig(batch_size=4, global_batch=32, seq_len=128)
    assert [c.accumulation(n) for n in (1, 2, 4, 8)] == [8, 4, 2, 1]
    assert {c.tokens_per_step(n) for n in (1, 2, 4, 8)} == {32 * 128}
    with pytest.raises(SpecConflict, match="global_batch") as conflict:
        c.accumulation(16)  # 32 sequences cannot be micro-batches of 4 on 16 processes
    assert conflict.value.field == "global_batch"
    assert CPTConfig.model_validate(json.loads(c.model_dump_json())) == c  # a dumped config reads back
    plain = CPTConfig(batch_size=4, grad_accum=8)  # without it: batch_size x grad_accum x processes
    assert [plain.accumulation(n) for n in (1, 2)] == [8, 8] and plain.sequences_per_step(2) == 64


def test_unusable_inputs_are_input_errors(tmp_path: Path, tiny_model, tok, corpus: str) -> None:
    model = tiny_model(len(tok))
    with pytest.raises(AdaptationInputError, match="positions"):
        run_cpt(model, tok, corpus, config(seq_len=512), str(tmp_path / "a"))
    with pytest.raises(AdaptationInputError, match="does not match"):
        run_cpt(tiny_model(100), tok, corpus, config(), str(tmp_path / "b"))
    with pytest.raises(AdaptationInputError, match="not found"):
        run_cpt(model, tok, str(tmp_path / "missing.jsonl"), config(), str(tmp_path / "c"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("")
    with pytest.raises(AdaptationInputError, match="not empty"):
        run_cpt(model, tok, corpus, config(), str(tmp_path / "d"))


def test_a_non_finite_loss_stops_cpt_and_writes_no_model(tmp_path: Path, tiny_model, tok, corpus: str) -> None:
    model = tiny_model(len(tok))
    with torch.no_grad():
        model.get_input_embeddings().weight[tok.eos_token_id] = float("inf")  # every packed block holds an EOS
    for log_every in (1, 5):  # found at a report, or before a checkpoint between reports
        out = tmp_path / f"log{log_every}"
        with pytest.raises(TrainingDiverged, match="cpt diverged") as caught:
            run_cpt(model, tok, corpus, config(steps=6, log_every=log_every, checkpoint_every=2), str(out))
        assert caught.value.code == "training_diverged"
        assert not (out / "model").exists() and latest_checkpoint(str(out)) is None


# ---- training ----


@pytest.fixture(scope="module")
def thirty_steps(tmp_path_factory: pytest.TempPathFactory, tiny_model, english_byte_level_tokenizer, corpus):
    """embeddings+head on a tied tiny model for 30 steps, reporting every 5."""
    model = tiny_model(len(english_byte_level_tokenizer))
    before = snapshot(model)
    reports: list[dict[str, Any]] = []
    out = tmp_path_factory.mktemp("thirty") / "run"
    cfg = config(steps=30, log_every=5, checkpoint_every=10, keep_checkpoints=2, warmup_steps=3)
    result = run_cpt(model, english_byte_level_tokenizer, corpus, cfg, str(out), progress=reports.append)
    return model, before, reports, result, out


def test_loss_decreases(thirty_steps) -> None:
    _, _, reports, result, _ = thirty_steps
    losses = [r["loss"] for r in reports]
    assert len(losses) == 6
    assert losses[-1] < 0.8 * losses[0], losses
    assert result.final_loss == losses[-1]


def test_embeddings_head_changes_only_the_embeddings(thirty_steps) -> None:
    model, before, _, _, _ = thirty_steps
    after = model.state_dict()
    assert not torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    for name in before:
        if "embed_tokens" not in name and "lm_head" not in name:
            assert torch.equal(after[name], before[name]), name
    assert not model.training and all(p.requires_grad for p in model.parameters())  # put back as it came


def test_progress_reports_and_result(thirty_steps) -> None:
    _, _, reports, result, _ = thirty_steps
    assert [r["step"] for r in reports] == [5, 10, 15, 20, 25, 30]
    for r in reports:
        assert {"step", "total_steps", "loss", "lr", "tokens_per_s"} <= set(r)
        assert r["total_steps"] == 30 and r["tokens_per_s"] > 0 and r["lr"] > 0 and r["loss"] > 0
    assert reports[0]["tokens_seen"] == 5 * 2 * 2 * SEQ
    assert result.steps == 30 and not result.cancelled and result.resumed_from == 0
    assert result.tokens_seen == 30 * 2 * 2 * SEQ and result.tokens_per_s > 0 and result.seconds > 0


def test_output_layout(thirty_steps, tok: PreTrainedTokenizerFast) -> None:
    model, _, _, result, out = thirty_steps
    assert sorted(os.listdir(out / "checkpoints")) == ["step-00000020", "step-00000030"]  # keep_checkpoints=2
    assert latest_checkpoint(str(out)) == str(out / "checkpoints" / "step-00000030") == result.checkpoint_dir
    ckpt = out / "checkpoints" / "step-00000030"
    assert sorted(os.listdir(ckpt)) == [
        "optimizer.pt",
        "rng-0.pt",
        "scheduler.pt",
        "state.json",
        "trainable.safetensors",
    ]
    assert list(load_file(str(ckpt / "trainable.safetensors"))) == ["model.embed_tokens.weight"]  # tied: one matrix
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 30 and state["position"]["target"]["document"] > 0 and state["position"]["blocks"] == 120
    saved = AutoModelForCausalLM.from_pretrained(result.model_dir)
    for name, tensor in model.state_dict().items():
        assert torch.equal(saved.state_dict()[name], tensor), name
    assert json.loads((out / "result.json").read_text())["steps"] == 30


FROZEN_LAYERS = ("self_attn", "mlp", "norm")


@pytest.mark.parametrize("trainable", ["embeddings", "embeddings+head", "lora+head", "full"])
def test_frozen_parameters_stay_bit_identical(tmp_path: Path, tiny_model, tok, corpus: str, trainable: str) -> None:
    model = tiny_model(len(tok), tied=False)
    before = snapshot(model)
    result = run_cpt(model, tok, corpus, config(trainable=trainable), str(tmp_path / "run"))
    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    layers = {name for name in before if name.startswith("model.layers.")}
    projections = {name for name in layers if name.endswith("proj.weight")}
    delta = set(load_file(os.path.join(result.checkpoint_dir, "trainable.safetensors")))
    if trainable == "embeddings":
        assert changed == {"model.embed_tokens.weight"} and delta == changed
    elif trainable == "embeddings+head":
        assert changed == {"model.embed_tokens.weight", "lm_head.weight"} and delta == changed
    elif trainable == "full":
        assert changed == set(before) and len(delta) == len(before)
    else:
        assert changed == {"model.embed_tokens.weight", "lm_head.weight"} | projections  # LoRA merged
        assert all(
            "lora_" in n
            for n in delta - {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"}
        )
        adapter = load_file(os.path.join(result.adapter_dir, "adapter_model.safetensors"))
        assert adapter and all("lora_" in n for n in adapter)  # the layers' delta only, no embeddings
        scale = 32 / 16
        q = "model.layers.0.self_attn.q_proj"
        a, b = (adapter[f"base_model.model.{q}.lora_{x}.weight"] for x in "AB")
        assert torch.allclose(after[f"{q}.weight"], before[f"{q}.weight"] + scale * b @ a, atol=1e-5)


@pytest.mark.parametrize("trainable", ["embeddings+head", "lora+head"])
def test_cancel_then_resume_equals_an_uninterrupted_run(
    tmp_path: Path,
    tiny_model,
    tok: PreTrainedTokenizerFast,
    corpus: str,
    trainable: str,
) -> None:
    initial = tiny_model(len(tok), tied=False)
    cfg = config(trainable=trainable, steps=6, checkpoint_every=2, warmup_steps=2)

    straight = copy.deepcopy(initial)
    run_cpt(straight, tok, corpus, cfg, str(tmp_path / "straight"))

    interrupted = copy.deepcopy(initial)
    polls: list[None] = []

    def should_cancel() -> bool:  # polled after every step
        polls.append(None)
        return len(polls) == 3

    first = run_cpt(interrupted, tok, corpus, cfg, str(tmp_path / "resumed"), should_cancel=should_cancel)
    assert first.cancelled and first.steps == 3 and first.model_dir is None
    assert first.checkpoint_dir == str(tmp_path / "resumed" / "checkpoints" / "step-00000003")
    assert os.listdir(tmp_path / "resumed" / "checkpoints") == ["step-00000003"]
    assert not (tmp_path / "resumed" / "model").exists()

    with pytest.raises(AdaptationInputError, match="differs in lr"):
        run_cpt(
            copy.deepcopy(initial),
            tok,
            corpus,
            config(**{**cfg.model_dump(), "lr": 1.0}),
            str(tmp_path / "resumed"),
            resume=True,
        )

    resumed = copy.deepcopy(initial)  # a new process: the original model loaded again
    second = run_cpt(resumed, tok, corpus, cfg, str(tmp_path / "resumed"), resume=True)
    assert not second.cancelled and second.steps == 6 and second.resumed_from == 3
    assert second.tokens_seen == 6 * 2 * 2 * SEQ
    for name, tensor in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    if trainable == "lora+head":
        a = load_file(str(tmp_path / "straight" / "lora" / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / "resumed" / "lora" / "adapter_model.safetensors"))
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_model_is_left_as_it_came_in_dtype(tmp_path: Path, tiny_model, tok, corpus: str) -> None:
    AcceleratorState._reset_state()
    Accelerator(mixed_precision="bf16")  # another user of accelerate's process-wide state, as a Trainer would be
    model: LlamaForCausalLM = tiny_model(len(tok)).to(torch.bfloat16)
    before = snapshot(model)
    run_cpt(model, tok, corpus, config(steps=2), str(tmp_path / "run"))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, before["model.layers.0.mlp.up_proj.weight"])


def test_a_failing_run_leaves_the_model_as_it_came(tmp_path: Path, tiny_model, tok, corpus: str) -> None:
    model = tiny_model(len(tok))
    names = list(model.state_dict())

    def progress(report: dict[str, Any]) -> None:
        raise RuntimeError("dashboard down")

    with pytest.raises(RuntimeError, match="dashboard down"):
        run_cpt(model, tok, corpus, config(trainable="lora+head"), str(tmp_path / "run"), progress=progress)
    assert list(model.state_dict()) == names  # no LoRA layers left behind
    assert all(p.requires_grad for p in model.parameters()) and not model.training


# ---- keeping what the model knew: row control, source replay, per-group learning rates ----

NEW_ROWS = list(range(900, 1000))  # stand-ins for the tokens the source vocabulary lacks


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("trainable", ["embeddings", "embeddings+head", "lora+head", "full"])
def test_train_rows_new_keeps_every_old_row_bit_identical(
    tmp_path: Path, tiny_model, tok, corpus: str, trainable: str, tied: bool
) -> None:
    model = tiny_model(len(tok), tied=tied)
    before = snapshot(model)
    cfg = config(trainable=trainable, train_rows="new", steps=3, lr=5e-2)
    run_cpt(model, tok, corpus, cfg, str(tmp_path / "run"), new_rows=NEW_ROWS)
    after = model.state_dict()
    old = torch.ones(len(tok), dtype=torch.bool)
    old[NEW_ROWS] = False
    matrices = ["model.embed_tokens.weight"] + ([] if tied else ["lm_head.weight"])
    for name in matrices:
        assert torch.equal(after[name][old], before[name][old]), name  # bit-identical
    assert not torch.equal(after["model.embed_tokens.weight"][NEW_ROWS], before["model.embed_tokens.weight"][NEW_ROWS])
    if not tied and trainable != "embeddings":
        assert not torch.equal(after["lm_head.weight"][NEW_ROWS], before["lm_head.weight"][NEW_ROWS])
    if trainable in ("lora+head", "full"):  # the layers still learn
        assert not torch.equal(after["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])


def test_train_rows_new_needs_the_new_rows(tmp_path: Path, tiny_model, tok, corpus: str) -> None:
    with pytest.raises(AdaptationInputError, match="new tokens"):
        run_cpt(tiny_model(len(tok)), tok, corpus, config(train_rows="new"), str(tmp_path / "run"))


@pytest.fixture(scope="module")
def english_corpus(tmp_path_factory: pytest.TempPathFactory, en_texts: list[str]) -> str:
    path = tmp_path_factory.mktemp("replay") / "en.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in en_texts[:200]), encoding="utf-8")
    return str(path)


def test_replay_mixes_the_source_share_exactly_and_resumes_both_streams(tok, corpus, english_corpus) -> None:
    stream = MixedBlocks(tok, corpus, SEQ, source_path=english_corpus, mix=0.1)
    items = _take(stream, 1000)
    english = PackedBlocks(tok, english_corpus, SEQ)
    source_blocks = {tuple(block) for block, _ in _take(english, 100)}
    from_source = sum(tuple(block) in source_blocks for block, _ in items)
    assert from_source == 100  # exactly a tenth of the tokens over the run (every block has SEQ tokens)
    for n in (10, 100, 537):  # within one block of the share over any prefix
        assert abs(sum(stream.is_source(i) for i in range(n)) - 0.1 * n) <= 1
    for k in (0, 9, 10, 123):  # resuming from any position gives the blocks an uninterrupted stream gives
        resumed = _take(MixedBlocks(tok, corpus, SEQ, source_path=english_corpus, mix=0.1, start=items[k][1]), 12)
        for (a, pa), (b, pb) in zip(resumed, items[k + 1 : k + 13], strict=True):
            assert a.tolist() == b.tolist() and pa == pb
    assert items[-1][1].source.document > 0 and items[-1][1].target.document > 0
    assert StreamPosition.from_dict(json.loads(json.dumps(items[-1][1].to_dict()))) == items[-1][1]


def test_replayed_run_resumes_exactly(tmp_path: Path, tiny_model, tok, corpus, english_corpus) -> None:
    initial = tiny_model(len(tok), tied=False)
    cfg = config(steps=6, checkpoint_every=2, warmup_steps=2, source_mix=0.25, source_corpus=english_corpus)
    straight = copy.deepcopy(initial)
    run_cpt(straight, tok, corpus, cfg, str(tmp_path / "straight"))
    interrupted = copy.deepcopy(initial)
    polls: list[None] = []
    first = run_cpt(
        interrupted,
        tok,
        corpus,
        cfg,
        str(tmp_path / "resumed"),
        should_cancel=lambda: polls.append(None) or len(polls) == 3,
    )
    assert first.cancelled and first.steps == 3
    resumed = copy.deepcopy(initial)
    moved = tmp_path / "elsewhere.jsonl"  # a retry on another machine finds the source text at another path
    moved.write_bytes(Path(english_corpus).read_bytes())
    run_cpt(
        resumed,
        tok,
        corpus,
        cfg.model_copy(update={"source_corpus": str(moved)}),
        str(tmp_path / "resumed"),
        resume=True,
    )
    for name, tensor in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name


def test_learning_rates_per_group(tiny_model, tok) -> None:
    model = tiny_model(len(tok), tied=False)
    cfg = config(trainable="full", lr=1e-3, lr_scale={"embeddings": 2.0, "head": 0.5, "layers": 0.1})
    params = trainable_parameters(apply_trainable(model, cfg.trainable, cfg))
    optimizer = adamw(params, cfg, model=model, fused=False)
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert lr_of[id(model.model.embed_tokens.weight)] == pytest.approx(2e-3)
    assert lr_of[id(model.lm_head.weight)] == pytest.approx(5e-4)
    assert lr_of[id(model.model.layers[0].mlp.up_proj.weight)] == pytest.approx(1e-4)
    assert base_lr(optimizer) == pytest.approx(1e-3)
    with pytest.raises(ValidationError, match="does not train layers"):
        config(trainable="embeddings+head", lr_scale={"layers": 0.5})


# ---- the engine: chunked loss head, compile fallback, frozen weights in bf16 ----


@pytest.mark.parametrize("trainable", ["embeddings+head", "full"])
def test_the_chunked_loss_follows_the_plain_loss_curve_for_50_steps(
    tmp_path: Path, tiny_model, tok, corpus: str, monkeypatch: pytest.MonkeyPatch, trainable: str
) -> None:
    cfg = config(steps=50, log_every=5, warmup_steps=5, trainable=trainable)
    curves = {}
    for path in ("chunked", "plain"):
        if path == "plain":  # the model's own forward: full float32 logits, transformers' cross-entropy
            monkeypatch.setattr(lm_loss, "has_linear_head", lambda model: False)
        reports: list[dict[str, Any]] = []
        run_cpt(tiny_model(len(tok), tied=False), tok, corpus, cfg, str(tmp_path / path), progress=reports.append)
        curves[path] = [r["loss"] for r in reports]
    assert len(curves["chunked"]) == 10
    assert curves["chunked"][-1] < 0.8 * curves["chunked"][0]
    torch.testing.assert_close(curves["chunked"], curves["plain"], rtol=1e-4, atol=1e-5)


def test_a_failed_compilation_falls_back_to_eager(
    tmp_path: Path, tiny_model, tok, corpus: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    eager = run_cpt(tiny_model(len(tok)), tok, corpus, config(steps=3), str(tmp_path / "eager"))

    def broken_compile(module: torch.nn.Module, **_: Any):
        def fails(**__: Any):
            raise RuntimeError("inductor: no C++ compiler")

        return fails

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(UserWarning, match="torch.compile failed"):
        fallback = run_cpt(tiny_model(len(tok)), tok, corpus, config(steps=3, compile=True), str(tmp_path / "c"))
    assert not fallback.compiled and fallback.steps == 3
    assert fallback.first_step_s is not None and fallback.first_step_s > 0
    assert fallback.final_loss == eager.final_loss


def test_frozen_weights_wait_in_float32_and_come_back_bit_identical(tiny_model) -> None:
    model = tiny_model(64, tied=False)
    before = snapshot(model)
    original = OriginalState.capture(model)
    model.requires_grad_(False)
    model.get_input_embeddings().weight.requires_grad_(True)
    original.park_frozen_in_bf16(model)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes["model.embed_tokens.weight"] == torch.float32
    assert dtypes["lm_head.weight"] == dtypes["model.layers.0.mlp.up_proj.weight"] == torch.bfloat16
    original.restore(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())
