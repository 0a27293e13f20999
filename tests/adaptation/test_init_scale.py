"""The new rows' scale (logit control): fitted on target text with the model's own forward passes, applied to the
head side only, never worse than the unscaled rows on the fitting text; fixed factors; settings and named errors."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError

from langadapt.core.adaptation.config import InitConfig, VocabConfig
from langadapt.core.adaptation.corpus import require_documents
from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.core.adaptation.evaluate.bits_per_char import bits_per_char
from langadapt.core.adaptation.init.scale import BOUNDS, TRIALS, golden_section, head_matrix, scale_rows
from langadapt.core.adaptation.surgery import change_vocabulary, has_tied_head
from langadapt.core.adaptation.vocab import build_vocab
from langadapt.core.adaptation.weights import input_rows

FIT_CHARS = 2_000


@pytest.fixture(scope="module")
def extended(english_byte_level_tokenizer, ru_corpus):
    return build_vocab(english_byte_level_tokenizer, ru_corpus, VocabConfig(new_tokens=1500)).tokenizer


def test_golden_section_brackets_the_minimum() -> None:
    tried = golden_section(lambda x: (x - 0.6) ** 2, *BOUNDS, steps=TRIALS)
    assert len(tried) == TRIALS
    assert abs(min(tried, key=lambda x: tried[x]) - 0.6) < 0.02


@pytest.mark.parametrize("tied", [True, False])
def test_the_fitted_scale_multiplies_the_head_sides_new_rows(
    tiny_model, english_byte_level_tokenizer, extended, ru_corpus, tied: bool
) -> None:
    old_tok = english_byte_level_tokenizer
    reference = tiny_model(len(old_tok), tied=tied)
    change_vocabulary(reference, old_tok, extended, InitConfig())  # mean rows, unscaled
    model = tiny_model(len(old_tok), tied=tied)
    config = InitConfig(scale="fit", scale_chars=FIT_CHARS)
    change = change_vocabulary(model, old_tok, extended, config, corpus=ru_corpus)

    fit = change.scale_fit
    assert fit is not None and change.scale == fit.scale and BOUNDS[0] <= fit.scale <= BOUNDS[1]
    assert fit.bits_per_char <= fit.unscaled_bits_per_char
    new_ids = change.mapping.new_ids
    overlap = sorted(change.mapping.overlap)
    head, reference_head = head_matrix(model).detach(), head_matrix(reference).detach()
    torch.testing.assert_close(head[new_ids], reference_head[new_ids] * fit.scale)
    assert torch.equal(head[overlap], reference_head[overlap])
    assert has_tied_head(model) is tied
    if not tied:  # the input side keeps the method's rows
        assert torch.equal(input_rows(model), input_rows(reference))

    texts = list(require_documents(ru_corpus, limit_chars=FIT_CHARS))
    # At least as good as the unscaled rows; as the bounds up to the last bracket's width (the search does not
    # score the bounds themselves).
    for other, slack in ((1.0, 1e-6), (BOUNDS[0], 1e-2), (BOUNDS[1], 1e-2)):
        probe = copy.deepcopy(reference)
        scale_rows(probe, new_ids, other)
        assert bits_per_char(probe, extended, texts).bits_per_char >= fit.bits_per_char - slack
    assert bits_per_char(model, extended, texts).bits_per_char == pytest.approx(fit.bits_per_char, abs=1e-5)


def test_a_fixed_scale_needs_no_corpus(tiny_model, english_byte_level_tokenizer, extended) -> None:
    old_tok = english_byte_level_tokenizer
    reference, model = tiny_model(len(old_tok)), tiny_model(len(old_tok))
    change_vocabulary(reference, old_tok, extended, InitConfig())
    change = change_vocabulary(model, old_tok, extended, InitConfig(scale=0.5))
    assert change.scale == 0.5 and change.scale_fit is None
    new_ids = change.mapping.new_ids
    torch.testing.assert_close(input_rows(model)[new_ids], input_rows(reference)[new_ids] * 0.5)


def test_scale_settings_and_named_errors(tiny_model, english_byte_level_tokenizer, extended) -> None:
    assert InitConfig().resolved_scale == 1.0  # the paper's mean rows, as they are
    assert InitConfig(method="focus").resolved_scale == "fit"
    assert InitConfig(method="regression", scale=0.9).resolved_scale == 0.9
    assert InitConfig(scale="fit", scale_chars=5_000).scale_chars == 5_000
    with pytest.raises(ValidationError, match="scale_chars only applies"):
        InitConfig(scale_chars=5_000)
    with pytest.raises(ValidationError):
        InitConfig(scale=0)
    model = tiny_model(len(english_byte_level_tokenizer))
    with pytest.raises(AdaptationInputError, match="scale 'fit'.*corpus"):
        change_vocabulary(model, english_byte_level_tokenizer, extended, InitConfig(scale="fit"))
