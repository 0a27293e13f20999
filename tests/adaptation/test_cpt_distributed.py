"""CPT on two CPU processes (torchrun, gloo) against one process at the same global batch: DDP and FSDP2 for the four
trainable sets on tiny tied and untied Llamas, distributed checkpoints (cancel, resume, a world-size change refused),
the export, and the launcher's failure handling (a rank that dies, a rank's input error).

Tolerance: DDP all-reduces the summed gradients of the same sequences, which came out bit-identical here; FSDP2
reduce-scatters after every micro-batch (a different summation order), so its weights may differ from one process's
by float32 rounding, amplified by AdamW's normalisation: within 2e-5 (weights of about 0.5; seen: at most 6e-6)
and losses within a relative 1e-5, while training moves the weights by more than 1e-3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from langadapt.core.adaptation.config import CPTConfig
from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.core.adaptation.train import launch
from langadapt.core.adaptation.train.launch import CPTLaunch, RankFailure, launch_cpt, run_request

SEQ = 16
NEW_ROWS = list(range(900, 1000))  # stand-ins for the tokens the source vocabulary lacks
TRAINABLE = ("embeddings", "embeddings+head", "lora+head", "full")
ROWS = {"embeddings": "all", "embeddings+head": "new", "lora+head": "all", "full": "new"}  # FrozenRows under both
WEIGHT_ATOL = 2e-5
STRAIGHT = {"steps": 6}


@pytest.fixture(scope="module")
def inputs(
    tmp_path_factory: pytest.TempPathFactory, tiny_model, english_byte_level_tokenizer, ru_texts: list[str]
) -> dict[str, str]:
    """A tokenizer, a tied and an untied tiny Llama saved as HF directories, and ~20 K characters of Russian."""
    root = tmp_path_factory.mktemp("dist-inputs")
    tok: PreTrainedTokenizerFast = english_byte_level_tokenizer
    tok.save_pretrained(root / "tokenizer")
    for tied in (True, False):
        model = tiny_model(len(tok), tied=tied)
        model.save_pretrained(root / ("tied" if tied else "untied"))
        tok.save_pretrained(root / ("tied" if tied else "untied"))
    paragraphs = [p.strip() for text in ru_texts for p in text.split("\n") if p.strip()]
    docs, chars = [], 0
    for paragraph in paragraphs:
        docs.append(paragraph)
        chars += len(paragraph)
        if chars > 20_000:
            break
    corpus = root / "ru.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return {
        "tokenizer": str(root / "tokenizer"),
        "tied": str(root / "tied"),
        "untied": str(root / "untied"),
        "corpus": str(corpus),
    }


def config(trainable: str, **overrides: Any) -> CPTConfig:
    values: dict[str, Any] = dict(
        trainable=trainable,
        train_rows=ROWS[trainable],
        steps=4,
        seq_len=SEQ,
        batch_size=2,
        global_batch=4,  # 1 process: 2 micro-batches of 2 per step; 2 processes: 1 each
        lr=1e-2,
        warmup_steps=1,
        log_every=2,
        checkpoint_every=2,
    )
    return CPTConfig(**{**values, **overrides})


def request(
    inputs: dict[str, str], out_dir: Path, trainable: str, *, tied: bool, strategy: str, **kw: Any
) -> CPTLaunch:
    cfg = config(trainable, **kw.pop("cfg", {}))
    return CPTLaunch(
        model=inputs["tied" if tied else "untied"],
        tokenizer=inputs["tokenizer"],
        corpus=inputs["corpus"],
        config=cfg,
        out_dir=str(out_dir),
        new_rows=NEW_ROWS if cfg.train_rows == "new" else None,
        strategy=strategy,
        **kw,
    )


CASES = [(False, t, s) for t in TRAINABLE for s in ("ddp", "fsdp2")] + [
    (True, "embeddings+head", "ddp"),
    (True, "embeddings+head", "fsdp2"),
    (True, "full", "fsdp2"),
]


INTERRUPTED = [(False, "full", "ddp"), (False, "lora+head", "ddp"), (False, "lora+head", "fsdp2")]


def case_dir(root: Path, tied: bool, trainable: str, strategy: str, suffix: str = "") -> Path:
    return root / f"{'tied' if tied else 'untied'}-{trainable}-{strategy}{suffix}"


@pytest.fixture(scope="module")
def runs(inputs: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every case on two processes in one torchrun launch, then the references on one process (in this one)."""
    root = tmp_path_factory.mktemp("dist-runs")
    runs = [
        {"request": request(inputs, case_dir(root, *case), case[1], tied=case[0], strategy=case[2]), "interrupt": False}
        for case in CASES
    ]
    for case in INTERRUPTED:  # cancelled at step 2 and resumed, in the same launch
        out = case_dir(root, *case, "-interrupted")
        runs.append({"request": request(inputs, out, case[1], tied=case[0], strategy=case[2]), "interrupt": True})
    straight = case_dir(root, False, "straight", "fsdp2")  # for the failing run
    runs.append(
        {"request": request(inputs, straight, "full", tied=False, strategy="fsdp2", cfg=STRAIGHT), "interrupt": False}
    )
    (root / "requests.json").write_text(
        json.dumps([{**r, "request": r["request"].model_dump(mode="json")} for r in runs]), encoding="utf-8"
    )
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        str(Path(__file__).with_name("cpt_batch.py")), str(root / "requests.json"),
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for tied, trainable in {(tied, trainable) for tied, trainable, _ in CASES}:
        run_request(request(inputs, case_dir(root, tied, trainable, "one"), trainable, tied=tied, strategy="ddp"))
    return root


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def result(run: Path) -> dict[str, Any]:
    return json.loads((run / "result.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize(("tied", "trainable", "strategy"), CASES)
def test_two_processes_compute_what_one_does(runs: Path, inputs, tied: bool, trainable: str, strategy: str) -> None:
    two, one = case_dir(runs, tied, trainable, strategy), case_dir(runs, tied, trainable, "one")
    assert result(two)["processes"] == 2 and result(one)["processes"] == 1
    assert result(two)["tokens_seen"] == result(one)["tokens_seen"] == 4 * 4 * SEQ  # the same global batch
    assert result(two)["final_loss"] == pytest.approx(result(one)["final_loss"], rel=1e-5)
    a, b = weights(two), weights(one)
    initial = load_file(os.path.join(inputs["tied" if tied else "untied"], "model.safetensors"))
    assert a.keys() == b.keys() == initial.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=WEIGHT_ATOL, msg=name)
    embeddings = "model.embed_tokens.weight"
    assert (a[embeddings] - initial[embeddings]).abs().max() > 1e-3  # it trained: the tolerance is meaningful
    if strategy == "ddp":
        assert all(torch.equal(a[name], b[name]) for name in a)
    if ROWS[trainable] == "new":  # the old rows of the embeddings (and of an untied head) stay bit-identical
        old = torch.ones(a[embeddings].shape[0], dtype=torch.bool)
        old[NEW_ROWS] = False
        for name in {embeddings, "lm_head.weight"} & a.keys():
            assert torch.equal(a[name][old], initial[name][old]), name
    frozen_layers = trainable in ("embeddings", "embeddings+head")
    assert frozen_layers == all(torch.equal(a[n], initial[n]) for n in a if n.startswith("model.layers."))


@pytest.mark.parametrize(("tied", "trainable", "strategy"), INTERRUPTED)
def test_cancel_and_resume_on_two_processes_equals_the_uninterrupted_run(
    runs: Path, tied: bool, trainable: str, strategy: str
) -> None:
    interrupted = case_dir(runs, tied, trainable, strategy, "-interrupted")
    assert result(interrupted)["resumed_from"] == 2 and result(interrupted)["steps"] == 4
    straight, resumed = weights(case_dir(runs, tied, trainable, strategy)), weights(interrupted)
    assert all(torch.equal(resumed[name], straight[name]) for name in straight)
    if trainable == "lora+head":
        a, b = (
            load_file(str(run / "lora" / "adapter_model.safetensors"))
            for run in (case_dir(runs, tied, trainable, strategy), interrupted)
        )
        assert a and all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize(
    ("trainable", "strategy"), [("embeddings+head", "fsdp2"), ("full", "fsdp2"), ("embeddings+head", "ddp")]
)
def test_a_tied_model_stays_tied(runs: Path, trainable: str, strategy: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(case_dir(runs, True, trainable, strategy) / "model")
    assert model.config.tie_word_embeddings
    assert torch.equal(model.get_input_embeddings().weight, model.get_output_embeddings().weight)
    assert "lm_head.weight" not in weights(case_dir(runs, True, trainable, strategy))  # saved once


@pytest.mark.parametrize("trainable", TRAINABLE)
def test_the_export_is_the_gathered_trainable_state(runs: Path, tmp_path: Path, trainable: str) -> None:
    """The last distributed checkpoint (each rank's shards) read back in one process equals the exported model."""
    run = case_dir(runs, False, trainable, "fsdp2")
    checkpoint = run / "checkpoints" / "step-00000004"
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "rng-0.pt", "rng-1.pt"} <= set(os.listdir(checkpoint))
    dcp_to_torch_save(str(checkpoint), str(tmp_path / "state.pt"))
    saved = torch.load(tmp_path / "state.pt", weights_only=False)
    trainable_state = {name.removeprefix("model."): t for name, t in saved["model"].items()}
    exported = weights(run)
    if trainable == "lora+head":
        assert all("lora_" in n for n in trainable_state if "embed_tokens" not in n and "lm_head" not in n)
        adapter = load_file(str(run / "lora" / "adapter_model.safetensors"))
        for name, tensor in adapter.items():  # base_model.model.X.lora_A.weight <- X.lora_A.default.weight
            key = name.removeprefix("base_model.model.").replace(".weight", ".default.weight")
            assert torch.equal(tensor, trainable_state[key]), name
        trainable_state = {n: t for n, t in trainable_state.items() if "lora_" not in n}
    assert trainable_state and set(trainable_state) <= set(exported)
    for name, tensor in trainable_state.items():
        assert torch.equal(exported[name], tensor), name
    assert saved["optimizer"]["state"]  # AdamW's moments are in the checkpoint too


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and launch.process_alive(int(pid)):
            found.append(int(pid))
    return found


def test_rank_failure_then_cancel_then_resume_equals_the_uninterrupted_run(
    runs: Path, inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One run of 6 steps, checkpoints every 2, on two processes: rank 1 dies after the first checkpoint (the run
    fails, no process is left); the retry resumes from step 2 and is cancelled at its first log step (4); the next
    resumes from step 4 and finishes. Its weights are those of the uninterrupted run, bit for bit."""
    out = tmp_path / "run"
    failing = request(inputs, out, "full", tied=False, strategy="fsdp2", cfg=STRAIGHT)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # the launch folder, named in every rank's command line
    with monkeypatch.context() as patch:
        patch.setenv(launch.FAIL_RANK_ENV, "1")  # rank 1 exits once the first checkpoint is written
        started = time.monotonic()
        with pytest.raises(RankFailure, match="exit code"):
            launch_cpt(failing, nproc=2)
    assert time.monotonic() - started < 300
    assert _processes_mentioning(str(tmp_path)) == []
    assert os.listdir(out / "checkpoints") == ["step-00000002"]

    retry = failing.model_copy(update={"resume": True})
    reports: list[dict[str, Any]] = []
    cancelled = launch_cpt(retry, nproc=2, progress=reports.append, should_cancel=lambda: True, poll_s=0.05)
    assert cancelled.cancelled and cancelled.resumed_from == 2 and cancelled.steps == 4  # the first log step
    assert [r["step"] for r in reports] == [4] and cancelled.model_dir is None and not (out / "model").exists()
    assert os.listdir(out / "checkpoints") == ["step-00000004"]

    with pytest.raises(AdaptationInputError, match="ran on 2 processes, this run has 1") as refused:
        launch_cpt(retry, nproc=1)
    assert refused.value.code == "world_size_changed"

    finished = launch_cpt(retry, nproc=2)
    assert not finished.cancelled and finished.steps == 6 and finished.resumed_from == 4
    assert finished.tokens_seen == 6 * 4 * SEQ
    straight, resumed = weights(case_dir(runs, False, "straight", "fsdp2")), weights(out)
    assert all(torch.equal(resumed[name], straight[name]) for name in straight)
    assert _processes_mentioning(str(tmp_path)) == []


@pytest.mark.slow  # a launch of two processes (about 10 s of start-up) for one error path
def test_a_ranks_input_error_is_an_input_error(inputs, tmp_path: Path) -> None:
    bad = request(inputs, tmp_path / "run", "embeddings", tied=True, strategy="ddp", cfg={"global_batch": 2})
    with pytest.raises(AdaptationInputError, match="global_batch") as refused:
        launch_cpt(bad, nproc=2)  # 2 sequences cannot be micro-batches of 2 on each of 2 processes
    assert refused.value.code == "invalid_global_batch"
    assert not (tmp_path / "run").exists()  # refused before anything was written
