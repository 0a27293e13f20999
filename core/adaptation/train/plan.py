"""The training plan of a job: how CPT runs on `gpus` GPUs of one node (one process, DDP or FSDP2; micro-batch and
gradient accumulation) and the memory it needs per GPU, estimated from the model's shape before anything is loaded,
so that the API can refuse at submit a job that cannot fit. Torch-free: the API imports it.

Memory per GPU (bytes), for trained parameters T and frozen parameters F of the adapted model:
- weights: 2 F (frozen weights held in bf16) + 4 T (float32 master weights);
- gradients: 4 T; AdamW: 8 T (two float32 moments);
- activations kept for the backward pass, bf16, per token and layer: 2 (12 d + 4 i) (the inputs of the attention
  and MLP projections, the projections' outputs, the norms; flash attention keeps no [seq x seq] matrix), times
  the micro-batch's tokens (every trainable set back-propagates through every layer: even `embeddings` needs the
  gradient at the first layer's input);
- the chunked LM-head loss: two float32 chunks of `lm_loss.CHUNK_BYTES` plus the final hidden states.
DDP holds all of it on every GPU; FSDP2 shards weights, gradients and optimizer state over the GPUs (plus one
layer gathered at a time). DDP is chosen when it fits (no gather traffic), FSDP2 otherwise. The micro-batch is the
largest divisor of a rank's sequences per step that fits within `HEADROOM` of the GPU's memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from langadapt.core.adaptation.config import CPTConfig

HEADROOM = 0.85  # of a GPU's memory: the allocator's fragmentation and the CUDA context need the rest
LOSS_CHUNK_BYTES = 256 * 2**20  # lm_loss.CHUNK_BYTES (lm_loss imports torch; this module must not)
LORA_PROJECTIONS = 7  # q, k, v, o, gate, up, down
GIB = 2**30

Strategy = Literal["single", "ddp", "fsdp2"]


class PlanError(ValueError):
    """A plan that cannot run; `field` names the job setting to change, `code` says why (the API's error code)."""

    def __init__(self, field: str, message: str, code: str = "plan_does_not_fit") -> None:
        super().__init__(message)
        self.field, self.code = field, code


class ModelShape(BaseModel):
    """What the plan needs of a decoder-only transformer, read from its config (`from_hf_config`)."""

    model_config = ConfigDict(frozen=True)

    vocab_size: int
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tied: bool
    max_positions: int | None = None

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> ModelShape:
        """From a Hugging Face `config.json` (a multimodal config's `text_config` when there is one)."""
        text = config.get("text_config") or config
        try:
            hidden, heads = int(text["hidden_size"]), int(text["num_attention_heads"])
            return cls(
                vocab_size=int(text["vocab_size"]),
                hidden_size=hidden,
                num_layers=int(text["num_hidden_layers"]),
                intermediate_size=int(text.get("intermediate_size") or 4 * hidden),
                num_heads=heads,
                num_kv_heads=int(text.get("num_key_value_heads") or heads),
                head_dim=int(text.get("head_dim") or hidden // heads),
                tied=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", True))),
                max_positions=text.get("max_position_embeddings"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(
                "base_model", f"the model's config lacks the transformer shape ({exc})", "invalid_model"
            ) from exc

    def with_vocab(self, vocab_size: int) -> ModelShape:
        return self.model_copy(update={"vocab_size": vocab_size})

    @property
    def vocab_matrix(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def layer_parameters(self) -> int:
        d, attention = self.hidden_size, self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        return 2 * d * attention + 2 * d * kv + 3 * d * self.intermediate_size + 2 * d

    @property
    def parameters(self) -> int:
        head = 0 if self.tied else self.vocab_matrix
        return self.vocab_matrix + head + self.num_layers * self.layer_parameters + self.hidden_size

    def lora_parameters(self, rank: int) -> int:
        d, i = self.hidden_size, self.intermediate_size
        attention, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = rank * ((d + attention) * 2 + (d + kv) * 2 + (d + i) * 3)
        return self.num_layers * per_layer

    def trained_parameters(self, trainable: str, lora_rank: int) -> int:
        head = 0 if self.tied else self.vocab_matrix
        if trainable == "embeddings":
            return self.vocab_matrix
        if trainable == "embeddings+head":
            return self.vocab_matrix + head
        if trainable == "lora+head":
            return self.vocab_matrix + head + self.lora_parameters(lora_rank)
        return self.parameters  # full

    def activation_bytes_per_token(self) -> int:
        return self.num_layers * 2 * (12 * self.hidden_size + 4 * self.intermediate_size)


class MemoryEstimate(BaseModel):
    """Bytes per GPU, by what holds them (see the module doc)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    loss: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.loss


class TrainingPlan(BaseModel):
    """How a job's CPT runs; stored with the job at submit."""

    gpus: int
    strategy: Strategy
    global_batch: int  # sequences per optimizer step, over all GPUs
    micro_batch: int  # sequences per forward / backward pass, per GPU
    grad_accum: int  # passes per optimizer step
    trained_parameters: int
    frozen_parameters: int
    memory_per_gpu: MemoryEstimate
    memory_per_gpu_gib: float
    gpu_memory_gib: float


def estimate_memory(
    shape: ModelShape, cpt: CPTConfig, *, strategy: Strategy, gpus: int, micro_batch: int
) -> MemoryEstimate:
    trained = shape.trained_parameters(cpt.trainable, cpt.lora_r)
    frozen = shape.parameters - min(trained, shape.parameters)
    shards = gpus if strategy == "fsdp2" else 1
    gathered = 2 * shape.layer_parameters if strategy == "fsdp2" else 0  # one layer unsharded at a time, bf16
    tokens = micro_batch * cpt.seq_len
    return MemoryEstimate(
        weights=(2 * frozen + 4 * trained) // shards + gathered,
        gradients=4 * trained // shards,
        optimizer=8 * trained // shards,
        activations=tokens * shape.activation_bytes_per_token(),
        loss=2 * LOSS_CHUNK_BYTES + 4 * tokens * shape.hidden_size,
    )


def plan_cpt(shape: ModelShape, cpt: CPTConfig, *, gpus: int, gpu_memory_gib: float, global_batch: int) -> TrainingPlan:
    """The plan for CPT of `shape` (the adapted vocabulary's size) on `gpus` GPUs of `gpu_memory_gib` each, with
    `global_batch` sequences per step; `PlanError` when the global batch does not divide or nothing fits."""
    if global_batch % gpus:
        raise PlanError(
            "cpt.global_batch", f"global batch {global_batch} does not divide by {gpus} GPUs", "invalid_global_batch"
        )
    if shape.max_positions is not None and cpt.seq_len > shape.max_positions:
        raise PlanError(
            "cpt.seq_len",
            f"cpt.seq_len ({cpt.seq_len}) exceeds the base model's {shape.max_positions} positions",
            "limit_exceeded",
        )
    per_rank = global_batch // gpus
    budget = HEADROOM * gpu_memory_gib * GIB
    strategies: list[Strategy] = ["single"] if gpus == 1 else ["ddp", "fsdp2"]
    for strategy in strategies:
        fitting = [
            m
            for m in range(1, per_rank + 1)
            if per_rank % m == 0
            and estimate_memory(shape, cpt, strategy=strategy, gpus=gpus, micro_batch=m).total <= budget
        ]
        if fitting:
            micro = max(fitting)
            memory = estimate_memory(shape, cpt, strategy=strategy, gpus=gpus, micro_batch=micro)
            trained = shape.trained_parameters(cpt.trainable, cpt.lora_r)
            return TrainingPlan(
                gpus=gpus,
                strategy=strategy,
                global_batch=global_batch,
                micro_batch=micro,
                grad_accum=per_rank // micro,
                trained_parameters=trained,
                frozen_parameters=shape.parameters - min(trained, shape.parameters),
                memory_per_gpu=memory,
                memory_per_gpu_gib=round(memory.total / GIB, 2),
                gpu_memory_gib=gpu_memory_gib,
            )
    smallest = estimate_memory(shape, cpt, strategy=strategies[-1], gpus=gpus, micro_batch=1)
    raise PlanError(
        "resources.gpus",
        f"CPT ({cpt.trainable}, seq_len {cpt.seq_len}) of a {shape.parameters / 1e9:.1f} B-parameter model needs "
        f"about {smallest.total / GIB:.0f} GiB per GPU even sharded over {gpus} GPU(s) of {gpu_memory_gib:g} GiB: "
        "ask for more GPUs, train fewer parameters or shorten cpt.seq_len",
    )
