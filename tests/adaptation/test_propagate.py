"""LEP variants on hand-checkable matrices and on tiny models (tied and untied)."""

from __future__ import annotations

import copy

import pytest
import torch

from langadapt.core.adaptation.config import InitConfig, VocabConfig
from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.core.adaptation.mapping import VocabMapping
from langadapt.core.adaptation.propagate import projection, propagate_embeddings, propagate_rows
from langadapt.core.adaptation.surgery import change_vocabulary, set_vocab_rows
from langadapt.core.adaptation.vocab import build_vocab

E_B = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])  # [V_old=4, d=2]
Q = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
# new vocabulary of 5: new 0 = old 0, new 1 = old 2, new 2 = old pieces [1, 3], new 3 = [0, 1], new 4 = unknown special
MAPPING = VocabMapping(old_size=4, new_size=5, overlap={0: 0, 1: 2}, pieces=[[0], [2], [1, 3], [0, 1], []])
E_B_PRIME = torch.tensor([[1.0, 2.0], [3.0, 1.0], [0.5, 0.5], [1.0, -1.0], [0.0, 2.0]])


def test_conversion_expresses_old_rows_in_the_new_vocabulary() -> None:
    expected = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0], [0.5, 0.5], [1.0, 0.75]], dtype=torch.float64)
    assert torch.equal(MAPPING.mean_rows(E_B), expected)  # row 4: no pieces -> mean of all old rows


