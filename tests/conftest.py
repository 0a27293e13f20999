"""Shared fixtures: small slices of the real corpora, small real tokenizers trained here, tiny random models."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from langadapt.core.adaptation.corpus import iter_documents


def _shared_data() -> Path:
    """`../shared/data` beside the checkout; `LANGADAPT_SHARED_DATA` or the machine's /work/shared for clones
    elsewhere (a CI clone in a temporary folder)."""
    if configured := os.environ.get("LANGADAPT_SHARED_DATA"):
        return Path(configured)
    beside = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    machine = Path("/work/shared/data")
    return beside if beside.is_dir() or not machine.is_dir() else machine


SHARED_DATA = _shared_data()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(autouse=True, scope="session")
def _own_langadapt_home(tmp_path_factory: pytest.TempPathFactory):
    """Nothing a test runs may write to the user's real data folder (the settings' default)."""
    previous = os.environ.get("LANGADAPT_HOME")
    os.environ["LANGADAPT_HOME"] = str(tmp_path_factory.mktemp("langadapt-home"))
    yield
    if previous is None:
        del os.environ["LANGADAPT_HOME"]
    else:
        os.environ["LANGADAPT_HOME"] = previous


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids oversubscription (10-100x faster)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def shared_file(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"shared data missing: {path}")
    return path


def _slice(relative: str, chars: int) -> list[str]:
    return list(iter_documents(str(shared_file(relative)), limit_chars=chars))


@pytest.fixture(scope="session")
def ru_texts() -> list[str]:
    """~400 K characters of Russian literature."""
    return _slice("ru/ruslit.jsonl.xz", 400_000)


@pytest.fixture(scope="session")
def en_texts() -> list[str]:
    return _slice("en/ewt.jsonl.xz", 300_000)


@pytest.fixture(scope="session")
def ru_corpus(tmp_path_factory: pytest.TempPathFactory, ru_texts: list[str]) -> str:
    """The Russian slice as a .jsonl corpus file."""
    path = tmp_path_factory.mktemp("corpus") / "ru.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in ru_texts), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def english_byte_level_tokenizer(en_texts: list[str]) -> PreTrainedTokenizerFast:
    """A real byte-level BPE (GPT-2 / SmolLM2 style) trained on English only, with chat tokens and template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1200,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(en_texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


@pytest.fixture(scope="session")
def mistral_tokenizer() -> PreTrainedTokenizerFast:
    """The real Mistral-7B v1 SentencePiece tokenizer (byte fallback, Metaspace)."""
    pytest.importorskip("mistral_common")
    from langadapt.core.adaptation.sources import load_tokenizer

    return load_tokenizer("mistral-7b-v1")


ModelFactory = Callable[..., LlamaForCausalLM]


@pytest.fixture(scope="session")
def tiny_model() -> ModelFactory:
    """Build a tiny random Llama-shaped causal LM (hidden 32, 2 layers) for a given vocabulary size."""

    def build(vocab_size: int, *, tied: bool = True, seed: int = 0, hidden: int = 32) -> LlamaForCausalLM:
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=tied,
        )
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0.0, 0.5, generator=None)
        model.tie_weights()
        return model.eval()

    return build


def sample_texts() -> list[str]:
    """Texts a tokenizer must round-trip: Cyrillic, Latin, digits, emoji, odd whitespace, rare scripts."""
    return [
        "Привет, мир! Как дела? 12345",
        "съешь же ещё этих мягких французских булок, да выпей чаю",
        "Hello  world\n\ttabs and  double spaces 😀 🇷🇺",
        "Ёлка, ёжик; «кавычки» — тире… № 7 ½ ∑ 東京 العربية",
        " leading space and trailing ",
    ]
