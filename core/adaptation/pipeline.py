"""The adaptation job as an ordered graph of resumable stages.

    tokenizer -> init -> cpt -> propagate:<variant>... -> [calibration-data -> calibrate:<variant>...] -> evaluate

Without an instruct model the base is adapted alone, and calibration (when asked for) calibrates the CPT output
itself: `cpt -> calibration-data -> calibrate -> evaluate`, the answers coming from the original base (an instruct
model adapted directly).

Each stage writes into `<run_dir>/<stage>/` through a temporary directory renamed into place, then a manifest
(sha256 and size per file). A stage whose directory is complete is skipped, so re-running a spec over the same run
directory resumes where it stopped; CPT additionally resumes from its last step checkpoint, kept outside its stage
directory (`rundir.py` names every path).

Each stage reads its one configuration object from the spec (`config.py`) and reports typed events (`events.py`).
Models run on `device.compute_device()`: forward-only stages (calibration answers, evaluation) in
`inference_dtype`, training stages with fp32 master weights.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from langadapt.core.adaptation.calibration import build_calibration_set, save_examples
from langadapt.core.adaptation.config import Variant
from langadapt.core.adaptation.corpus import iter_documents, require_documents
from langadapt.core.adaptation.device import compute_device, inference_dtype
from langadapt.core.adaptation.errors import AdaptationInputError, StageCancelled
from langadapt.core.adaptation.evaluate import EvalData, evaluate
from langadapt.core.adaptation.evaluate.generation import has_chat_template
from langadapt.core.adaptation.events import (
    EventSink,
    Message,
    ProgressMeter,
    StageDone,
    StageSkipped,
    StageStarted,
    ignore,
)
from langadapt.core.adaptation.manifest import is_complete, read_manifest, write_manifest
from langadapt.core.adaptation.propagate import propagate_saved
from langadapt.core.adaptation.rundir import (
    AUXILIARY_CACHE,
    CALIBRATION_CACHE,
    CPT_WORK,
    LORA_ADAPTER,
    NEW_TOKENS,
    STAGE_INFO,
    stage_dirname,
)
from langadapt.core.adaptation.sources import load_model, load_tokenizer, resolve, save_pretrained
from langadapt.core.adaptation.spec import AdaptationSpec
from langadapt.core.adaptation.surgery import change_vocabulary
from langadapt.core.adaptation.task_names import MERA_TASKS
from langadapt.core.adaptation.train.launch import CPTLaunch, launch_cpt
from langadapt.core.adaptation.train.sft import run_sft
from langadapt.core.adaptation.vocab import build_vocab

PROGRESS_INTERVAL_S = 2.0  # at most one progress event per loop this often (training reports every log_every)


@dataclass
class RunContext:
    spec: AdaptationSpec
    run_dir: str
    emit: EventSink
    should_cancel: Callable[[], bool] = lambda: False

    def path(self, stage: str) -> str:
        return os.path.join(self.run_dir, stage_dirname(stage))

    def meter(self, stage: str, total: int | None, unit: str, interval_s: float = PROGRESS_INTERVAL_S) -> ProgressMeter:
        return ProgressMeter(self.emit, stage, total, unit, min_interval_s=interval_s)


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[RunContext, str], dict[str, Any]]  # (context, temporary output dir) -> stage info


@dataclass
class PipelineReport:
    run_dir: str
    stages: list[dict[str, Any]] = field(default_factory=list)
    scores: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": self.run_dir, "stages": self.stages, "scores": self.scores}


def _steps_to(meter: ProgressMeter) -> Callable[[dict[str, Any]], None]:
    """A training loop's `{step, total_steps, loss, ...}` reports as progress events."""

    def report(metrics: dict[str, Any]) -> None:
        meter.total = int(metrics["total_steps"])
        meter(int(metrics["step"]), **{k: v for k, v in metrics.items() if k not in ("step", "total_steps")})

    return report


def _tokenizer_stage(ctx: RunContext, out: str) -> dict[str, Any]:
    config = ctx.spec.vocab
    meter = ctx.meter("tokenizer", config.train_chars, "chars")
    result = build_vocab(
        load_tokenizer(ctx.spec.base_model), ctx.spec.corpus, config, heldout=ctx.spec.heldout, progress=meter
    )
    result.save(out)
    return result.report.to_dict()