@pytest.mark.parametrize("variant", ["swap", "overlap", "conversion"])
def test_instruct_equal_to_base_gives_identity(variant: str) -> None:
    p = projection(variant, E_B, E_B.clone(), MAPPING)  # type: ignore[arg-type]
    assert torch.allclose(p, torch.eye(2, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(propagate_rows(variant, E_B, E_B_PRIME, E_B.clone(), MAPPING), E_B_PRIME, atol=1e-5)  # type: ignore[arg-type]


@pytest.mark.parametrize("variant", ["overlap", "conversion"])
def test_known_projection_is_recovered(variant: str) -> None:
    e_i = E_B @ Q
    assert torch.allclose(projection(variant, E_B, e_i, MAPPING).float(), Q, atol=1e-5)  # type: ignore[arg-type]
    assert torch.allclose(propagate_rows(variant, E_B, E_B_PRIME, e_i, MAPPING), E_B_PRIME @ Q, atol=1e-5)  # type: ignore[arg-type]


def test_swap_ignores_the_instruct_rows() -> None:
    assert torch.equal(propagate_rows("swap", E_B, E_B_PRIME, E_B @ Q, MAPPING), E_B_PRIME)


def test_overlap_fits_only_the_shared_tokens() -> None:
    e_i = E_B @ Q
    e_i[1] += 100.0  # old token 1 is not shared: overlap must ignore it, conversion must not
    assert torch.allclose(projection("overlap", E_B, e_i, MAPPING).float(), Q, atol=1e-5)
    assert not torch.allclose(projection("conversion", E_B, e_i, MAPPING).float(), Q, atol=1e-2)


def test_unknown_variant_and_empty_overlap_are_refused() -> None:
    with pytest.raises(AdaptationInputError, match="unknown LEP variant"):
        projection("average", E_B, E_B, MAPPING)  # type: ignore[arg-type]
    disjoint = VocabMapping(old_size=4, new_size=1, overlap={}, pieces=[[0, 1]])
    with pytest.raises(AdaptationInputError, match="shared"):
        projection("overlap", E_B, E_B, disjoint)


@pytest.fixture(scope="module")
def new_tokenizer(english_byte_level_tokenizer, ru_corpus):
    return build_vocab(english_byte_level_tokenizer, ru_corpus, VocabConfig(new_tokens=1500)).tokenizer


def _models(tiny_model, old_tok, new_tok, *, tied: bool, q: torch.Tensor | None):
    """B random; B' = B on the new vocab with "trained" embeddings; I = B with perturbed layers, E_I = E_B Q."""
    base = tiny_model(len(old_tok), tied=tied, seed=1, hidden=16)
    adapted = copy.deepcopy(base)
    change_vocabulary(adapted, old_tok, new_tok, InitConfig())
    with torch.no_grad():
        adapted.get_input_embeddings().weight.add_(0.1 * torch.randn_like(adapted.get_input_embeddings().weight))
        if not tied:
            adapted.get_output_embeddings().weight.mul_(1.5)
    instruct = copy.deepcopy(base)
    with torch.no_grad():
        for param in instruct.model.layers.parameters():
            param.add_(0.01)
        if q is not None:
            head = None if tied else instruct.get_output_embeddings().weight @ q
            set_vocab_rows(instruct, instruct.get_input_embeddings().weight @ q, head)
    return base, adapted, instruct


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("variant", ["swap", "overlap", "conversion"])
def test_propagate_model_recovers_q_and_keeps_layers(
    tiny_model, english_byte_level_tokenizer, new_tokenizer, tied: bool, variant: str
) -> None:
    torch.manual_seed(0)
    q = torch.eye(16) + 0.3 * torch.randn(16, 16)
    old_tok = english_byte_level_tokenizer
    base, adapted, instruct = _models(tiny_model, old_tok, new_tokenizer, tied=tied, q=q)
    layers = {k: v.clone() for k, v in instruct.model.layers.state_dict().items()}
    norm = instruct.model.norm.weight.clone()
    e_i_old = instruct.get_input_embeddings().weight.detach().clone()
    tokenizer, report = propagate_embeddings(
        base=base,
        base_tokenizer=old_tok,
        adapted=adapted,
        adapted_tokenizer=new_tokenizer,
        instruct=instruct,
        instruct_tokenizer=old_tok,
        variant=variant,  # type: ignore[arg-type]
    )
    e_out = instruct.get_input_embeddings().weight.detach()
    e_adapted = adapted.get_input_embeddings().weight.detach()
    assert e_out.shape == e_adapted.shape and len(tokenizer) == len(new_tokenizer)
    assert (instruct.get_output_embeddings().weight is instruct.get_input_embeddings().weight) is tied
    expected = e_adapted if variant == "swap" else e_adapted @ q
    specials = set(tokenizer.convert_tokens_to_ids(report.carried_special_tokens))
    ordinary = [i for i in range(len(tokenizer)) if i not in specials]
    assert torch.allclose(e_out[ordinary], expected[ordinary], atol=1e-4)
    if not tied:
        h_expected = adapted.get_output_embeddings().weight.detach()
        h_expected = h_expected if variant == "swap" else h_expected @ q
        assert torch.allclose(instruct.get_output_embeddings().weight[ordinary], h_expected[ordinary], atol=1e-4)
    for content in report.carried_special_tokens:  # chat tokens: rows copied from I
        assert torch.equal(
            e_out[tokenizer.convert_tokens_to_ids(content)], e_i_old[old_tok.convert_tokens_to_ids(content)]
        )
    for name, value in instruct.model.layers.state_dict().items():  # transformer weights untouched, bit for bit
        assert torch.equal(value, layers[name])
    assert torch.equal(instruct.model.norm.weight, norm)
    assert tokenizer.chat_template == old_tok.chat_template and tokenizer.eos_token == old_tok.eos_token


@pytest.mark.parametrize("variant", ["swap", "overlap", "conversion"])
def test_instruct_equal_to_base_gives_the_adapted_base(
    tiny_model, english_byte_level_tokenizer, new_tokenizer, variant
):
    base, adapted, _ = _models(tiny_model, english_byte_level_tokenizer, new_tokenizer, tied=False, q=None)
    instruct = copy.deepcopy(base)
    propagate_embeddings(
        base=base,
        base_tokenizer=english_byte_level_tokenizer,
        adapted=adapted,
        adapted_tokenizer=new_tokenizer,
        instruct=instruct,
        instruct_tokenizer=english_byte_level_tokenizer,
        variant=variant,
    )
    carried = english_byte_level_tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    keep = [i for i in range(len(new_tokenizer)) if i not in carried]
    for a, b in [
        (instruct.get_input_embeddings(), adapted.get_input_embeddings()),
        (instruct.get_output_embeddings(), adapted.get_output_embeddings()),
    ]:
        assert torch.allclose(a.weight[keep], b.weight[keep], atol=1e-5)


def test_instruct_tokens_missing_from_the_new_vocab_are_carried(tiny_model, english_byte_level_tokenizer, ru_corpus):
    replacing = build_vocab(
        english_byte_level_tokenizer, ru_corpus, VocabConfig(method="bpe", vocab_size=900)
    ).tokenizer
    instruct_tok = copy.deepcopy(english_byte_level_tokenizer)
    instruct_tok.add_special_tokens({"additional_special_tokens": ["<|tool_call|>"]})
    base = tiny_model(len(instruct_tok), seed=2)
    adapted = copy.deepcopy(base)
    change_vocabulary(adapted, instruct_tok, replacing, InitConfig())
    instruct = copy.deepcopy(base)
    tokenizer, report = propagate_embeddings(
        base=base,
        base_tokenizer=instruct_tok,
        adapted=adapted,
        adapted_tokenizer=replacing,
        instruct=instruct,
        instruct_tokenizer=instruct_tok,
        variant="conversion",
    )
    assert "<|tool_call|>" in report.carried_special_tokens and len(tokenizer) == len(replacing) + 1
    new_id = tokenizer.convert_tokens_to_ids("<|tool_call|>")
    assert torch.equal(instruct.get_input_embeddings().weight[new_id], base.get_input_embeddings().weight[-1])
    assert tokenizer.decode(tokenizer.encode("<|tool_call|>привет", add_special_tokens=False)) == "<|tool_call|>привет"


def test_incompatible_models_are_refused(tiny_model, english_byte_level_tokenizer, new_tokenizer) -> None:
    base = tiny_model(len(english_byte_level_tokenizer), hidden=16)
    other = tiny_model(len(english_byte_level_tokenizer), hidden=32)
    with pytest.raises(AdaptationInputError, match="architectures"):
        propagate_embeddings(
            base=base,
            base_tokenizer=english_byte_level_tokenizer,
            adapted=base,
            adapted_tokenizer=new_tokenizer,
            instruct=other,
            instruct_tokenizer=english_byte_level_tokenizer,
            variant="swap",
        )


def test_lora_delta_learned_on_base_is_merged_into_instruct_with_a_scale(
    tmp_path, tiny_model, english_byte_level_tokenizer, ru_corpus
) -> None:
    from langadapt.core.adaptation.config import CPTConfig
    from langadapt.core.adaptation.propagate import merge_layer_delta
    from langadapt.core.adaptation.train.cpt import run_cpt

    tok = english_byte_level_tokenizer
    base = tiny_model(len(tok), seed=4)
    trained = copy.deepcopy(base)
    config = CPTConfig(
        trainable="lora+head",
        steps=3,
        seq_len=32,
        batch_size=2,
        grad_accum=1,
        warmup_steps=0,
        lr=5e-2,
        lora_r=4,
        lora_alpha=8,
        checkpoint_every=3,
    )
    result = run_cpt(trained, tok, ru_corpus, config, str(tmp_path / "cpt"))
    instruct = tiny_model(len(tok), seed=5)
    before = copy.deepcopy(instruct)
    merged = merge_layer_delta(instruct, result.adapter_dir, scale=0.5)
    assert merged == 2 * 7  # two layers x (q, k, v, o, gate, up, down)
    for name, weight in instruct.model.layers.named_parameters():
        delta_base = trained.model.layers.get_parameter(name) - base.model.layers.get_parameter(name)
        expected = before.model.layers.get_parameter(name) + 0.5 * delta_base
        assert torch.allclose(weight, expected, atol=1e-5), name
    assert torch.equal(instruct.get_input_embeddings().weight, before.get_input_embeddings().weight)
    with pytest.raises(AdaptationInputError, match="not a LoRA adapter"):
        merge_layer_delta(instruct, str(tmp_path))
