"""The adaptation job as an ordered graph of resumable stages.

    tokenizer -> init -> cpt -> propagate:<variant>... -> [calibration-data -> calibrate:<variant>...] -> evaluate

Each stage writes into `<run_dir>/<stage>/` through a temporary directory renamed into place, then a manifest
(sha256 and size per file). A stage whose directory is complete is skipped, so re-running a spec over the same run
directory resumes where it stopped; CPT additionally resumes from its last step checkpoint, kept outside its stage
directory. Without an instruct model the job adapts the base model alone (no propagation).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from langadapt.core.adaptation.calibration import CalibrationOptions, build_calibration_set, save_examples
from langadapt.core.adaptation.corpus import iter_documents, require_documents
from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.core.adaptation.evaluate import EvalData, evaluate
from langadapt.core.adaptation.manifest import is_complete, read_manifest, write_manifest
from langadapt.core.adaptation.propagate import propagate_saved
from langadapt.core.adaptation.sources import load_model, load_tokenizer, resolve, save_pretrained
from langadapt.core.adaptation.spec import AdaptationSpec
from langadapt.core.adaptation.surgery import change_vocabulary
from langadapt.core.adaptation.train.cpt import CPTConfig, run_cpt
from langadapt.core.adaptation.train.sft import SFTConfig, run_sft
from langadapt.core.adaptation.vocab import VocabOptions, build_vocab

Event = Callable[[dict[str, Any]], None]
STAGE_INFO = "stage.json"
LORA_ADAPTER = "lora_adapter"
CPT_WORK = "cpt.work"  # CPT's step checkpoints, kept outside its stage directory until the stage completes


def stage_dirname(stage: str) -> str:
    """The folder a stage writes to inside the run directory (`propagate:swap` -> `propagate-swap`)."""
    return stage.replace(":", "-")  # inside the cpt stage: the layers' delta of `lora+head`, merged into I by LEP


@dataclass
class RunContext:
    spec: AdaptationSpec
    run_dir: str
    emit: Event
    should_cancel: Callable[[], bool] = lambda: False

    def path(self, stage: str) -> str:
        return os.path.join(self.run_dir, stage_dirname(stage))


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


def _tokenizer_stage(ctx: RunContext, out: str) -> dict[str, Any]:
    vocab = ctx.spec.vocab
    options = VocabOptions(
        vocab_size=vocab.vocab_size,
        new_tokens=vocab.new_tokens,
        keep_tokens=vocab.keep_tokens,
        keep_by=vocab.keep_by,
        priority=vocab.priority,
        train_chars=vocab.train_chars,
        heldout_path=ctx.spec.heldout,
        source_corpus=vocab.source_corpus,
    )
    result = build_vocab(vocab.method, load_tokenizer(ctx.spec.base_model), ctx.spec.corpus, options)
    result.save(out)
    return result.report.to_dict()


def _init_stage(ctx: RunContext, out: str) -> dict[str, Any]:
    model, tokenizer = load_model(ctx.spec.base_model)
    new_tokenizer = load_tokenizer(ctx.path("tokenizer"))
    mapping = change_vocabulary(model, tokenizer, new_tokenizer, init=ctx.spec.init.method, seed=ctx.spec.init.seed)
    save_pretrained(model, new_tokenizer, out)
    return {"copied_tokens": len(mapping.overlap), "initialised_tokens": len(mapping.new_ids)}


class StageCancelled(Exception):
    """The run was asked to stop; the interrupted stage keeps its checkpoint and re-runs from it next time."""


def cpt_config(spec: AdaptationSpec) -> CPTConfig:
    cpt = spec.cpt
    return CPTConfig(
        trainable=cpt.trainable,
        steps=cpt.steps,
        seq_len=cpt.seq_len,
        micro_batch_size=cpt.batch_size,
        grad_accum_steps=cpt.grad_accum,
        lr=cpt.lr,
        warmup_steps=cpt.warmup_steps,
        weight_decay=cpt.weight_decay,
        grad_clip=cpt.max_grad_norm,
        checkpoint_every=cpt.checkpoint_every,
        seed=cpt.seed,
    )


def _cpt_stage(ctx: RunContext, out: str) -> dict[str, Any]:
    """Continued pretraining of the initialised model; its step checkpoints live in `cpt.work/` across runs."""
    model, tokenizer = load_model(ctx.path("init"))
    if ctx.spec.cpt.steps == 0:
        save_pretrained(model, tokenizer, out)
        return {"steps": 0}
    work = ctx.path(CPT_WORK)
    result = run_cpt(
        model,
        tokenizer,
        ctx.spec.corpus,
        cpt_config(ctx.spec),
        work,
        resume=True,
        progress=lambda metrics: ctx.emit({"type": "metrics", "stage": "cpt", "data": metrics}),
        should_cancel=ctx.should_cancel,
    )
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


def _propagate_stage(variant: str) -> Callable[[RunContext, str], dict[str, Any]]:
    def run(ctx: RunContext, out: str) -> dict[str, Any]:
        assert ctx.spec.instruct_model is not None
        adapter = os.path.join(ctx.path("cpt"), LORA_ADAPTER)
        return propagate_saved(
            base=ctx.spec.base_model,
            adapted_base=ctx.path("cpt"),
            instruct=ctx.spec.instruct_model,
            variant=variant,  # type: ignore[arg-type]
            out_dir=out,
            lora_adapter=adapter if os.path.isdir(adapter) else None,
            lora_scale=ctx.spec.propagation.lora_scale,
        )

    return run


CALIBRATION_EXAMPLES = "examples.jsonl"


def _calibration_data_stage(ctx: RunContext, out: str) -> dict[str, Any]:
    """Self-calibration answers of the original instruct model (cached across runs) plus copy examples."""
    assert ctx.spec.instruct_model is not None
    calibration = ctx.spec.calibration
    options = CalibrationOptions(
        language=calibration.language,
        self_calibration_examples=calibration.self_calibration_examples,
        copy_examples=calibration.copy_examples,
        prompt_file=calibration.prompt_file,
        max_new_tokens=calibration.max_new_tokens,
    )
    instruct, instruct_tokenizer = load_model(ctx.spec.instruct_model)
    examples, stats = build_calibration_set(
        instruct,
        instruct_tokenizer,
        ctx.spec.corpus,
        options,
        ctx.path("calibration.cache.jsonl"),
        progress=lambda data: ctx.emit({"type": "metrics", "stage": "calibration-data", "data": data}),
        should_cancel=ctx.should_cancel,
    )
    if stats.cancelled:
        raise StageCancelled("calibration data cancelled (answers so far are cached)")
    save_examples(examples, os.path.join(out, CALIBRATION_EXAMPLES))
    return asdict(stats)


def _calibrate_stage(variant: str) -> Callable[[RunContext, str], dict[str, Any]]:
    def run(ctx: RunContext, out: str) -> dict[str, Any]:
        calibration = ctx.spec.calibration
        with open(os.path.join(ctx.path("calibration-data"), CALIBRATION_EXAMPLES), encoding="utf-8") as handle:
            examples = [json.loads(line) for line in handle]
        model, tokenizer = load_model(ctx.path(f"propagate:{variant}"))
        config = SFTConfig(
            lr=calibration.lr,
            epochs=calibration.epochs,
            batch_size=calibration.batch_size,
            grad_accum_steps=calibration.grad_accum,
            max_len=calibration.max_len,
        )
        result = run_sft(
            model,
            tokenizer,
            examples,
            config,
            progress=lambda data: ctx.emit({"type": "metrics", "stage": f"calibrate:{variant}", "data": data}),
            should_cancel=ctx.should_cancel,
        )
        if result.cancelled:
            raise StageCancelled(f"calibrate:{variant} cancelled at step {result.steps}")
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
        return {"original": spec.base_model, "adapted": ctx.path("cpt")}
    models = {"original": spec.instruct_model}
    models.update({f"propagated:{v}": ctx.path(f"propagate:{v}") for v in spec.propagation.variants})
    if spec.calibration.method != "none":
        models.update({f"calibrated:{v}": ctx.path(f"calibrate:{v}") for v in spec.propagation.variants})
    return models


def _evaluate_stage(ctx: RunContext, out: str) -> dict[str, Any]:
    data = _eval_data(ctx)
    evaluation = ctx.spec.evaluation
    rows: list[dict[str, Any]] = []
    for label, model_spec in models_to_evaluate(ctx).items():
        model, tokenizer = load_model(model_spec)
        scores = evaluate(model, tokenizer, evaluation.tasks, data, limit=evaluation.limit)
        rows.extend({"model": label, **row.to_dict()} for row in scores)
        ctx.emit({"type": "message", "message": f"evaluated {label}", "data": {"rows": len(scores)}})
    with open(os.path.join(out, "scores.json"), "w", encoding="utf-8") as handle:
        json.dump(rows, handle, ensure_ascii=False, indent=2)
    return {"rows": len(rows)}


def stages(spec: AdaptationSpec) -> list[Stage]:
    graph = [Stage("tokenizer", _tokenizer_stage), Stage("init", _init_stage), Stage("cpt", _cpt_stage)]
    if spec.instruct_model is not None:
        graph += [Stage(f"propagate:{v}", _propagate_stage(v)) for v in spec.propagation.variants]
        if spec.calibration.method != "none":
            graph.append(Stage("calibration-data", _calibration_data_stage))
            graph += [Stage(f"calibrate:{v}", _calibrate_stage(v)) for v in spec.propagation.variants]
    graph.append(Stage("evaluate", _evaluate_stage))
    return graph


MERA_TASKS = {"mc_ruworldtree", "mera_arith"}


def _check_inputs(spec: AdaptationSpec) -> None:
    """Fail before any heavy work on inputs that would only fail a late stage."""
    for model in (spec.base_model, spec.instruct_model):
        if model is not None:
            resolve(model)
    next(require_documents(spec.corpus))
    next(require_documents(spec.heldout))
    for extra in (spec.source_heldout, spec.vocab.source_corpus):
        if extra is not None:
            next(require_documents(extra))
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
    emit: Event = lambda event: None,
    should_cancel: Callable[[], bool] = lambda: False,
    on_stage_complete: Callable[[str, str], None] = lambda stage, path: None,
) -> PipelineReport:
    """Run every stage not already complete in `run_dir`, in order.

    `emit` gets progress events, `should_cancel` is polled by the training loops and between stages (a cancel
    raises `StageCancelled`), and `on_stage_complete(stage, path)` is called for every complete stage, skipped or
    new, e.g. to upload its outputs.
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
            emit({"type": "stage", "stage": stage.name, "message": "complete output found: skipped"})
        else:
            emit({"type": "stage", "stage": stage.name, "message": "started"})
            try:
                info = run_stage(ctx, stage)
            except AdaptationInputError as exc:
                raise AdaptationInputError(f"stage '{stage.name}' failed: {exc}", exc.code) from exc
            emit({"type": "stage", "stage": stage.name, "message": f"done in {info['seconds']} s"})
        on_stage_complete(stage.name, path)
        report.stages.append(info)
    if read_manifest(ctx.path("evaluate")) is not None:
        with open(os.path.join(ctx.path("evaluate"), "scores.json"), encoding="utf-8") as handle:
            report.scores = json.load(handle)
    return report
