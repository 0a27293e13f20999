"""One typed configuration per pipeline stage, with one set of defaults (the papers' where they give one).

The same objects are read by the stage code (`build_vocab`, `change_vocabulary`, `run_cpt`, `run_sft`,
`build_calibration_set`, `evaluate`), by the YAML spec of `langadapt run` and by the job service's
`POST /v1/jobs` body: a setting has one name, one default and one validation everywhere. Torch-free, so the API
validates job bodies with them without loading training code.

A setting that contradicts another (warm-up longer than the run, an option the chosen method ignores) raises
`SpecConflict`, which names the offending field, so the API can answer 422 with `param` pointing at it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from langadapt.core.adaptation.task_names import AVERAGED_TASKS, MICRO_AVG, TASK_NAMES, TaskName

VocabMethod = Literal["bpe", "unigram", "extended", "optimized"]
Priority = Literal["new-first", "old-first", "target-first"]
KeepBy = Literal["frequency", "first-ids"]
InitMethod = Literal["mean", "random", "focus", "omp", "regression"]
HeadNorm = Literal["cap", "none"]
AUXILIARY_METHODS: tuple[InitMethod, ...] = ("focus", "omp", "regression")
CPTTrainable = Literal["embeddings", "embeddings+head", "lora+head", "full"]
TrainRows = Literal["all", "new"]
Strategy = Literal["ddp", "fsdp2"]  # how a CPT over several processes shares the model (one process: ignored)
SFTTrainable = Literal["lora+head", "full"]
Variant = Literal["swap", "overlap", "conversion"]
CalibrationMethod = Literal["none", "self+copy"]

VARIANTS: tuple[Variant, ...] = get_args(Variant)
CPT_TRAINABLE: tuple[CPTTrainable, ...] = get_args(CPTTrainable)
DEFAULT_EVAL_TASKS: tuple[TaskName, ...] = ("symbols_per_token", "bits_per_char", "copy_ru", "generation_speed")

INT64_MAX = 2**63 - 1
# numpy, torch and Python's random all accept it (numpy's legacy seeding stops at 2**32 - 1).
Seed = Annotated[int, Field(ge=0, le=2**32 - 1, description="random seed, 0 to 2**32 - 1")]
# An AdamW learning rate above 1 only diverges; bounding it keeps absurd values out at submit time.
LearningRate = Annotated[float, Field(gt=0, le=1)]


class SpecConflict(ValueError):
    """A setting that contradicts another one; `field` is its dotted path relative to the model that raised it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _out_of_int64(value: Any) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return not -INT64_MAX - 1 <= value <= INT64_MAX
    return isinstance(value, list | tuple) and any(_out_of_int64(item) for item in value)


class Config(BaseModel):
    # Floats must be finite (no NaN, Infinity or 1e400) everywhere in a spec.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _fits_in_64_bits(cls, value: Any) -> Any:
        """No integer setting may exceed 64 bits: nothing downstream (torch, numpy, the database) can hold it."""
        if _out_of_int64(value):
            raise ValueError(f"integers must lie within ±{INT64_MAX}")
        return value

    def changed_fields(self) -> list[str]:
        """The fields whose value differs from their default. Judged by value, not by whether the field was given,
        so a stored request with every default written out validates exactly like the body it came from."""
        return [
            name
            for name, field in type(self).model_fields.items()
            if getattr(self, name) != field.get_default(call_default_factory=True)
        ]


