"""Server-side upper bounds on what one job may ask for: vocabulary sizes, sequence lengths, batch sizes and the CPT
token budget (the sequence length against the model's positions is the training plan's check: `planning.py`).

The spec itself only checks that values make sense (positive, finite, consistent); how much a job may consume is
the deployment's choice (`LANGADAPT_MAX_*` settings). Each violation is a 422 `limit_exceeded` naming the field.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from langadapt.jobs.errors import Invalid
from langadapt.jobs.settings import Settings
from langadapt.jobs.spec import JobRequest


@dataclass(frozen=True)
class Bound:
    param: str  # the request field the error names
    setting: str  # the Settings attribute holding the maximum
    value: Callable[[JobRequest], int | None]  # what the request asks for (None: not applicable)
    what: str = ""  # how the value is computed, when it is not the field itself


def _calibrating(request: JobRequest) -> bool:
    return request.calibration.method != "none"


def _sft(request: JobRequest, value: int) -> int | None:
    return value if _calibrating(request) else None


BOUNDS: tuple[Bound, ...] = (
    Bound("vocab.new_tokens", "max_new_tokens", lambda r: r.vocab.new_tokens),
    Bound("vocab.vocab_size", "max_vocab_size", lambda r: r.vocab.vocab_size),
    Bound("vocab.keep_tokens", "max_vocab_size", lambda r: r.vocab.keep_tokens),
    Bound("cpt.seq_len", "max_seq_len", lambda r: r.cpt.seq_len),
    Bound("cpt.batch_size", "max_batch_size", lambda r: r.cpt.batch_size),
    Bound("cpt.batch_size", "max_batch_tokens", lambda r: r.cpt.batch_size * r.cpt.seq_len, "batch_size x seq_len"),
    Bound("cpt.steps", "max_steps", lambda r: r.cpt.steps),
    Bound(
        "cpt.steps",
        "max_train_tokens",
        lambda r: r.cpt.steps * r.cpt.tokens_per_step(r.resources.gpus),
        "steps x batch_size x grad_accum x seq_len",
    ),
    Bound("cpt.lora_r", "max_lora_r", lambda r: r.cpt.lora_r),
    Bound("calibration.batch_size", "max_batch_size", lambda r: _sft(r, r.calibration.batch_size)),
    Bound("calibration.max_new_tokens", "max_generation_tokens", lambda r: _sft(r, r.calibration.max_new_tokens)),
    Bound(
        "calibration.copy_examples",
        "max_calibration_examples",
        lambda r: _sft(r, r.calibration.self_calibration_examples + r.calibration.copy_examples),
        "self_calibration_examples + copy_examples",
    ),
    Bound("calibration.sft.max_len", "max_seq_len", lambda r: _sft(r, r.calibration.sft.max_len)),
    Bound("calibration.sft.batch_size", "max_batch_size", lambda r: _sft(r, r.calibration.sft.batch_size)),
    Bound(
        "calibration.sft.batch_size",
        "max_batch_tokens",
        lambda r: _sft(r, r.calibration.sft.batch_size * r.calibration.sft.max_len),
        "batch_size x max_len",
    ),
    Bound("calibration.sft.lora_r", "max_lora_r", lambda r: _sft(r, r.calibration.sft.lora_r)),
    Bound("calibration.sft.epochs", "max_sft_epochs", lambda r: _sft(r, r.calibration.sft.epochs)),
    Bound("evaluation.batch_size", "max_batch_size", lambda r: r.evaluation.batch_size),
    Bound("evaluation.limit", "max_eval_items", lambda r: r.evaluation.limit),
    Bound("max_attempts", "max_attempts", lambda r: r.max_attempts),
)


def check_limits(request: JobRequest, settings: Settings) -> None:
    """Raise `Invalid` (422 `limit_exceeded`) for the first value above this server's maximum."""
    for bound in BOUNDS:
        value = bound.value(request)
        maximum = getattr(settings, bound.setting)
        if value is not None and value > maximum:
            asked = f"{bound.param} ({bound.what} = {value})" if bound.what else f"{bound.param} ({value})"
            raise Invalid(
                f"{asked} exceeds this server's limit of {maximum} (LANGADAPT_{bound.setting.upper()})",
                code="limit_exceeded",
                param=bound.param,
            )
