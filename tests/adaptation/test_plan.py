"""The submit-time training plan: parameter counts of real shapes, strategy and micro-batch choice, refusals."""

from __future__ import annotations

import pytest

from langadapt.core.adaptation.config import CPTConfig
from langadapt.core.adaptation.train.plan import GIB, ModelShape, PlanError, estimate_memory, plan_cpt

SMOLLM2_135M = {
    "vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 30, "intermediate_size": 1536,
    "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True, "max_position_embeddings": 8192,
}  # fmt: skip
LLAMA3_8B = {
    "vocab_size": 128256, "hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False, "max_position_embeddings": 8192,
}  # fmt: skip
LLAMA3_70B = {
    "vocab_size": 128256, "hidden_size": 8192, "num_hidden_layers": 80, "intermediate_size": 28672,
    "num_attention_heads": 64, "num_key_value_heads": 8, "tie_word_embeddings": False, "max_position_embeddings": 8192,
}  # fmt: skip


@pytest.mark.parametrize(
    ("config", "published"),
    [(SMOLLM2_135M, 134_515_008), (LLAMA3_8B, 8_030_261_248), (LLAMA3_70B, 70_553_706_496)],
)
def test_parameter_counts_match_the_published_models(config, published) -> None:
    assert ModelShape.from_hf_config(config).parameters == published


def cpt(**overrides) -> CPTConfig:
    return CPTConfig.model_validate({"seq_len": 2048, **overrides})


def test_an_8b_model_with_64k_new_rows_trains_embeddings_and_head_on_one_gpu() -> None:
    shape = ModelShape.from_hf_config(LLAMA3_8B).with_vocab(128_256 + 64_000)
    plan = plan_cpt(shape, cpt(trainable="embeddings+head"), gpus=1, gpu_memory_gib=141, global_batch=256)
    assert plan.strategy == "single"
    assert plan.trained_parameters == 2 * 192_256 * 4096
    assert plan.micro_batch * plan.grad_accum == 256 and plan.micro_batch >= 2
    assert plan.memory_per_gpu_gib <= 0.85 * 141
    lora = plan_cpt(shape, cpt(trainable="lora+head"), gpus=1, gpu_memory_gib=141, global_batch=256)
    assert lora.trained_parameters > plan.trained_parameters


def test_full_training_of_8b_needs_sharding_and_ddp_is_taken_when_it_fits() -> None:
    shape = ModelShape.from_hf_config(LLAMA3_8B)
    with pytest.raises(PlanError) as refused:
        plan_cpt(shape, cpt(trainable="full"), gpus=1, gpu_memory_gib=80, global_batch=64)
    assert refused.value.field == "resources.gpus"
    sharded = plan_cpt(shape, cpt(trainable="full"), gpus=8, gpu_memory_gib=80, global_batch=64)
    assert sharded.strategy == "fsdp2" and sharded.micro_batch * sharded.grad_accum * 8 == 64
    small = ModelShape.from_hf_config(SMOLLM2_135M)
    assert plan_cpt(small, cpt(trainable="full"), gpus=2, gpu_memory_gib=80, global_batch=64).strategy == "ddp"


def test_70b_embeddings_and_head_shard_over_eight_gpus_only() -> None:
    shape = ModelShape.from_hf_config(LLAMA3_70B).with_vocab(128_256 + 64_000)
    with pytest.raises(PlanError):
        plan_cpt(shape, cpt(trainable="embeddings+head"), gpus=1, gpu_memory_gib=141, global_batch=64)
    plan = plan_cpt(shape, cpt(trainable="embeddings+head"), gpus=8, gpu_memory_gib=141, global_batch=64)
    assert plan.strategy == "fsdp2"


def test_sharding_divides_weights_gradients_and_optimizer_state() -> None:
    shape = ModelShape.from_hf_config(LLAMA3_8B)
    one = estimate_memory(shape, cpt(trainable="full"), strategy="ddp", gpus=4, micro_batch=1)
    four = estimate_memory(shape, cpt(trainable="full"), strategy="fsdp2", gpus=4, micro_batch=1)
    assert four.optimizer == one.optimizer // 4 and four.gradients == one.gradients // 4
    assert four.activations == one.activations
    assert one.optimizer == 8 * shape.parameters and one.total > 120 * GIB


@pytest.mark.parametrize(
    ("overrides", "gpus", "global_batch", "field"),
    [({}, 4, 30, "cpt.global_batch"), ({"seq_len": 16384}, 1, 8, "cpt.seq_len")],
)
def test_impossible_settings_name_their_field(overrides, gpus, global_batch, field) -> None:
    shape = ModelShape.from_hf_config(SMOLLM2_135M)
    with pytest.raises(PlanError) as refused:
        plan_cpt(shape, cpt(**overrides), gpus=gpus, gpu_memory_gib=80, global_batch=global_batch)
    assert refused.value.field == field


def test_a_config_without_a_transformer_shape_is_refused() -> None:
    with pytest.raises(PlanError, match="shape"):
        ModelShape.from_hf_config({"model_type": "bert"})