def _init_stage(ctx: RunContext, out: str) -> dict[str, Any]:
    """The model is read on the CPU; the row arithmetic and the scale fit's forward passes run on the compute
    device."""
    meter = ctx.meter("init", 3, "phases", interval_s=0)
    meter(0, phase="load")
    model, tokenizer = load_model(ctx.spec.base_model)
    new_tokenizer = load_tokenizer(ctx.path("tokenizer"))
    meter(1, phase="initialise new rows")
    config = ctx.spec.init
    if config.cache_dir is None:
        config = config.model_copy(update={"cache_dir": ctx.path(AUXILIARY_CACHE)})

    def scale_trial(done: int, total: int) -> None:
        meter(1, phase="fit the new rows' scale", trial=done, trials=total)

    change = change_vocabulary(
        model, tokenizer, new_tokenizer, config, corpus=ctx.spec.corpus, scale_progress=scale_trial
    )
    meter(2, phase="save")
    save_pretrained(model, new_tokenizer, out)
    with open(os.path.join(out, NEW_TOKENS), "w", encoding="utf-8") as handle:
        json.dump(change.mapping.new_ids, handle)
    meter(3, phase="saved")
    report: dict[str, Any] = {
        "copied_tokens": len(change.mapping.overlap),
        "initialised_tokens": len(change.mapping.new_ids),
        "new_row_scale": round(change.scale, 4),
    }
    if change.scale_fit is not None:
        report["scale_fit_bits_per_char"] = round(change.scale_fit.bits_per_char, 4)
        report["unscaled_bits_per_char"] = round(change.scale_fit.unscaled_bits_per_char, 4)
    return report


def _cpt_stage(ctx: RunContext, out: str) -> dict[str, Any]:
    """Continued pretraining of the initialised model; its step checkpoints live in `cpt.work/` across runs."""
    with open(os.path.join(ctx.path("init"), NEW_TOKENS), encoding="utf-8") as handle:
        new_rows = json.load(handle)
    work = ctx.path(CPT_WORK)
    meter = ctx.meter("cpt", ctx.spec.cpt.steps, "steps", interval_s=0)  # the loop reports every log_every steps
    resources = ctx.spec.resources
    request = CPTLaunch(
        model=ctx.path("init"),
        tokenizer=ctx.path("init"),
        corpus=ctx.spec.corpus,
        config=ctx.spec.cpt,
        out_dir=work,
        new_rows=new_rows,
        resume=True,
        strategy=resources.strategy or "fsdp2",
    )
    # One GPU: in this process; several: `torchrun` ranks in their own process session.
    result = launch_cpt(request, nproc=resources.gpus, progress=_steps_to(meter), should_cancel=ctx.should_cancel)
    if result.cancelled:
        raise StageCancelled(f"cpt cancelled at step {result.steps}")
    assert result.model_dir is not None
    for name in os.listdir(result.model_dir):
        shutil.move(os.path.join(result.model_dir, name), out)
    if result.adapter_dir is not None:
        shutil.move(result.adapter_dir, os.path.join(out, LORA_ADAPTER))
    shutil.rmtree(work)  # the stage's output is complete: the checkpoints have served
    return {
        "steps": result.steps,
        "tokens_seen": result.tokens_seen,
        "final_loss": result.final_loss,
        "tokens_per_s": round(result.tokens_per_s, 1),
        "resumed_from": result.resumed_from,
    }


def _propagate_stage(variant: Variant) -> Callable[[RunContext, str], dict[str, Any]]:
    def run(ctx: RunContext, out: str) -> dict[str, Any]:
        assert ctx.spec.instruct_model is not None
        adapter = os.path.join(ctx.path("cpt"), LORA_ADAPTER)
        return propagate_saved(
            base=ctx.spec.base_model,
            adapted_base=ctx.path("cpt"),
            instruct=ctx.spec.instruct_model,
            variant=variant,
            out_dir=out,
            lora_adapter=adapter if os.path.isdir(adapter) else None,
            lora_scale=ctx.spec.propagation.lora_scale if ctx.spec.propagation else 1.0,
        )

    return run


CALIBRATION_EXAMPLES = "examples.jsonl"


def _calibration_data_stage(ctx: RunContext, out: str) -> dict[str, Any]:
    """Self-calibration answers of the original instruct model (cached across runs) plus copy examples."""
    device = compute_device()
    instruct, instruct_tokenizer = load_model(answering_model(ctx.spec), device=device, dtype=inference_dtype(device))
    meter = ctx.meter("calibration-data", None, "answers")

    def answered(data: dict[str, Any]) -> None:
        meter.total = int(data["total"])
        meter(int(data["done"]))

    examples, stats = build_calibration_set(
        instruct,
        instruct_tokenizer,
        ctx.spec.corpus,
        ctx.spec.calibration,
        ctx.path(CALIBRATION_CACHE),
        progress=answered,
        should_cancel=ctx.should_cancel,
    )
    if stats.cancelled:
        raise StageCancelled("calibration data cancelled (answers so far are cached)")
    save_examples(examples, os.path.join(out, CALIBRATION_EXAMPLES))
    return asdict(stats)