class VocabConfig(Config):
    """The target-language vocabulary (LEP §2.1). Which fields apply depends on `method`; setting one the method
    ignores is an error rather than a silent no-op."""

    method: VocabMethod = "extended"
    vocab_size: int | None = Field(None, gt=0, description="bpe / unigram: size of the replacing vocabulary")
    new_tokens: int = Field(
        16_000,
        gt=0,
        description="extended / optimized: size M of the target BPE whose tokens the source lacks are added",
    )
    keep_tokens: int | None = Field(None, gt=0, description="optimized: N source tokens kept (specials/bytes on top)")
    keep_by: KeepBy = Field(
        "frequency", description="optimized: most frequent tokens, or the first ids (authors' code)"
    )
    priority: Priority = Field(
        "target-first",
        description="extended / optimized: new-first (the paper) runs the new merges before the old ones, old-first "
        "after them; target-first runs the new merges that produce the target script (measured on the corpus) "
        "first and the other new ones after the old, so source-language text keeps its tokenization",
    )
    train_chars: int | None = Field(None, gt=0, description="corpus characters to train on (default: all)")
    heldout_chars: int = Field(
        200_000,
        gt=0,
        description="characters of held-out text for the chars/token report (the corpus's first ones, "
        "excluded from training, when no held-out text is given)",
    )
    min_frequency: int = Field(2, ge=1, description="minimum pair frequency of a BPE merge")
    source_corpus: str | None = Field(
        None, description="optimized: source-language text mixed into the frequency sample (path; file id in the API)"
    )

    @model_validator(mode="after")
    def _options_fit_the_method(self) -> VocabConfig:
        replacing = self.method in ("bpe", "unigram")
        if replacing and self.vocab_size is None:
            raise SpecConflict("vocab_size", f"vocab.method '{self.method}' needs vocab.vocab_size")
        if self.method == "optimized" and self.keep_tokens is None:
            raise SpecConflict("keep_tokens", "vocab.method 'optimized' needs vocab.keep_tokens")
        ignored = {
            "vocab_size": not replacing,
            "new_tokens": replacing,
            "priority": replacing,
            "keep_tokens": self.method != "optimized",
            "keep_by": self.method != "optimized",
            "source_corpus": self.method != "optimized",
        }
        for name in self.changed_fields():
            if ignored.get(name):
                raise SpecConflict(name, f"vocab.{name} does not apply to vocab.method '{self.method}'")
        return self


class AuxiliaryConfig(Config):
    """Static token vectors (fastText CBOW with subword n-grams, gensim) trained on the target corpus tokenized with
    the new tokenizer: the space focus / omp / regression compare tokens in. Cached per corpus, tokenizer and these
    settings."""

    dim: int = Field(100, ge=2, le=1024, description="vector size")
    epochs: int = Field(3, ge=1, le=100)
    window: int = Field(5, ge=1, le=100, description="context window in tokens")
    min_count: int = Field(
        5, ge=1, le=1_000_000, description="tokens seen fewer times have no trained vector (n-grams only)"
    )
    train_chars: int | None = Field(20_000_000, ge=1, le=INT64_MAX, description="corpus characters read (null: all)")


