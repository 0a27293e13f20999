"""What a job will cost before it runs (`POST /v1/jobs?dry_run=true`): tokens and steps per stage, GPU minutes from
the service's throughput table, artifact bytes, and (`payoff.py`) what the new vocabulary buys.

Artifact bytes count what the job stores (`assembly.py`): a tensor is stored once per job, so after the first full
model each stage adds only the tensors it changed (the instruct model's layers once for all variants).

The throughput table: tokens/s per (base model, stage). Measured rows come from finished jobs of this service (the
CPT loop's `tokens_per_s`, kept on the job row: the median over the latest succeeded jobs with the same base model
and trainable set). Where nothing was measured yet, the seed is a FLOPs model: `gpu_tflops x mfu / FLOPs per token`
(settings `estimate_gpu_tflops`, `estimate_mfu`; forward 2N per token, backward 2N + 2 x trainable parameters),
labelled as such in every answer. It is a first-principles seed, not a measurement.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from langadapt.core.adaptation.train.plan import ModelShape
from langadapt.jobs.catalogue import local_location
from langadapt.jobs.models import Job, JobStatus
from langadapt.jobs.planning import adapted_vocab_size, model_shape
from langadapt.jobs.settings import Settings
from langadapt.jobs.spec import JobRequest

CHARS_PER_TOKEN_GUESS = 3.0  # held-out chars -> tokens when no payoff was measured
SAVED_BYTES_PER_PARAMETER = 4  # stages load models in float32 and save them so
TOKENIZER_BYTES_PER_TOKEN = 64  # tokenizer.json: the vocabulary entry and its merge, roughly
MEASURED_JOBS = 50


@dataclass(frozen=True)
class StageCost:
    stage: str
    tokens: int | None
    steps: int | None
    gpu_minutes: float | None
    tokens_per_s: float | None
    rate_source: str | None


@dataclass(frozen=True)
class Rate:
    tokens_per_s: float
    source: str


def seed_rate(settings: Settings, shape: ModelShape, *, trainable: int | None) -> Rate:
    """The FLOPs model: forward 2N per token; training adds backward 2N + 2 x trainable."""
    flops = 2 * shape.parameters + (0 if trainable is None else 2 * shape.parameters + 2 * trainable)
    rate = settings.estimate_gpu_tflops * 1e12 * settings.estimate_mfu / flops
    return Rate(rate, f"seed: FLOPs model ({settings.estimate_gpu_tflops:g} TFLOP/s x {settings.estimate_mfu:g} MFU)")


def measured_cpt_rate(session: Session, base_model: str, trainable: str) -> Rate | None:
    """The median CPT tokens/s of the latest succeeded jobs of this base model and trainable set."""
    rows = session.execute(
        select(Job.cpt_tokens_per_s, Job.request)
        .where(Job.base_model == base_model, Job.status == JobStatus.succeeded, Job.cpt_tokens_per_s.is_not(None))
        .order_by(Job.id.desc())
        .limit(MEASURED_JOBS)
    ).all()
    rates = [float(rate) for rate, request in rows if (request.get("cpt") or {}).get("trainable") == trainable]
    if not rates:
        return None
    return Rate(statistics.median(rates), f"measured: median of {len(rates)} finished job(s)")


def estimate_stages(
    session: Session, settings: Settings, request: JobRequest, *, chars_per_token: float | None
) -> tuple[list[StageCost], int | None]:
    """The pipeline's stages in order with their cost, and the artifact bytes (None when the model is unknown)."""
    base = model_shape(local_location(request.base_model, settings))
    adapted = base.with_vocab(adapted_vocab_size(request, base.vocab_size)) if base is not None else None
    cpt = request.cpt
    stages = [
        StageCost("tokenizer", None, None, 0.0, None, "cpu stage"),
        StageCost("init", None, None, 0.0, None, "cpu stage"),
    ]
    cpt_tokens = cpt.steps * cpt.tokens_per_step(request.resources.gpus)
    cpt_rate = measured_cpt_rate(session, request.base_model, cpt.trainable)
    if cpt_rate is None and adapted is not None:
        cpt_rate = seed_rate(settings, adapted, trainable=adapted.trained_parameters(cpt.trainable, cpt.lora_r))
    stages.append(_costed("cpt", cpt_tokens, cpt.steps, cpt_rate))
    stages += [StageCost(f"propagate:{v}", None, None, 0.0, None, "cpu stage") for v in request.variants]

    calibrated = 0
    calibrated_parameters = 0
    calibration = request.calibration
    if calibration.method != "none":
        forward = seed_rate(settings, adapted, trainable=None) if adapted is not None else None
        generated = calibration.self_calibration_examples * calibration.max_new_tokens  # an upper bound
        stages.append(_costed("calibration-data", generated, None, forward))
        sft = calibration.sft
        examples = calibration.self_calibration_examples + calibration.copy_examples
        steps = math.ceil(examples / (sft.batch_size * sft.grad_accum)) * sft.epochs
        sft_rate = None
        if adapted is not None:
            sft_rate = seed_rate(settings, adapted, trainable=adapted.trained_parameters(sft.trainable, sft.lora_r))
        names = ["calibrate"] if request.instruct_model is None else [f"calibrate:{v}" for v in request.variants]
        stages += [_costed(name, examples * sft.max_len * sft.epochs, steps, sft_rate) for name in names]
        calibrated = len(names)
        if adapted is not None:
            calibrated_parameters = calibrated * _calibrated(adapted, sft.trainable, sft.lora_r, sft.lora_layers)

    models = (2 if request.instruct_model is None else 1 + len(request.variants)) + calibrated
    eval_chars = models * len(request.evaluation.tasks) * request.evaluation.heldout_chars
    eval_tokens = int(eval_chars / (chars_per_token or CHARS_PER_TOKEN_GUESS))
    eval_rate = seed_rate(settings, adapted, trainable=None) if adapted is not None else None
    stages.append(_costed("evaluate", eval_tokens, None, eval_rate))

    artifact_bytes = None
    if adapted is not None:
        # init in full, then what CPT trained (its LoRA is kept apart, in `lora_adapter`)
        stored = adapted.parameters + adapted.trained_parameters(cpt.trainable, cpt.lora_r)
        if request.instruct_model is not None:  # the propagated layers once, each variant its own vocabulary
            vocabulary = adapted.trained_parameters("embeddings+head", 0)
            stored += adapted.parameters + (len(request.variants) - 1) * vocabulary
        stored += calibrated_parameters
        artifact_bytes = stored * SAVED_BYTES_PER_PARAMETER + adapted.vocab_size * TOKENIZER_BYTES_PER_TOKEN
    return stages, artifact_bytes


def _calibrated(shape: ModelShape, trainable: str, lora_r: int, lora_layers: tuple[int, ...] | None) -> int:
    """Parameters whose tensors calibration rewrites: what it trains, and for its LoRA (merged into the saved
    model) every tensor of the layers it touched."""
    if trainable != "lora+head":
        return shape.trained_parameters(trainable, lora_r)
    layers = shape.num_layers if lora_layers is None else len(set(lora_layers))
    return shape.trained_parameters("embeddings+head", 0) + layers * shape.layer_parameters


def _costed(stage: str, tokens: int, steps: int | None, rate: Rate | None) -> StageCost:
    if rate is None:
        return StageCost(stage, tokens, steps, None, None, None)
    minutes = round(tokens / rate.tokens_per_s / 60, 2)
    return StageCost(stage, tokens, steps, minutes, round(rate.tokens_per_s, 1), rate.source)
