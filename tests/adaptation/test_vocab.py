"""The four vocabulary methods on real tokenizers (a byte-level one trained here, the real Mistral SentencePiece)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from transformers import PreTrainedTokenizerFast

from langadapt.core.adaptation.config import VocabConfig
from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.core.adaptation.spec import error_field
from langadapt.core.adaptation.tokens import Vocabulary
from langadapt.core.adaptation.vocab import build_vocab
from langadapt.core.adaptation.vocab.common import chars_per_token
from tests.conftest import sample_texts

HELDOUT = 40_000


def _assert_lossless(tokenizer: PreTrainedTokenizerFast, source: PreTrainedTokenizerFast) -> None:
    """Every sample round-trips exactly as through the source tokenizer (HF's SentencePiece conversion drops one
    leading space, so the source defines what "exactly" means there)."""
    for text in sample_texts():
        ids = tokenizer.encode(text, add_special_tokens=False)
        expected = text if not text.startswith(" ") else source.decode(source.encode(text, add_special_tokens=False))
        assert tokenizer.decode(ids) == expected
        if tokenizer.unk_token_id is not None:
            assert tokenizer.unk_token_id not in ids


@pytest.fixture(params=["byte_level", "mistral"])
def source(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    name = "english_byte_level_tokenizer" if request.param == "byte_level" else "mistral_tokenizer"
    return request.getfixturevalue(name)


@pytest.fixture(scope="module")
def llama3_tokenizer() -> PreTrainedTokenizerFast:
    """LLaMa-3 keeps its 256 special tokens outside the BPE model vocabulary, after a gap-free 128,000."""
    pytest.importorskip("llama_models")
    from langadapt.core.adaptation.sources import load_tokenizer

    return load_tokenizer("llama-3")


@pytest.mark.parametrize("method", ["extended", "optimized"])
def test_specials_outside_the_model_vocabulary_keep_their_identity(
    method: str, llama3_tokenizer: PreTrainedTokenizerFast, ru_corpus: str
) -> None:
    pruning = {"keep_tokens": 20_000, "keep_by": "first-ids"} if method == "optimized" else {}
    config = VocabConfig(method=method, new_tokens=2000, heldout_chars=HELDOUT, **pruning)  # type: ignore[arg-type]
    result = build_vocab(llama3_tokenizer, ru_corpus, config)
    tokenizer, vocab = result.tokenizer, result.tokenizer.get_vocab()
    assert sorted(vocab.values()) == list(range(len(tokenizer)))  # no id is used twice
    assert result.report.new_tokens > 100
    for special in ("<|begin_of_text|>", "<|eot_id|>", "<|reserved_special_token_245|>"):
        if method == "extended":
            assert vocab[special] == llama3_tokenizer.convert_tokens_to_ids(special)
        assert tokenizer.decode(tokenizer.encode(f"a{special}б", add_special_tokens=False)) == f"a{special}б"
        assert len(tokenizer.encode(special, add_special_tokens=False)) == 1
    if method == "extended":
        assert result.report.removed_tokens == 0
    _assert_lossless(tokenizer, llama3_tokenizer)


@pytest.mark.parametrize("method", ["bpe", "unigram"])
def test_replacing_vocabulary_is_lossless_and_more_efficient_on_russian(
    method: str, source: PreTrainedTokenizerFast, ru_corpus: str
) -> None:
    config = VocabConfig(method=method, vocab_size=4000, heldout_chars=HELDOUT)  # type: ignore[arg-type]
    result = build_vocab(source, ru_corpus, config)
    tokenizer, report = result.tokenizer, result.report
    _assert_lossless(tokenizer, source)
    assert report.vocab_size == len(tokenizer) <= 4000
    assert report.new_tokens + report.overlapping_tokens == len(Vocabulary(tokenizer).id_by_key)
    assert report.chars_per_token > report.source_chars_per_token
    assert tokenizer.chat_template == source.chat_template
    for special in Vocabulary(source).special_ids:  # the source's special tokens survive by name
        assert source.convert_ids_to_tokens(special) in tokenizer.get_vocab()
    # digits are split one by one
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode("1234567", add_special_tokens=False))
    assert "".join(pieces).count("1234567"[0]) == 1 and all(len(p.strip("▁Ġ")) <= 1 for p in pieces)


@pytest.mark.parametrize("priority", ["new-first", "old-first"])
def test_extended_keeps_every_source_id_and_appends(
    priority: str, source: PreTrainedTokenizerFast, ru_corpus: str, en_texts: list[str]
) -> None:
    config = VocabConfig(new_tokens=3000, heldout_chars=HELDOUT, priority=priority)  # type: ignore[arg-type]
    result = build_vocab(source, ru_corpus, config)
    tokenizer, report = result.tokenizer, result.report
    _assert_lossless(tokenizer, source)
    old_vocab, new_vocab = source.get_vocab(), tokenizer.get_vocab()
    assert all(new_vocab[piece] == idx for piece, idx in old_vocab.items())
    assert sorted(new_vocab.values()) == list(range(len(tokenizer)))
    assert report.removed_tokens == 0 and report.overlapping_tokens == len(old_vocab)
    assert report.vocab_size == len(old_vocab) + report.new_tokens
    assert report.chars_per_token > report.source_chars_per_token
    english = en_texts[:200]
    if priority == "old-first":
        # Source merges run first, so source-language text keeps its tokenization except where a target merge
        # joins two pieces the source left apart (Latin words in the Russian corpus): nearly never.
        same = sum(source.encode(t) == tokenizer.encode(t) for t in english)
        assert same >= 0.9 * len(english)
        assert chars_per_token(tokenizer, english) == pytest.approx(chars_per_token(source, english), rel=0.01)
    else:
        assert chars_per_token(tokenizer, english) > 0.9 * chars_per_token(source, english)


@pytest.mark.parametrize("keep_by", ["frequency", "first-ids"])
def test_optimized_keeps_specials_and_bytes_and_reports_removed(
    keep_by: str, source: PreTrainedTokenizerFast, ru_corpus: str, en_texts: list[str], tmp_path
) -> None:
    en_path = tmp_path / "en.txt"
    en_path.write_text("\n".join(en_texts), encoding="utf-8")
    keep = 600
    config = VocabConfig(
        method="optimized",
        new_tokens=1500,
        keep_tokens=keep,
        keep_by=keep_by,  # type: ignore[arg-type]
        heldout_chars=HELDOUT,
        source_corpus=str(en_path),
    )
    result = build_vocab(source, ru_corpus, config)
    tokenizer, report = result.tokenizer, result.report
    _assert_lossless(tokenizer, source)
    new_vocab = tokenizer.get_vocab()
    source_vocab = Vocabulary(source)
    assert sorted(new_vocab.values()) == list(range(len(tokenizer)))
    for special in source_vocab.special_ids:
        assert source.convert_ids_to_tokens(special) in new_vocab
    for byte in range(256):  # byte fallbacks / byte symbols are never dropped
        piece = f"<0x{byte:02X}>" if source_vocab.scheme.value == "metaspace" else None
        if piece:
            assert piece in new_vocab
    kept = len(source_vocab.json["model"]["vocab"]) - len(result.removed)
    assert kept >= keep and kept <= keep + 64  # N, plus at most a few merge parents / protected tokens
    assert set(result.removed).isdisjoint(source.get_vocab().keys() - set(source.get_vocab()) - set(result.removed))
    assert report.chars_per_token > report.source_chars_per_token
    if keep_by == "first-ids":
        source_ids = source.get_vocab()
        removed_ids = sorted(source_ids[p] for p in result.removed)
        assert removed_ids[0] >= keep - 300  # only late (high-id) tokens go


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"method": "wordpiece"}, "method"),
        ({"method": "bpe"}, "vocab_size"),
        ({"method": "optimized"}, "keep_tokens"),
        ({"method": "bpe", "vocab_size": 900, "new_tokens": 100}, "new_tokens"),
        ({"method": "bpe", "vocab_size": 900, "priority": "old-first"}, "priority"),
        ({"method": "extended", "keep_tokens": 100}, "keep_tokens"),
        ({"method": "extended", "source_corpus": "en.txt"}, "source_corpus"),
        ({"new_tokens": 0}, "new_tokens"),
    ],
)
def test_settings_that_do_not_fit_the_method_are_refused(settings: dict, field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        VocabConfig(**settings)
    assert error_field(caught.value.errors()[0]) == field


def test_unusable_sizes_are_clear_errors(english_byte_level_tokenizer: PreTrainedTokenizerFast, ru_corpus: str) -> None:
    with pytest.raises(AdaptationInputError, match="too small"):
        build_vocab(english_byte_level_tokenizer, ru_corpus, VocabConfig(method="bpe", vocab_size=100))


def test_extended_refuses_a_unigram_source(english_byte_level_tokenizer, ru_corpus: str) -> None:
    config = VocabConfig(method="unigram", vocab_size=1000)
    unigram = build_vocab(english_byte_level_tokenizer, ru_corpus, config).tokenizer
    with pytest.raises(AdaptationInputError, match="BPE"):
        build_vocab(unigram, ru_corpus, VocabConfig(new_tokens=1000))


def test_target_first_tokenizes_the_source_language_exactly_as_old_first(
    source: PreTrainedTokenizerFast, ru_corpus: str, ru_texts: list[str], en_texts: list[str]
) -> None:
    built = {
        priority: build_vocab(source, ru_corpus, VocabConfig(new_tokens=3000, heldout_chars=HELDOUT, priority=priority))
        for priority in ("new-first", "old-first", "target-first")
    }
    target_first = built["target-first"].tokenizer
    _assert_lossless(target_first, source)
    english = en_texts[:300]
    assert all(target_first.encode(t) == built["old-first"].tokenizer.encode(t) for t in english)
    russian = ru_texts[:5]  # the held-out head of the corpus (HELDOUT characters are not trained on)
    density = {p: chars_per_token(result.tokenizer, [t[:8000] for t in russian]) for p, result in built.items()}
    # Russian gets the new-first segmentation for everything in Cyrillic: at least as dense as old-first, and as
    # new-first up to the few mixed-script merges (with Mistral, whose own Cyrillic merges compete, measurably so).
    assert density["target-first"] >= density["old-first"] and density["target-first"] >= 0.97 * density["new-first"]
    assert built["target-first"].report.details["priority"] == "target-first"
