"""Token texts are decoded before comparison or re-tokenisation (the reference code's byte-symbol flaw)."""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from langadapt.core.adaptation.config import VocabConfig
from langadapt.core.adaptation.mapping import VocabMapping
from langadapt.core.adaptation.tokens import Scheme, TokenKey, Vocabulary
from langadapt.core.adaptation.vocab import build_vocab


def test_byte_level_cyrillic_tokens_decode_to_their_text(english_byte_level_tokenizer, ru_corpus) -> None:
    new = build_vocab(english_byte_level_tokenizer, ru_corpus, VocabConfig(method="bpe", vocab_size=2000)).tokenizer
    vocab = Vocabulary(new)
    assert vocab.scheme is Scheme.BYTE_LEVEL
    token_id = new.encode("привет", add_special_tokens=False)[0]
    piece = new.convert_ids_to_tokens(token_id)
    assert piece.startswith("Ð") or piece.startswith("Ñ")  # stored as byte symbols ...
    key = vocab.key(token_id)
    assert key.kind == "text" and "привет".startswith(key.value.decode("utf-8"))  # ... but keyed by real text


def test_old_tokenisation_uses_the_text_not_the_raw_byte_symbols(english_byte_level_tokenizer, ru_corpus) -> None:
    old = Vocabulary(english_byte_level_tokenizer)
    new_tokenizer = build_vocab(
        english_byte_level_tokenizer, ru_corpus, VocabConfig(method="bpe", vocab_size=2000)
    ).tokenizer
    mapping = VocabMapping.build(old, Vocabulary(new_tokenizer))
    cyrillic = [
        i for i, k in enumerate(Vocabulary(new_tokenizer).keys) if k and len(k.value) >= 4 and k.value[0] >= 0xD0
    ]
    assert cyrillic
    for new_id in cyrillic[:50]:
        text = Vocabulary(new_tokenizer).keys[new_id].value
        pieces = mapping.pieces[new_id]
        # the old pieces spell exactly the new token's bytes
        assert b"".join(old.keys[i].value for i in pieces) == text
        # the flawed way: tokenising the raw symbols as text gives different, longer byte strings
        raw = new_tokenizer.convert_ids_to_tokens(new_id)
        flawed = english_byte_level_tokenizer.encode(raw, add_special_tokens=False)
        assert b"".join(old.keys[i].value for i in flawed) != text


def test_metaspace_words_are_not_given_an_extra_prefix(mistral_tokenizer: PreTrainedTokenizerFast) -> None:
    vocab = Vocabulary(mistral_tokenizer)
    assert vocab.scheme is Scheme.METASPACE
    inner = vocab.tokenize_bytes("вет".encode())
    assert b"".join(vocab.keys[i].value for i in inner) == "вет".encode()
    word = vocab.tokenize_bytes(" при".encode())
    assert vocab.keys[word[0]].value.startswith(b" ")
    # a lone UTF-8 continuation byte goes to the byte-fallback piece
    assert vocab.tokenize_bytes(b"\xb8") == [mistral_tokenizer.convert_tokens_to_ids("<0xB8>")]
    assert vocab.key(mistral_tokenizer.convert_tokens_to_ids("<0x41>")) == TokenKey("byte", b"A")
    assert vocab.key(1) == TokenKey("special", b"<s>")