class InitConfig(Config):
    """How the rows of new tokens start (overlapping tokens always copy their rows)."""

    method: InitMethod = Field(
        "mean",
        description="mean: the mean of the token's old pieces (the paper); random; focus: a sparsemax-weighted "
        "combination of anchor rows by similarity in the auxiliary space (Dobler & de Melo 2023); omp: the anchors "
        "orthogonal matching pursuit picks to rebuild the token's auxiliary vector, coefficients transplanted "
        "(tokensurgeon); regression: a ridge map from the auxiliary space to the model's rows (SALT-style)",
    )
    seed: Seed = 0
    auxiliary: AuxiliaryConfig = Field(
        default_factory=AuxiliaryConfig, description="focus / omp / regression: the auxiliary space"
    )
    neighbours: int = Field(50, ge=1, le=10_000, description="focus: nearest anchors the sparsemax runs over")
    terms: int = Field(8, ge=1, le=1_000, description="omp: anchors per token")
    grow_anchors: bool = Field(
        True,
        description="focus / omp / regression: new tokens are initialised shortest first and, once initialised, "
        "serve as anchors of longer ones (otherwise only overlapping tokens are anchors)",
    )
    mean_weight: float = Field(
        0.5,
        ge=0,
        le=1,
        description="focus / omp / regression: share of the mean init averaged into each new row (0.5: measured "
        "better than either alone, bench/init_quality.py)",
    )
    head_norm: HeadNorm = Field(
        "cap",
        description="focus / omp / regression: cap: no new row is longer than its mean-init row (new tokens take "
        "no more probability in source-language contexts than their averaged pieces would); none",
    )
    scale: Annotated[float, Field(gt=0, le=4)] | Literal["fit"] | None = Field(
        None,
        description="logit control: every new row is multiplied by this factor (a tied model's one matrix; "
        "untied, the head's new rows only); fit: the factor in [0.25, 1.25] with the lowest bits per character "
        "on the corpus's first scale_chars characters, found with the model's own forward passes (needs a "
        "corpus); null: fit for focus / omp / regression, 1 (rows as the method made them) for mean and random",
    )
    scale_chars: int = Field(
        10_000, ge=1_000, le=10_000_000, description="scale fit: corpus characters scored per trial factor"
    )
    cache_dir: str | None = Field(
        None,
        description="folder of cached auxiliary spaces (default: the run directory's init.aux/; the CLI: the "
        "user cache folder)",
    )

    @field_validator("scale", mode="wrap")
    @classmethod
    def _one_message_for_the_scale(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """One error at `scale`, not one per member of its type (a number, or 'fit')."""
        try:
            return handler(value)
        except ValidationError:
            raise ValueError("init.scale takes a number in (0, 4], 'fit' or null") from None

    @model_validator(mode="after")
    def _options_fit_the_method(self) -> InitConfig:
        if self.method not in AUXILIARY_METHODS:
            own = {"seed", "cache_dir", "scale", "scale_chars"}
            extra = [name for name in self.changed_fields() if name not in own and name != "method"]
            if extra:
                raise SpecConflict(extra[0], f"init.{extra[0]} does not apply to init.method '{self.method}'")
        for name, method in (("neighbours", "focus"), ("terms", "omp")):
            if name in self.changed_fields() and self.method != method:
                raise SpecConflict(name, f"init.{name} only applies to init.method '{method}'")
        if "scale_chars" in self.changed_fields() and self.resolved_scale != "fit":
            raise SpecConflict("scale_chars", "init.scale_chars only applies when the scale is fitted")
        return self

    @property
    def resolved_scale(self) -> float | Literal["fit"]:
        """`scale` with its per-method default filled in."""
        if self.scale is not None:
            return self.scale
        return "fit" if self.method in AUXILIARY_METHODS else 1.0


class LRScale(Config):
    """Multipliers of the learning rate per parameter group (differential learning rates). In a tied model the
    one vocabulary matrix is `embeddings`."""

    embeddings: float = Field(1.0, gt=0, le=1000)
    head: float = Field(1.0, gt=0, le=1000)
    layers: float = Field(
        1.0, gt=0, le=1000, description="transformer layers: LoRA adapters (lora+head) or weights (full)"
    )


class TrainingConfig(Config):
    """Optimiser, schedule and LoRA settings shared by CPT and SFT: AdamW (decay on matrices only), linear warm-up
    then cosine decay to `lr x min_lr_ratio`, global-norm clipping."""

    lr: LearningRate
    lr_scale: LRScale = Field(default_factory=LRScale, description="lr multipliers per parameter group")
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="global gradient-norm clip; null: none")
    seed: Seed = 0
    log_every: int = Field(10, ge=1, description="progress reports (and host syncs of the loss) every N steps")
    lora_r: int = Field(ge=1)
    lora_alpha: float = Field(gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)

    @field_validator("betas")
    @classmethod
    def _betas(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        return betas


_STEPS = TypeAdapter(Annotated[int, Field(ge=1)])


class CPTConfig(TrainingConfig):
    """Continued pretraining (LEP §2.3). The paper's global batch is 256 sequences of 1024 tokens: `batch_size` x
    `grad_accum` x processes, or `global_batch` whatever the number of processes (then `grad_accum` is derived).
    lr 1e-4 is its rate for 32 K vocabularies (2e-4 for 128 K ones)."""

    trainable: CPTTrainable = Field(
        "embeddings+head", description="embeddings | embeddings+head (LEP) | lora+head | full"
    )
    steps: int = Field(1000, ge=1, description="optimizer steps")
    seq_len: int = Field(1024, ge=2, description="tokens per packed sequence")
    batch_size: int = Field(8, ge=1, description="sequences per micro-batch (per process)")
    grad_accum: int = Field(32, ge=1, description="micro-batches per optimizer step")
    global_batch: int | None = Field(
        None,
        ge=1,
        description="sequences per optimizer step over all processes; when set, grad_accum is derived from it, "
        "batch_size and the number of processes, so the run computes the same on 1 or N GPUs",
    )
    lr: LearningRate = 1e-4
    warmup_steps: int = Field(  # type: ignore[assignment]  # None only until `_derived_defaults` fills it in
        None, ge=0, description="linear warm-up steps (default: 10 % of steps, at most 100)"
    )
    auto_micro_batch: bool = Field(
        True,
        description="on a GPU: regroup each step's batch_size x grad_accum sequences into the largest micro-batches "
        "that fit in memory (the same sequences and tokens per step)",
    )
    checkpoint_every: int = Field(100, ge=1, description="steps between resumable checkpoints")
    keep_checkpoints: int = Field(1, ge=1)
    lora_r: int = Field(16, ge=1)
    lora_alpha: float = Field(32.0, gt=0)
    compile: bool | None = Field(
        None,
        description="torch.compile the transformer stack (fixed packed shapes: one compilation); default: on CUDA "
        "(not under FSDP2), falling back to eager if compilation fails",
    )
    # When not given: a job spec picks it from its vocabulary method (new for extended / optimized, which keep the
    # source's rows; all for bpe / unigram, which replace them); a CPT config on its own trains all rows.
    train_rows: TrainRows = Field(
        None,  # type: ignore[arg-type]  # None only until `_derived_defaults` or the job spec fills it in
        description="all: every row of the embeddings and head learns; new: only the rows of tokens the source "
        "vocabulary lacks (old rows stay bit-identical, so the source language keeps its representations); "
        "default: new for extended / optimized vocabularies, all for bpe / unigram",
    )
    source_mix: float = Field(
        0.0, ge=0, le=0.5, description="share of CPT tokens replayed from source-language text (source_corpus)"
    )
    source_corpus: str | None = Field(
        None, description="source-language text replayed during CPT: a path; a file id in the API"
    )

    @model_validator(mode="before")
    @classmethod
    def _derived_defaults(cls, data: object) -> object:
        if not isinstance(data, dict):
            return data
        if data.get("warmup_steps") is None:
            try:  # as the field will read it (JSON's 1e3 is 1000); an invalid value is reported by the field
                steps = _STEPS.validate_python(data.get("steps", cls.model_fields["steps"].default))
            except ValidationError:
                steps = None
            if steps is not None:
                data = {**data, "warmup_steps": min(100, steps // 10)}
        if data.get("train_rows") is None:  # on its own; a job spec decides from its vocabulary method first
            data = {**data, "train_rows": "all"}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> CPTConfig:
        if self.warmup_steps >= self.steps:
            raise SpecConflict(
                "warmup_steps",
                f"cpt.warmup_steps ({self.warmup_steps}) must be below cpt.steps ({self.steps}): "
                "the learning rate would never leave warm-up",
            )
        if self.global_batch is not None:
            # (the default passes: a dumped config, which lists every field, reads back)
            if self.grad_accum != type(self).model_fields["grad_accum"].default:
                raise SpecConflict("grad_accum", "cpt.grad_accum is derived from cpt.global_batch: set one of them")
            if self.global_batch % self.batch_size:
                raise SpecConflict(
                    "global_batch",
                    f"cpt.global_batch ({self.global_batch}) must be a multiple of cpt.batch_size ({self.batch_size})",
                )
        if self.source_mix > 0 and self.source_corpus is None:
            raise SpecConflict("source_corpus", "cpt.source_mix needs cpt.source_corpus (source-language text)")
        if self.source_corpus is not None and self.source_mix == 0:
            raise SpecConflict("source_mix", "cpt.source_corpus is only read with a cpt.source_mix above 0")
        unused = {"layers": self.trainable in ("embeddings", "embeddings+head"), "head": self.trainable == "embeddings"}
        for group in self.lr_scale.changed_fields():
            if unused.get(group):
                raise SpecConflict(f"lr_scale.{group}", f"cpt.trainable '{self.trainable}' does not train {group}")
        return self

    def sequences_per_step(self, num_processes: int = 1) -> int:
        """Sequences per optimizer step over all processes."""
        if self.global_batch is not None:
            return self.global_batch
        return self.batch_size * self.grad_accum * num_processes

    def accumulation(self, num_processes: int = 1) -> int:
        """Micro-batches of `batch_size` per optimizer step in each process. A `global_batch` that `batch_size` x
        processes does not divide raises `SpecConflict` naming it."""
        if self.global_batch is None:
            return self.grad_accum
        if self.global_batch % (self.batch_size * num_processes):
            raise SpecConflict(
                "global_batch",
                f"cpt.global_batch ({self.global_batch}) must be a multiple of cpt.batch_size ({self.batch_size}) "
                f"x processes ({num_processes})",
            )
        return self.global_batch // (self.batch_size * num_processes)

    def tokens_per_step(self, num_processes: int = 1) -> int:
        return self.sequences_per_step(num_processes) * self.seq_len


class SFTConfig(TrainingConfig):
    """Supervised fine-tuning on chat examples; the defaults are LEP's self-calibration (§2.4.2): LoRA r 8 /
    alpha 1 on the first and last layers (`lora_layers`, negative from the end; null: every layer) plus the
    embeddings and head, lr 2.5e-5, one epoch."""

    trainable: SFTTrainable = "lora+head"
    lr: LearningRate = 2.5e-5
    lora_r: int = Field(8, ge=1)
    lora_alpha: float = Field(1.0, gt=0)
    lora_layers: tuple[int, ...] | None = Field((0, -1), min_length=1)
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(8, ge=1, description="examples per micro-batch")
    grad_accum: int = Field(4, ge=1, description="micro-batches per optimizer step")
    max_len: int = Field(1024, ge=2, description="tokens per example; longer ones are cut at the end")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="share of the steps spent in linear warm-up")


class PropagationConfig(Config):
    """LEP (§2.4): the adapted base's embeddings carried into the instruct model."""

    variant: Variant | list[Variant] = "conversion"
    lora_scale: float = Field(1.0, ge=0, description="scale of the CPT LoRA delta merged into I (lora+head)")

    @property
    def variants(self) -> list[Variant]:
        return [self.variant] if isinstance(self.variant, str) else list(dict.fromkeys(self.variant))


class CalibrationConfig(Config):
    """LEP §2.4.2: a short SFT of each I' on self-calibration answers of I plus a copy task (paper: 13.5 K + 10 K).

    `language` picks the instruction templates (ru, en; English for any other; the passages stay in the target
    language). Fewer corpus passages than both parts ask for shrink both in proportion."""

    method: CalibrationMethod = "none"
    language: str = Field("ru", min_length=1, description="language of the instructions (ru, en; others: English)")
    self_calibration_examples: int = Field(13_500, ge=0)
    copy_examples: int = Field(10_000, ge=0)
    prompt_file: str | None = Field(None, description="prompts (.txt / .jsonl): a path; a file id in the API")
    max_new_tokens: int = Field(512, ge=1, description="answer budget of I")
    batch_size: int = Field(16, ge=1, description="prompts answered per generation batch")
    passage_max_chars: int = Field(500, ge=1)
    passage_min_chars: int = Field(50, ge=1)
    corpus_chars: int | None = Field(20_000_000, ge=1, description="corpus characters read (null: all)")
    script_sample_chars: int = Field(1_000_000, ge=1, description="characters that measure the dominant script")
    repeat_ngram_chars: int = Field(20, ge=1)
    max_repeat_ratio: float = Field(0.5, gt=0, le=1, description="answers with more repeated n-grams are dropped")
    min_script_ratio: float = Field(0.5, ge=0, le=1, description="answers with less of the corpus's script dropped")
    seed: Seed = 0
    sft: SFTConfig = Field(default_factory=SFTConfig)

    @model_validator(mode="after")
    def _consistent(self) -> CalibrationConfig:
        if self.method == "none":
            extra = [name for name in self.changed_fields() if name != "method"]
            if extra:
                raise SpecConflict(extra[0], f"calibration.{extra[0]} has no effect with calibration.method 'none'")
            return self
        if self.self_calibration_examples + self.copy_examples == 0:
            raise SpecConflict("copy_examples", "the calibration set would be empty: ask for some examples")
        if self.passage_min_chars > self.passage_max_chars:
            raise SpecConflict("passage_min_chars", "calibration.passage_min_chars exceeds passage_max_chars")
        return self


class ResourcesConfig(Config):
    """What a job runs on: CPT on `gpus` GPUs of one node (`torchrun`, `train/launch.py`); the other stages use one."""

    gpus: Literal[1, 2, 4, 8] = Field(1, description="GPUs of one node for CPT: 1, 2, 4 or 8")
    nodes: int = Field(1, ge=1, description="machines; only 1 for now")
    strategy: Strategy | None = Field(
        None, description="ddp | fsdp2 with several GPUs; default: what the plan at submit chooses (fsdp2 unplanned)"
    )

    @field_validator("nodes")
    @classmethod
    def _one_node(cls, nodes: int) -> int:
        if nodes != 1:
            raise ValueError("several nodes are not supported yet: a job runs on up to 8 GPUs of one node")
        return nodes


class EvaluationConfig(Config):
    """Which evaluation tasks run on the original and every adapted model, and on how much data."""

    tasks: list[TaskName] = Field(default=list(DEFAULT_EVAL_TASKS), min_length=1, max_length=len(TASK_NAMES))
    limit: int | None = Field(50, ge=1, description="items per task (documents, questions); null: all")
    heldout_chars: int = Field(50_000, ge=1, description="characters of held-out text read for evaluation")
    batch_size: int = Field(16, ge=1, description="sequences per forward / generation batch")
    mera_dir: str | None = Field(None, description="folder of MERA .jsonl files (mc_ruworldtree, mera_arith)")

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, tasks: list[TaskName]) -> list[TaskName]:
        twice = sorted({task for task in tasks if tasks.count(task) > 1})
        if twice:
            raise ValueError(f"task(s) listed twice: {', '.join(twice)}")
        if MICRO_AVG in tasks and not AVERAGED_TASKS.intersection(tasks):
            raise ValueError(f"micro_avg averages {', '.join(sorted(AVERAGED_TASKS))}: list at least one of them")
        return tasks
