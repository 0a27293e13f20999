"""The training plan of a submitted job (`core.adaptation.train.plan`): the base model's shape read from its
config.json or GGUF header (no weights loaded, no torch), the adapted vocabulary's size, and this deployment's GPUs
(`max_gpus`, `gpu_memory_gib`). A plan that cannot fit is a 422 naming the setting to change; a model whose shape
cannot be read at submit (an s3:// model) gets a plan without a memory estimate."""

from __future__ import annotations

import json
import os
from typing import Any

from langadapt.core.adaptation.config import SpecConflict
from langadapt.core.adaptation.train.plan import ModelShape, PlanError, TrainingPlan, plan_cpt
from langadapt.jobs.catalogue import local_location
from langadapt.jobs.errors import Invalid
from langadapt.jobs.settings import Settings
from langadapt.jobs.spec import JobRequest


def model_shape(location: str | None) -> ModelShape | None:
    """The shape of the model at a local `location` (a Hugging Face folder or a .gguf file); None elsewhere."""
    if location is None:
        return None
    if location.lower().endswith(".gguf"):
        return _gguf_shape(location)
    try:
        with open(os.path.join(location, "config.json"), encoding="utf-8") as handle:
            return ModelShape.from_hf_config(json.load(handle))
    except (OSError, ValueError):
        return None


def _gguf_shape(path: str) -> ModelShape | None:
    from gguf import GGUFReader  # numpy only; imported here because only GGUF models need it

    try:
        reader = GGUFReader(path)
    except (OSError, ValueError):
        return None
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    embedding = tensors.get("token_embd.weight")
    arch = reader.fields.get("general.architecture")
    if embedding is None or arch is None:
        return None
    prefix = str(arch.contents())

    def field(name: str) -> Any:
        entry = reader.fields.get(f"{prefix}.{name}")
        return None if entry is None else entry.contents()

    hidden, heads = field("embedding_length"), field("attention.head_count")
    config = {
        "vocab_size": int(embedding.shape[1]),
        "hidden_size": hidden,
        "num_hidden_layers": field("block_count"),
        "intermediate_size": field("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": field("attention.head_count_kv"),
        "head_dim": field("attention.key_length"),
        "tie_word_embeddings": "output.weight" not in tensors,
        "max_position_embeddings": field("context_length"),
    }
    try:
        return ModelShape.from_hf_config(config)
    except PlanError:
        return None


def adapted_vocab_size(request: JobRequest, source_vocab: int) -> int:
    """The vocabulary CPT trains: the new tokenizer's size (an upper bound for `extended`, whose new tokens may
    overlap the source's)."""
    vocab = request.vocab
    if vocab.method in ("bpe", "unigram"):
        return vocab.vocab_size or source_vocab
    if vocab.method == "optimized":
        return (vocab.keep_tokens or source_vocab) + vocab.new_tokens
    return source_vocab + vocab.new_tokens


def plan_job(request: JobRequest, settings: Settings) -> TrainingPlan | None:
    """The job's plan, or None when the base model's shape cannot be read here. Raises `Invalid` (422) when the
    job asks for more GPUs than this deployment's workers own or cannot fit on them."""
    gpus = request.resources.gpus
    if gpus > settings.max_gpus:
        raise Invalid(
            f"resources.gpus ({gpus}) exceeds this deployment's {settings.max_gpus} GPU(s) per worker "
            "(LANGADAPT_MAX_GPUS)",
            code="limit_exceeded",
            param="resources.gpus",
        )
    try:
        request.cpt.accumulation(gpus)
    except SpecConflict as exc:
        raise Invalid(str(exc), code="invalid_global_batch", param=f"cpt.{exc.field}") from exc
    shape = model_shape(local_location(request.base_model, settings))
    if shape is None:
        return None
    try:
        return plan_cpt(
            shape.with_vocab(adapted_vocab_size(request, shape.vocab_size)),
            request.cpt,
            gpus=gpus,
            gpu_memory_gib=settings.gpu_memory_gib,
            global_batch=request.cpt.sequences_per_step(gpus),
        )
    except PlanError as exc:
        raise Invalid(str(exc), code=exc.code, param=exc.field) from exc
