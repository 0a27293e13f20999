"""Changing a model's vocabulary: exact copies for shared tokens, mean / random init for new ones."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from langadapt.core.adaptation.config import InitConfig, VocabConfig
from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.core.adaptation.surgery import change_vocabulary, has_tied_head
from langadapt.core.adaptation.tokens import Vocabulary
from langadapt.core.adaptation.vocab import build_vocab


@pytest.fixture(scope="module")
def extended(english_byte_level_tokenizer, ru_corpus):
    return build_vocab(english_byte_level_tokenizer, ru_corpus, VocabConfig(new_tokens=1500)).tokenizer


@pytest.fixture(scope="module")
def optimized(english_byte_level_tokenizer, ru_corpus):
    config = VocabConfig(method="optimized", new_tokens=1500, keep_tokens=700, keep_by="first-ids")
    return build_vocab(english_byte_level_tokenizer, ru_corpus, config).tokenizer


@pytest.mark.parametrize("tied", [True, False])
def test_mean_init_copies_shared_rows_and_averages_new_ones(
    tiny_model, english_byte_level_tokenizer, optimized, tied: bool
) -> None:
    old_tok, new_tok = english_byte_level_tokenizer, optimized
    model = tiny_model(len(old_tok), tied=tied)
    old_emb = model.get_input_embeddings().weight.detach().clone()
    old_head = model.get_output_embeddings().weight.detach().clone()
    layers_before = {k: v.clone() for k, v in model.model.layers.state_dict().items()}
    mapping = change_vocabulary(model, old_tok, new_tok, InitConfig()).mapping
    emb = model.get_input_embeddings().weight.detach()
    head = model.get_output_embeddings().weight.detach()
    assert emb.shape == (len(new_tok), old_emb.shape[1]) and model.config.vocab_size == len(new_tok)
    assert has_tied_head(model) is tied
    old_vocab = old_tok.get_vocab()
    for piece, new_id in new_tok.get_vocab().items():  # same token -> bit-identical row, whatever its new id
        if piece in old_vocab:
            assert torch.equal(emb[new_id], old_emb[old_vocab[piece]])
            assert torch.equal(head[new_id], (old_emb if tied else old_head)[old_vocab[piece]])
    new_vocab = Vocabulary(new_tok)
    for new_id in mapping.new_ids[:100]:
        text = new_vocab.keys[new_id].value
        old_ids = (
            old_tok.encode(text.decode("utf-8", errors="strict"), add_special_tokens=False) if _utf8(text) else None
        )
        expected = old_emb[mapping.pieces[new_id]].mean(dim=0)
        assert torch.allclose(emb[new_id], expected, atol=1e-6)
        if old_ids is not None and not text.startswith(b" "):
            assert mapping.pieces[new_id] == old_ids
    for layer_name, value in model.model.layers.state_dict().items():
        assert torch.equal(value, layers_before[layer_name])


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_optimized_renumbering_updates_special_token_ids(tiny_model, english_byte_level_tokenizer, optimized) -> None:
    model = tiny_model(len(english_byte_level_tokenizer))
    model.config.eos_token_id = english_byte_level_tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = [model.config.eos_token_id]
    change_vocabulary(model, english_byte_level_tokenizer, optimized, InitConfig())
    assert model.config.eos_token_id == optimized.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.eos_token_id == [optimized.convert_tokens_to_ids("<|im_end|>")]


def test_random_init_follows_the_old_rows_distribution(tiny_model, english_byte_level_tokenizer, extended) -> None:
    model = tiny_model(len(english_byte_level_tokenizer), hidden=16)
    old = model.get_input_embeddings().weight.detach().clone().double()
    mapping = change_vocabulary(
        model, english_byte_level_tokenizer, extended, InitConfig(method="random", seed=3)
    ).mapping
    fresh = model.get_input_embeddings().weight.detach()[mapping.new_ids].double()
    assert len(fresh) > 1000
    assert torch.allclose(fresh.mean(0), old.mean(0), atol=0.1)
    assert torch.allclose(torch.cov(fresh.T), torch.cov(old.T), atol=0.08)
    again = tiny_model(len(english_byte_level_tokenizer), hidden=16)
    change_vocabulary(again, english_byte_level_tokenizer, extended, InitConfig(method="random", seed=3))
    assert torch.equal(again.get_input_embeddings().weight, model.get_input_embeddings().weight)  # seeded


def test_mean_init_of_unknown_special_token_is_the_mean_row(tiny_model, english_byte_level_tokenizer, extended) -> None:
    extended.add_special_tokens({"additional_special_tokens": ["<|brand_new|>"]})
    model = tiny_model(len(english_byte_level_tokenizer))
    old = model.get_input_embeddings().weight.detach().clone()
    change_vocabulary(model, english_byte_level_tokenizer, extended, InitConfig())
    row = model.get_input_embeddings().weight[extended.convert_tokens_to_ids("<|brand_new|>")]
    assert torch.allclose(row, old.mean(0), atol=1e-6)


def test_mismatched_tokenizer_and_unknown_init_are_refused(tiny_model, english_byte_level_tokenizer, extended) -> None:
    small = tiny_model(100)
    with pytest.raises(AdaptationInputError, match="does not match"):
        change_vocabulary(small, english_byte_level_tokenizer, extended, InitConfig())
    with pytest.raises(ValidationError, match="method"):
        InitConfig(method="salt")  # type: ignore[arg-type]