def answering_model(spec: AdaptationSpec) -> str:
    """The original model whose own answers calibrate: I, or the base itself when it is adapted directly."""
    return spec.instruct_model or spec.base_model


def _calibrate_stage(stage: str, adapted: str) -> Callable[[RunContext, str], dict[str, Any]]:
    """SFT of the adapted model of stage `adapted` (a propagated I', or the CPT output) on the calibration set."""

    def run(ctx: RunContext, out: str) -> dict[str, Any]:
        with open(os.path.join(ctx.path("calibration-data"), CALIBRATION_EXAMPLES), encoding="utf-8") as handle:
            examples = [json.loads(line) for line in handle]
        model, tokenizer = load_model(ctx.path(adapted))
        meter = ctx.meter(stage, None, "steps", interval_s=0)
        result = run_sft(
            model,
            tokenizer,
            examples,
            ctx.spec.calibration.sft,
            progress=_steps_to(meter),
            should_cancel=ctx.should_cancel,
        )
        if result.cancelled:
            raise StageCancelled(f"{stage} cancelled at step {result.steps}")
        save_pretrained(model, tokenizer, out)
        return asdict(result)

    return run


def _eval_data(ctx: RunContext) -> EvalData:
    spec, limit = ctx.spec, ctx.spec.evaluation.heldout_chars
    target = list(iter_documents(spec.heldout, limit_chars=limit))
    source = list(iter_documents(spec.source_heldout, limit_chars=limit)) if spec.source_heldout else []
    return EvalData(target_texts=tuple(target), source_texts=tuple(source), mera_dir=spec.evaluation.mera_dir)


def models_to_evaluate(ctx: RunContext) -> dict[str, str]:
    """Model label -> spec: the original and every adapted model the run produced."""
    spec = ctx.spec
    if spec.instruct_model is None:
        models = {"original": spec.base_model, "adapted": ctx.path("cpt")}
        if spec.calibration.method != "none":
            models["calibrated"] = ctx.path("calibrate")
        return models
    models = {"original": spec.instruct_model}
    models.update({f"propagated:{v}": ctx.path(f"propagate:{v}") for v in spec.variants})
    if spec.calibration.method != "none":
        models.update({f"calibrated:{v}": ctx.path(f"calibrate:{v}") for v in spec.variants})
    return models


class _EvaluationProgress:
    """(task, done, total) reports of one model's evaluation as progress events; a task that starts a new part
    (source after target texts) starts a new ETA."""

    def __init__(self, ctx: RunContext, model: str) -> None:
        self.ctx, self.model = ctx, model
        self._meter: ProgressMeter | None = None
        self._part: tuple[str, int] | None = None
        self._done = 0

    def __call__(self, task: str, done: int, total: int) -> None:
        if self._meter is None or self._part != (task, total) or done < self._done:
            self._meter = self.ctx.meter("evaluate", total, "items")
            self._part = (task, total)
            self._meter(0, model=self.model, task=task)
        self._done = done
        self._meter(done, model=self.model, task=task)


def _evaluate_stage(ctx: RunContext, out: str) -> dict[str, Any]:
    data = _eval_data(ctx)
    config = ctx.spec.evaluation
    device = compute_device()
    rows: list[dict[str, Any]] = []
    for label, model_spec in models_to_evaluate(ctx).items():
        model, tokenizer = load_model(model_spec, device=device, dtype=inference_dtype(device))
        started = time.perf_counter()
        scores = evaluate(
            model,
            tokenizer,
            config.tasks,
            data,
            limit=config.limit,
            batch_size=config.batch_size,
            progress=_EvaluationProgress(ctx, label),
        )
        rows.extend({"model": label, **row.to_dict()} for row in scores)
        seconds = round(time.perf_counter() - started, 2)
        ctx.emit(Message("evaluate", f"evaluated {label}", data={"rows": len(scores), "seconds": seconds}))
        del model
    with open(os.path.join(out, "scores.json"), "w", encoding="utf-8") as handle:
        json.dump(rows, handle, ensure_ascii=False, indent=2)
    return {"rows": len(rows)}


