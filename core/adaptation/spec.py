"""The adaptation-job spec: the models, the texts and one configuration per stage (`config.py`).

`JobSettings` is the part a local run (`AdaptationSpec`, texts as paths) and a service job
(`langadapt.jobs.spec.JobRequest`, texts as uploaded file ids) share, with the checks that span stages.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from langadapt.core.adaptation.config import (
    CalibrationConfig,
    Config,
    CPTConfig,
    EvaluationConfig,
    InitConfig,
    PropagationConfig,
    ResourcesConfig,
    SpecConflict,
    Variant,
    VocabConfig,
)
from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.core.adaptation.task_names import SOURCE_TASKS

LABEL_KEY_PATTERN = r"^[A-Za-z0-9_.\-]{1,100}$"
MAX_LABELS = 32


class JobSettings(Config):
    base_model: str = Field(min_length=1, max_length=500, description="B: the model whose vocabulary is adapted")
    instruct_model: str | None = Field(
        None, min_length=1, max_length=500, description="I: the instruct model B' is propagated into (optional)"
    )
    vocab: VocabConfig = Field(default_factory=VocabConfig)
    init: InitConfig = Field(default_factory=InitConfig)
    cpt: CPTConfig = Field(default_factory=CPTConfig)
    propagation: PropagationConfig | None = Field(
        None, description="LEP settings; only with an instruct_model (then defaults apply when omitted)"
    )
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    labels: dict[str, str] = Field(default_factory=dict)

    source_heldout_field: ClassVar[str]  # the subclass's name for held-out source-language text

    @field_validator("base_model", "instruct_model")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        if value is not None and not value.isprintable():
            raise ValueError("must not contain control characters")
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: dict[str, str]) -> dict[str, str]:
        if len(labels) > MAX_LABELS:
            raise ValueError(f"at most {MAX_LABELS} labels")
        for key, value in labels.items():
            if not re.match(LABEL_KEY_PATTERN, key):
                raise ValueError(f"label key {key!r} must match {LABEL_KEY_PATTERN}")
            if not 0 < len(value) <= 200:
                raise ValueError(f"label {key!r}: value must be 1 to 200 characters")
        return labels

    @model_validator(mode="before")
    @classmethod
    def _defaults_that_depend_on_other_stages(cls, data: object) -> object:
        """Written out, so a stored request shows the settings it ran with: LEP's settings when there is an
        instruct model, and which embedding rows CPT trains (the new ones when the vocabulary keeps the old)."""
        if not isinstance(data, dict):
            return data
        if data.get("instruct_model") is not None and data.get("propagation") is None:
            data = {**data, "propagation": {}}
        cpt, vocab = data.get("cpt", {}), data.get("vocab", {})
        if isinstance(cpt, dict) and isinstance(vocab, dict) and cpt.get("train_rows") is None:
            replacing = vocab.get("method") in ("bpe", "unigram")
            data = {**data, "cpt": {**cpt, "train_rows": "all" if replacing else "new"}}
        return data

    @model_validator(mode="after")
    def _stages_fit_together(self) -> JobSettings:
        if self.instruct_model is None and self.propagation is not None:
            raise SpecConflict("propagation", "propagation needs an instruct_model to propagate into")
        if self.cpt.train_rows == "new" and self.vocab.method in ("bpe", "unigram"):
            raise SpecConflict(
                "cpt.train_rows",
                f"cpt.train_rows 'new' keeps the source's rows, but vocab.method '{self.vocab.method}' replaces them",
            )
        source_tasks = sorted(SOURCE_TASKS.intersection(self.evaluation.tasks))
        if source_tasks and getattr(self, self.source_heldout_field) is None:
            raise SpecConflict(
                "evaluation.tasks", f"task(s) {', '.join(source_tasks)} need {self.source_heldout_field}"
            )
        return self

    @property
    def variants(self) -> list[Variant]:
        """The LEP variants the job produces (none without an instruct model)."""
        return self.propagation.variants if self.propagation is not None else []


class AdaptationSpec(JobSettings):
    """Everything one `langadapt run` needs; texts are local paths."""

    corpus: str = Field(min_length=1, description="the target-language training corpus")
    heldout: str = Field(
        min_length=1, description="held-out target text: never trained on, used for chars/token and evaluation"
    )
    source_heldout: str | None = Field(None, description="held-out source-language text for regressions")

    source_heldout_field: ClassVar[str] = "source_heldout"


def load_spec(path: str) -> AdaptationSpec:
    """Read a YAML (or JSON) spec file; any problem is an `AdaptationInputError` naming the field."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise AdaptationInputError(f"spec file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise AdaptationInputError(f"{path}: not valid YAML ({exc})") from None
    try:
        return AdaptationSpec.model_validate(data)
    except ValidationError as exc:
        raise AdaptationInputError(f"{path}: {describe_validation_error(exc)}") from None


def error_field(error: Mapping[str, Any]) -> str:
    """The dotted path of the field a pydantic error is about (a `SpecConflict` names its own field)."""
    parts = [str(part) for part in error.get("loc", ())]
    conflict = (error.get("ctx") or {}).get("error")
    if isinstance(conflict, SpecConflict):
        parts.append(conflict.field)
    return ".".join(parts)


def describe_validation_error(exc: ValidationError) -> str:
    """`field: message (N problem(s))` for the first error, as the CLI prints it."""
    first = exc.errors()[0]
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"{error_field(first) or 'spec'}: {message} ({exc.error_count()} problem(s))"
