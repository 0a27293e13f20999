"""The whole job on tiny real models: stages, manifests, resume after a crash or a cancel, the JSON report."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from langadapt.cli.main import main
from langadapt.core.adaptation import pipeline
from langadapt.core.adaptation.errors import AdaptationInputError, StageCancelled
from langadapt.core.adaptation.events import Event, Progress, StageDone, StageSkipped, StageStarted
from langadapt.core.adaptation.manifest import is_complete
from langadapt.core.adaptation.pipeline import run_pipeline
from langadapt.core.adaptation.sources import load_model, save_pretrained
from langadapt.core.adaptation.spec import AdaptationSpec
from tests.conftest import shared_file

TASKS = ["symbols_per_token", "bits_per_char", "copy_ru", "mc_ruworldtree", "mera_arith", "micro_avg"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model, english_byte_level_tokenizer) -> dict[str, str]:
    root = tmp_path_factory.mktemp("pair")
    base = tiny_model(len(english_byte_level_tokenizer), seed=11)
    instruct = tiny_model(len(english_byte_level_tokenizer), seed=12)
    save_pretrained(base, english_byte_level_tokenizer, str(root / "base"))
    save_pretrained(instruct, english_byte_level_tokenizer, str(root / "instruct"))
    return {"base": str(root / "base"), "instruct": str(root / "instruct")}


def _spec(models: dict[str, str], ru_corpus: str, *, instruct: bool = True, **overrides) -> AdaptationSpec:
    lep = {"instruct_model": models["instruct"], "propagation": {"variant": ["swap", "overlap", "conversion"]}}
    body = {
        "base_model": models["base"],
        **(lep if instruct else {}),
        "corpus": ru_corpus,
        "heldout": str(shared_file("ru/taiga_devtest.jsonl")),
        "vocab": {"method": "extended", "new_tokens": 1200, "train_chars": 150_000},
        "cpt": {"steps": 6, "seq_len": 64, "batch_size": 2, "grad_accum": 1, "warmup_steps": 2, "checkpoint_every": 3},
        "evaluation": {
            "tasks": TASKS,
            "limit": 3,
            "heldout_chars": 4000,
            "mera_dir": str(shared_file("eval/mera")),
        },
        **overrides,
    }
    return AdaptationSpec.model_validate(body)


def test_full_job_runs_every_stage_and_resumes_without_rework(tmp_path, models, ru_corpus) -> None:
    spec = _spec(models, ru_corpus)
    events: list[Event] = []
    report = run_pipeline(spec, str(tmp_path / "run"), emit=events.append)
    names = [s["stage"] for s in report.stages]
    assert names == [
        "tokenizer",
        "init",
        "cpt",
        "propagate:swap",
        "propagate:overlap",
        "propagate:conversion",
        "evaluate",
    ]
    assert all(s["seconds"] >= 0 and not s.get("skipped") for s in report.stages)
    assert all(is_complete(str(tmp_path / "run" / n.replace(":", "-")), verify_hashes=True) for n in names)
    cpt = report.stages[2]
    assert cpt["steps"] == 6 and cpt["tokens_seen"] == 6 * 2 * 64
    # typed events: every stage starts and ends; CPT and evaluation report progress with a total and an ETA
    assert [e.stage for e in events if isinstance(e, StageStarted)] == names
    assert [e.stage for e in events if isinstance(e, StageDone)] == names
    cpt_progress = [e for e in events if isinstance(e, Progress) and e.stage == "cpt"]
    assert cpt_progress[-1].step == cpt_progress[-1].total == 6 and cpt_progress[-1].unit == "steps"
    assert "loss" in cpt_progress[-1].data and cpt_progress[-1].eta_s == 0
    evaluated = [e for e in events if isinstance(e, Progress) and e.stage == "evaluate"]
    for model in ("original", "propagated:conversion"):
        for task in ("bits_per_char", "copy_ru", "mc_ruworldtree", "mera_arith"):
            reports = [e for e in evaluated if e.data == {"model": model, "task": task}]
            assert reports[0].step == 0 and reports[-1].step == reports[-1].total > 0, (model, task)
    assert any(isinstance(e, Progress) and e.stage == "tokenizer" and e.step > 100_000 for e in events)
    assert [e.data["phase"] for e in events if isinstance(e, Progress) and e.stage == "init"][0] == "load"
    models_scored = {row["model"] for row in report.scores}
    assert models_scored == {"original", "propagated:swap", "propagated:overlap", "propagated:conversion"}
    for label in models_scored:
        rows = {(r["task"], r["metric"]): r for r in report.scores if r["model"] == label}
        assert rows[("mc_ruworldtree", "accuracy")]["n"] == 3 and 0 <= rows[("micro_avg", "mean")]["value"] <= 1
        assert rows[("bits_per_char", "target")]["value"] > 0
    spt = {r["model"]: r["value"] for r in report.scores if r["task"] == "symbols_per_token"}
    assert spt["propagated:conversion"] > 1.3 * spt["original"]  # the new vocabulary is denser on Russian

    skipped: list[Event] = []
    again = run_pipeline(spec, str(tmp_path / "run"), emit=skipped.append)
    assert all(s["skipped"] for s in again.stages) and again.scores == report.scores
    assert skipped == [StageSkipped(name) for name in names]

    shutil.rmtree(tmp_path / "run" / "evaluate")
    os.remove(tmp_path / "run" / "propagate-overlap" / "model.safetensors")  # damaged output is redone
    third = run_pipeline(spec, str(tmp_path / "run"))
    redone = [s["stage"] for s in third.stages if not s.get("skipped")]
    assert redone == ["propagate:overlap", "evaluate"]


def test_cancelled_cpt_resumes_from_its_checkpoint(tmp_path, models, ru_corpus) -> None:
    spec = _spec(models, ru_corpus, instruct=False, evaluation={"tasks": ["bits_per_char"], "heldout_chars": 2000})
    steps: list[int] = []

    def cancel_after_three() -> bool:
        steps.append(1)
        return len(steps) >= 3 + 3  # polled before each of tokenizer, init, cpt, then once per CPT step

    with pytest.raises(StageCancelled, match="step 3"):
        run_pipeline(spec, str(tmp_path / "run"), should_cancel=cancel_after_three)
    assert not (tmp_path / "run" / "cpt").exists() and (tmp_path / "run" / "cpt.work").exists()
    report = run_pipeline(spec, str(tmp_path / "run"))
    by_name = {s["stage"]: s for s in report.stages}
    assert by_name["tokenizer"]["skipped"] and by_name["init"]["skipped"]
    assert by_name["cpt"]["resumed_from"] == 3 and by_name["cpt"]["steps"] == 6
    assert not (tmp_path / "run" / "cpt.work").exists()
    assert {r["model"] for r in report.scores} == {"original", "adapted"}  # no instruct model: no propagation


def test_cli_run_prints_the_report(tmp_path, models, ru_corpus, capsys) -> None:
    spec = _spec(models, ru_corpus, instruct=False, evaluation={"tasks": ["symbols_per_token"], "heldout_chars": 2000})
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    assert main(["run", str(spec_path), "--out", str(tmp_path / "run")]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out.strip().splitlines()[-1])
    assert [s["stage"] for s in report["stages"]] == ["tokenizer", "init", "cpt", "evaluate"]
    assert "[cpt] 6/6 steps eta 0 s loss" in captured.err and "[evaluate] done in" in captured.err

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**spec.model_dump(mode="json"), "evaluation": {"tasks": ["mc_ruworldtree"]}}))
    assert main(["run", str(bad), "--out", str(tmp_path / "run2")]) == 2
    assert "mera_dir" in capsys.readouterr().err and not (tmp_path / "run2").exists()
    missing = tmp_path / "missing.yaml"
    missing.write_text(yaml.safe_dump({**spec.model_dump(mode="json"), "instruct_model": str(tmp_path / "nope")}))
    assert main(["run", str(missing), "--out", str(tmp_path / "run3")]) == 2  # found before any stage runs
    assert "nope" in capsys.readouterr().err and not (tmp_path / "run3").exists()


def test_lora_cpt_delta_reaches_the_instruct_model(tmp_path, models, ru_corpus) -> None:
    spec = _spec(
        models,
        ru_corpus,
        cpt={"trainable": "lora+head", "steps": 2, "seq_len": 32, "batch_size": 2, "grad_accum": 1, "warmup_steps": 0},
        propagation={"variant": "swap", "lora_scale": 0.5},
        evaluation={"tasks": ["symbols_per_token"], "heldout_chars": 2000},
    )
    report = run_pipeline(spec, str(tmp_path / "run"))
    propagated = next(s for s in report.stages if s["stage"] == "propagate:swap")
    assert propagated["lora_modules_merged"] == 14 and propagated["lora_scale"] == 0.5
    assert (tmp_path / "run" / "cpt" / "lora_adapter" / "adapter_config.json").exists()


def test_calibration_stages_follow_propagation(tmp_path, models, ru_corpus) -> None:
    spec = _spec(
        models,
        ru_corpus,
        cpt={"steps": 2, "seq_len": 32, "batch_size": 2, "grad_accum": 1, "warmup_steps": 0},
        propagation={"variant": ["swap", "conversion"]},
        calibration={
            "method": "self+copy",
            "self_calibration_examples": 4,
            "copy_examples": 3,
            "max_new_tokens": 8,
            "batch_size": 4,
            "sft": {"batch_size": 4, "grad_accum": 1, "max_len": 160, "lr": 1e-3},
        },
        evaluation={"tasks": ["bits_per_char"], "heldout_chars": 2000},
    )
    report = run_pipeline(spec, str(tmp_path / "run"))
    by_name = {s["stage"]: s for s in report.stages}
    assert list(by_name)[-4:] == ["calibration-data", "calibrate:swap", "calibrate:conversion", "evaluate"]
    data = by_name["calibration-data"]
    assert data["prompts"] == 4 and data["generated"] == 4 and data["copy_examples"] == 3
    assert data["examples"] == data["kept"] + 3
    assert by_name["calibrate:conversion"]["steps"] >= 1
    assert {r["model"] for r in report.scores} == {
        "original",
        "propagated:swap",
        "propagated:conversion",
        "calibrated:swap",
        "calibrated:conversion",
    }
    assert (tmp_path / "run" / "calibration.cache.jsonl").exists()  # answers of I, reused by later runs


def test_stage_hook_and_cancel_between_stages(tmp_path, models, ru_corpus) -> None:
    spec = _spec(models, ru_corpus, instruct=False, evaluation={"tasks": ["symbols_per_token"], "heldout_chars": 2000})
    with pytest.raises(StageCancelled, match="before stage 'tokenizer'"):
        run_pipeline(spec, str(tmp_path / "run"), should_cancel=lambda: True)
    assert not (tmp_path / "run" / "tokenizer").exists()
    completed: list[tuple[str, bool]] = []
    run_pipeline(
        spec,
        str(tmp_path / "run"),
        on_stage_complete=lambda stage, path: completed.append((stage, is_complete(path))),
    )
    assert completed == [("tokenizer", True), ("init", True), ("cpt", True), ("evaluate", True)]


def test_forward_only_stages_load_their_models_on_the_compute_device(monkeypatch, tmp_path, models, ru_corpus):
    """The evaluate and calibration-data stages place each model where `compute_device()` says, in
    `inference_dtype`; `cpu:0` stands in for a GPU (a device distinct from the default `cpu`)."""
    target = torch.device("cpu", 0)
    placed: list[tuple[str, torch.device, torch.dtype]] = []

    def spy(spec: str, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        placed.append((spec, torch.device(device), dtype))
        return load_model(spec, dtype=dtype, device=device)

    monkeypatch.setattr(pipeline, "compute_device", lambda: target)
    monkeypatch.setattr(pipeline, "load_model", spy)
    spec = _spec(
        models,
        ru_corpus,
        cpt={"steps": 1, "seq_len": 32, "batch_size": 1, "grad_accum": 1},
        propagation={"variant": "swap"},
        calibration={
            "method": "self+copy",
            "self_calibration_examples": 2,
            "copy_examples": 1,
            "max_new_tokens": 4,
            "passage_max_chars": 60,
            "passage_min_chars": 20,
            "sft": {"batch_size": 2, "grad_accum": 1, "max_len": 160},
        },
        evaluation={"tasks": ["bits_per_char"], "limit": 1, "heldout_chars": 500},
    )
    pipeline.run_pipeline(spec, str(tmp_path / "run"))
    forward_only = [(spec, device) for spec, device, _ in placed if device == target]
    loaded = [spec for spec, _, _ in placed]
    assert models["instruct"] in loaded  # calibration answers and the original model's evaluation
    evaluated = {str(tmp_path / "run" / name) for name in ("propagate-swap", "calibrate-swap")} | {models["instruct"]}
    assert evaluated <= {spec for spec, _ in forward_only}
    assert all(dtype == torch.float32 for _, _, dtype in placed)  # the CPU's inference dtype


def test_an_instruct_model_adapted_directly_is_calibrated(tmp_path, models, ru_corpus) -> None:
    """No separate instruct model: CPT keeps the old rows, and calibration trains the CPT output on the base's own
    answers (the base is the instruct model being adapted)."""
    spec = _spec(
        models,
        ru_corpus,
        instruct=False,
        cpt={"steps": 2, "seq_len": 32, "batch_size": 2, "grad_accum": 1, "lr": 1e-2, "train_rows": "new"},
        calibration={
            "method": "self+copy",
            "self_calibration_examples": 3,
            "copy_examples": 2,
            "max_new_tokens": 8,
            "passage_max_chars": 60,
            "passage_min_chars": 20,
            "sft": {"batch_size": 2, "grad_accum": 1, "max_len": 160, "lr": 1e-3},
        },
        evaluation={"tasks": ["bits_per_char"], "limit": 1, "heldout_chars": 500},
    )
    report = run_pipeline(spec, str(tmp_path / "run"))
    names = [s["stage"] for s in report.stages]
    assert names == ["tokenizer", "init", "cpt", "calibration-data", "calibrate", "evaluate"]
    assert {r["model"] for r in report.scores} == {"original", "adapted", "calibrated"}
    initialised = load_model(str(tmp_path / "run" / "init"))[0].get_input_embeddings().weight
    trained = load_model(str(tmp_path / "run" / "cpt"))[0].get_input_embeddings().weight
    new = json.loads((tmp_path / "run" / "init" / "new_token_ids.json").read_text())
    old = torch.ones(len(initialised), dtype=torch.bool)
    old[new] = False
    assert len(new) > 100 and torch.equal(trained[old], initialised[old])  # cpt.train_rows: new
    assert not torch.equal(trained[new], initialised[new])
    calibrated = load_model(str(tmp_path / "run" / "calibrate"))[0].get_input_embeddings().weight
    assert not torch.equal(calibrated, trained)


def test_calibration_needs_a_chat_template(tmp_path, models, ru_corpus, tiny_model, english_byte_level_tokenizer):
    plain = english_byte_level_tokenizer.__class__(tokenizer_object=english_byte_level_tokenizer.backend_tokenizer)
    plain.eos_token = "<|im_end|>"
    save_pretrained(tiny_model(len(plain)), plain, str(tmp_path / "plain"))
    spec = _spec(
        {**models, "base": str(tmp_path / "plain")},
        ru_corpus,
        instruct=False,
        calibration={"method": "self+copy"},
    )
    with pytest.raises(AdaptationInputError, match="no chat template"):
        run_pipeline(spec, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "tokenizer").exists()  # refused before any stage ran


def test_an_auxiliary_init_caches_its_space_in_the_run_directory(tmp_path, models, ru_corpus) -> None:
    init = {"method": "regression", "auxiliary": {"dim": 16, "epochs": 1, "train_chars": 150_000}}
    spec = _spec(
        models, ru_corpus, instruct=False, init=init, evaluation={"tasks": ["symbols_per_token"], "heldout_chars": 2000}
    )
    report = run_pipeline(spec, str(tmp_path / "run"))
    cached = list((tmp_path / "run" / "init.aux").glob("auxiliary-*.npz"))
    assert len(cached) == 1
    init_stage = next(stage for stage in report.stages if stage["stage"] == "init")
    assert 0.25 <= init_stage["new_row_scale"] <= 1.25  # regression fits its rows' scale by default
    assert init_stage["scale_fit_bits_per_char"] <= init_stage["unscaled_bits_per_char"]
    shutil.rmtree(tmp_path / "run" / "init")  # a retry of the init stage reads the cached space
    before = cached[0].stat().st_mtime_ns
    run_pipeline(spec, str(tmp_path / "run"))
    assert cached[0].stat().st_mtime_ns == before and is_complete(str(tmp_path / "run" / "init"))


@pytest.mark.slow
def test_cpt_on_two_processes_gives_the_one_process_model(tmp_path, models, ru_corpus) -> None:
    """resources.gpus 2: the pipeline runs CPT under torchrun (2 gloo processes here, DDP) at the same global batch
    as one process, and the adapted model is the same."""
    cpt = {"steps": 4, "seq_len": 64, "batch_size": 1, "global_batch": 4, "warmup_steps": 1, "checkpoint_every": 2}
    evaluation = {"tasks": ["symbols_per_token"], "heldout_chars": 2000}
    reports = {}
    for gpus in (1, 2):
        resources = {"gpus": gpus, "strategy": "ddp"}
        spec = _spec(models, ru_corpus, instruct=False, cpt=cpt, evaluation=evaluation, resources=resources)
        reports[gpus] = run_pipeline(spec, str(tmp_path / f"run{gpus}"))
    cpt_stage = {gpus: next(s for s in report.stages if s["stage"] == "cpt") for gpus, report in reports.items()}
    assert cpt_stage[1]["steps"] == cpt_stage[2]["steps"] == 4
    one = load_file(str(tmp_path / "run1" / "cpt" / "model.safetensors"))
    two = load_file(str(tmp_path / "run2" / "cpt" / "model.safetensors"))
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-6)
