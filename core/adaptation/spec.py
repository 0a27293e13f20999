"""The typed adaptation-job spec: everything one pipeline run needs, with the paper's defaults.

The same shape is what the job service accepts in `POST /v1/jobs` (there the corpus is an uploaded file id).
"""

from __future__ import annotations

from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.core.adaptation.task_names import TASK_NAMES

Variant = Literal["swap", "overlap", "conversion"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VocabSpec(_Strict):
    method: Literal["bpe", "unigram", "extended", "optimized"] = "extended"
    vocab_size: int | None = Field(None, gt=0)
    new_tokens: int | None = Field(None, gt=0)
    keep_tokens: int | None = Field(None, gt=0)
    keep_by: Literal["frequency", "first-ids"] = "frequency"
    priority: Literal["new-first", "old-first"] = "new-first"
    train_chars: int | None = Field(None, gt=0)
    source_corpus: str | None = None

    @model_validator(mode="after")
    def _sizes_for_method(self) -> VocabSpec:
        if self.method in ("bpe", "unigram") and not self.vocab_size:
            raise ValueError(f"vocab.method '{self.method}' needs vocab.vocab_size")
        if self.method in ("extended", "optimized") and not self.new_tokens:
            raise ValueError(f"vocab.method '{self.method}' needs vocab.new_tokens")
        if self.method == "optimized" and not self.keep_tokens:
            raise ValueError("vocab.method 'optimized' needs vocab.keep_tokens")
        return self


class InitSpec(_Strict):
    method: Literal["mean", "random"] = "mean"
    seed: int = 0


class CPTSpec(_Strict):
    """Continued pretraining; defaults from the LEP paper (lr 2e-4 suits LLaMa-3-sized vocabularies)."""

    trainable: Literal["embeddings", "embeddings+head", "lora+head", "full"] = "embeddings+head"
    steps: int = Field(1000, ge=0)
    seq_len: int = Field(1024, gt=1)
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(100, gt=0)
    seed: int = 0


class PropagationSpec(_Strict):
    variant: Variant | list[Variant] = "conversion"
    lora_scale: float = Field(1.0, ge=0, description="scale of the CPT LoRA delta merged into I (lora+head)")

    @property
    def variants(self) -> list[Variant]:
        return [self.variant] if isinstance(self.variant, str) else list(dict.fromkeys(self.variant))


class CalibrationSpec(_Strict):
    """LEP §2.4.2: a short SFT of I' on self-calibration answers of I plus a copy task (paper: 13.5 K + 10 K,
    LoRA r 8 / alpha 1 on the first and last layers with embeddings and head, lr 2.5e-5, 1 epoch)."""

    method: Literal["none", "self+copy"] = "none"
    language: str = Field("ru", description="target language of the instructions (ru, en; others use English)")
    self_calibration_examples: int = Field(13_500, ge=0)
    copy_examples: int = Field(10_000, ge=0)
    prompt_file: str | None = None
    max_new_tokens: int = Field(512, gt=0)
    lr: float = Field(2.5e-5, gt=0)
    epochs: int = Field(1, gt=0)
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(4, gt=0)
    max_len: int = Field(1024, gt=1)


class EvaluationSpec(_Strict):
    tasks: list[str] = Field(default_factory=lambda: ["symbols_per_token", "bits_per_char"])
    limit: int | None = Field(None, gt=0, description="items per task")
    heldout_chars: int = Field(50_000, gt=0)
    mera_dir: str | None = Field(None, description="folder of MERA .jsonl files (mc_ruworldtree, mera_arith)")

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        unknown = [task for task in tasks if task not in TASK_NAMES]
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)} (choose from {', '.join(TASK_NAMES)})")
        return tasks


class AdaptationSpec(_Strict):
    base_model: str
    instruct_model: str | None = None
    corpus: str
    heldout: str = Field(description="held-out target text: never trained on, used for chars/token and evaluation")
    source_heldout: str | None = Field(None, description="held-out source-language text for regressions")
    vocab: VocabSpec = Field(default_factory=VocabSpec)
    init: InitSpec = Field(default_factory=InitSpec)
    cpt: CPTSpec = Field(default_factory=CPTSpec)
    propagation: PropagationSpec = Field(default_factory=PropagationSpec)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("base_model", "corpus", "heldout")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


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
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "spec"
        raise AdaptationInputError(f"{path}: {where}: {first['msg']} ({exc.error_count()} problem(s))") from None
