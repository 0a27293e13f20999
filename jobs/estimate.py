"""What a job will cost before it runs (`POST /v1/jobs?dry_run=true`): tokens and steps per stage, GPU minutes from
the service's throughput table, artifact bytes, and (`payoff.py`) what the new vocabulary buys.

The throughput table: tokens/s per (base model, stage). Measured rows come from finished jobs of this service (the
CPT loop's `tokens_per_s`, kept on the job row: the median over the latest succeeded jobs with the same base model
and trainable set). Where nothing was measured yet, the seed is a FLOPs model: `gpu_tflops x mfu / FLOPs per token`
(settings `estimate_gpu_tflops`, `estimate_mfu`; forward 2N per token, backward 2N + 2 x trainable parameters),
labelled as such in every answer. It is a first-principles seed, not a measurement.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from langadapt.jobs.catalogue import catalogue
from langadapt.jobs.models import Job, JobStatus
from langadapt.jobs.settings import Settings
from langadapt.jobs.spec import JobRequest

CHARS_PER_TOKEN_GUESS = 3.0  # held-out chars -> tokens when no payoff was measured
TOKENIZER_BYTES_PER_TOKEN = 64  # tokenizer.json: the vocabulary entry and its merge, roughly
MEASURED_JOBS = 50


@dataclass(frozen=True)
class ModelShape:
    params: int
    hidden: int
    vocab: int
    tied: bool
    bytes_per_param: int

    def with_vocab(self, vocab: int) -> ModelShape:
        rows = (vocab - self.vocab) * self.hidden * (1 if self.tied else 2)
        return ModelShape(self.params + rows, self.hidden, vocab, self.tied, self.bytes_per_param)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)


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


def model_path(settings: Settings, ref: str) -> str | None:
    """The local file or folder of a model reference (None for s3:// models: not read at submit time)."""
    entry = catalogue(settings).get(ref)
    location = entry.location if entry is not None else ref
    return location if os.path.isabs(location) and os.path.exists(location) else None


def model_shape(path: str | None) -> ModelShape | None:
    """Parameter count and embedding shape from a Hugging Face config.json or a GGUF header (no weights loaded)."""
    if path is None:
        return None
    if path.endswith(".gguf"):
        return _gguf_shape(path)
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        return None
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    config = config.get("text_config", config)
    hidden, layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
    ffn = int(config.get("intermediate_size") or 4 * hidden)
    vocab, tied = int(config["vocab_size"]), bool(config.get("tie_word_embeddings", False))
    params = vocab * hidden * (1 if tied else 2) + layers * (4 * hidden * hidden + 3 * hidden * ffn)
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    return ModelShape(params, hidden, vocab, tied, 2 if "16" in dtype else 4)


def _gguf_shape(path: str) -> ModelShape | None:
    from gguf import GGUFReader  # numpy only; imported here because only GGUF models need it

    reader = GGUFReader(path)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    embedding = tensors.get("token_embd.weight")
    if embedding is None:
        return None
    hidden, vocab = (int(n) for n in embedding.shape[:2])
    params = sum(int(tensor.n_elements) for tensor in reader.tensors)
    return ModelShape(params, hidden, vocab, "output.weight" not in tensors, 4)  # loaded (and saved) as fp32


def new_vocab_size(request: JobRequest, shape: ModelShape) -> int:
    vocab = request.vocab
    if vocab.method in ("bpe", "unigram"):
        return vocab.vocab_size or shape.vocab
    if vocab.method == "optimized":
        return (vocab.keep_tokens or shape.vocab) + vocab.new_tokens
    return shape.vocab + vocab.new_tokens


def trainable_params(trainable: str, shape: ModelShape) -> int:
    if trainable == "full":
        return shape.params
    head = shape.vocab * shape.hidden
    return {"embeddings": head, "embeddings+head": shape.embedding_params}.get(trainable, head)  # lora+head: ~head


def seed_rate(settings: Settings, shape: ModelShape, *, trainable: int | None) -> Rate:
    """The FLOPs model: forward 2N per token; training adds backward 2N + 2 x trainable."""
    flops = 2 * shape.params + (0 if trainable is None else 2 * shape.params + 2 * trainable)
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
    base = model_shape(model_path(settings, request.base_model))
    adapted = base.with_vocab(new_vocab_size(request, base)) if base is not None else None
    cpt = request.cpt
    stages = [
        StageCost("tokenizer", None, None, 0.0, None, "cpu stage"),
        StageCost("init", None, None, 0.0, None, "cpu stage"),
    ]
    cpt_tokens = cpt.steps * cpt.tokens_per_step()
    cpt_rate = measured_cpt_rate(session, request.base_model, cpt.trainable)
    if cpt_rate is None and adapted is not None:
        cpt_rate = seed_rate(settings, adapted, trainable=trainable_params(cpt.trainable, adapted))
    stages.append(_costed("cpt", cpt_tokens, cpt.steps, cpt_rate))
    stages += [StageCost(f"propagate:{v}", None, None, 0.0, None, "cpu stage") for v in request.variants]

    calibrated = 0
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
            sft_rate = seed_rate(settings, adapted, trainable=trainable_params("embeddings+head", adapted))
        names = ["calibrate"] if request.instruct_model is None else [f"calibrate:{v}" for v in request.variants]
        stages += [_costed(name, examples * sft.max_len * sft.epochs, steps, sft_rate) for name in names]
        calibrated = len(names)

    models = (2 if request.instruct_model is None else 1 + len(request.variants)) + calibrated
    eval_chars = models * len(request.evaluation.tasks) * request.evaluation.heldout_chars
    eval_tokens = int(eval_chars / (chars_per_token or CHARS_PER_TOKEN_GUESS))
    eval_rate = seed_rate(settings, adapted, trainable=None) if adapted is not None else None
    stages.append(_costed("evaluate", eval_tokens, None, eval_rate))

    artifact_bytes = None
    if adapted is not None:
        saved_models = 2 + len(request.variants) + calibrated  # init, cpt, one per variant and calibration
        artifact_bytes = saved_models * adapted.params * adapted.bytes_per_param
        artifact_bytes += adapted.vocab * TOKENIZER_BYTES_PER_TOKEN
    return stages, artifact_bytes


def _costed(stage: str, tokens: int, steps: int | None, rate: Rate | None) -> StageCost:
    if rate is None:
        return StageCost(stage, tokens, steps, None, None, None)
    minutes = round(tokens / rate.tokens_per_s / 60, 2)
    return StageCost(stage, tokens, steps, minutes, round(rate.tokens_per_s, 1), rate.source)