def stages(spec: AdaptationSpec) -> list[Stage]:
    graph = [Stage("tokenizer", _tokenizer_stage), Stage("init", _init_stage), Stage("cpt", _cpt_stage)]
    graph += [Stage(f"propagate:{v}", _propagate_stage(v)) for v in spec.variants]
    if spec.calibration.method != "none":
        graph.append(Stage("calibration-data", _calibration_data_stage))
        if spec.instruct_model is None:
            graph.append(Stage("calibrate", _calibrate_stage("calibrate", "cpt")))
        else:
            graph += [
                Stage(f"calibrate:{v}", _calibrate_stage(f"calibrate:{v}", f"propagate:{v}")) for v in spec.variants
            ]
    graph.append(Stage("evaluate", _evaluate_stage))
    return graph


def _check_inputs(spec: AdaptationSpec) -> None:
    """Fail before any heavy work on inputs that would only fail a late stage."""
    for model in (spec.base_model, spec.instruct_model):
        if model is not None:
            resolve(model)
    next(require_documents(spec.corpus))
    next(require_documents(spec.heldout))
    for extra in (spec.source_heldout, spec.vocab.source_corpus, spec.cpt.source_corpus):
        if extra is not None:
            next(require_documents(extra))
    if spec.calibration.method != "none" and not has_chat_template(load_tokenizer(answering_model(spec))):
        raise AdaptationInputError(
            f"calibration trains on chat examples, but {answering_model(spec)} has no chat template "
            "(calibrate an instruct model, or set calibration.method to none)"
        )
    prompts = spec.calibration.prompt_file
    if prompts is not None and not os.path.isfile(prompts):
        raise AdaptationInputError(f"calibration.prompt_file not found: {prompts}")
    needs_mera = MERA_TASKS.intersection(spec.evaluation.tasks)
    if needs_mera and not (spec.evaluation.mera_dir and os.path.isdir(spec.evaluation.mera_dir)):
        raise AdaptationInputError(f"tasks {', '.join(sorted(needs_mera))} need evaluation.mera_dir (a folder)")


def run_stage(ctx: RunContext, stage: Stage) -> dict[str, Any]:
    """Run one stage into a temporary directory, then rename it into place and write its manifest."""
    final = ctx.path(stage.name)
    tmp = final + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    if os.path.exists(final):
        shutil.rmtree(final)  # incomplete leftovers of an earlier crash
    os.makedirs(tmp)
    started = time.perf_counter()
    try:
        info = stage.run(ctx, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info = {"stage": stage.name, "seconds": round(time.perf_counter() - started, 2), **info}
    with open(os.path.join(tmp, STAGE_INFO), "w", encoding="utf-8") as handle:
        json.dump(info, handle, ensure_ascii=False, indent=2)
    os.replace(tmp, final)
    write_manifest(final)
    return info


def run_pipeline(
    spec: AdaptationSpec,
    run_dir: str,
    *,
    emit: EventSink = ignore,
    should_cancel: Callable[[], bool] = lambda: False,
    on_stage_complete: Callable[[str, str], None] = lambda stage, path: None,
) -> PipelineReport:
    """Run every stage not already complete in `run_dir`, in order.

    `emit` gets typed events (`events.py`), `should_cancel` is polled by the training loops and between stages
    (a cancel raises `StageCancelled`), and `on_stage_complete(stage, path)` is called for every complete stage,
    skipped or new, e.g. to upload its outputs.
    """
    _check_inputs(spec)
    os.makedirs(run_dir, exist_ok=True)
    ctx = RunContext(spec=spec, run_dir=run_dir, emit=emit, should_cancel=should_cancel)
    report = PipelineReport(run_dir=os.path.abspath(run_dir))
    for stage in stages(spec):
        path = ctx.path(stage.name)
        if should_cancel():
            raise StageCancelled(f"cancelled before stage '{stage.name}'")
        if is_complete(path):
            with open(os.path.join(path, STAGE_INFO), encoding="utf-8") as handle:
                info = {**json.load(handle), "skipped": True}
            emit(StageSkipped(stage.name))
        else:
            emit(StageStarted(stage.name))
            try:
                info = run_stage(ctx, stage)
            except AdaptationInputError as exc:
                raise AdaptationInputError(f"stage '{stage.name}' failed: {exc}", exc.code) from exc
            emit(StageDone(stage.name, info["seconds"], info))
        on_stage_complete(stage.name, path)
        report.stages.append(info)
    if read_manifest(ctx.path("evaluate")) is not None:
        with open(os.path.join(ctx.path("evaluate"), "scores.json"), encoding="utf-8") as handle:
            report.scores = json.load(handle)
    return report
