"""Self-calibration: SFT on chat examples (masking, loss, LoRA on the first and last layers merged away, frozen
weights untouched, determinism) and the calibration set (filters, answer cache, copy examples, prompt files)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from langadapt.core.adaptation.calibration import (
    COPY_INSTRUCTIONS,
    DROP_REASONS,
    SELF_CALIBRATION_TEMPLATES,
    answer_problem,
    build_calibration_set,
    copy_examples,
    read_prompt_file,
    repeated_ngram_ratio,
    self_calibration_prompts,
)
from langadapt.core.adaptation.config import CalibrationConfig
from langadapt.core.adaptation.errors import AdaptationInputError, TrainingDiverged
from langadapt.core.adaptation.evaluate.generation import prompt_ids
from langadapt.core.adaptation.scripts import script_profile, script_share
from langadapt.core.adaptation.train.sft import IGNORE_INDEX, SFTConfig, encode_chat, lora_layer_indices, run_sft

EXAMPLES = [
    {
        "messages": [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue, like the sky."},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "Two plus two?"},
            {"role": "assistant", "content": "Four."},
            {"role": "user", "content": "And three plus three?"},
            {"role": "assistant", "content": "Six, of course."},
        ]
    },
    {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello there, friend!"}]},
]


@pytest.fixture()
def tok(english_byte_level_tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    return english_byte_level_tokenizer


def four_layer_model(vocab_size: int, *, tied: bool) -> LlamaForCausalLM:
    """A tiny random Llama with layers between the first and the last (the conftest factory has two)."""
    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).eval()


def sft(**overrides: Any) -> SFTConfig:
    values: dict[str, Any] = dict(lr=1e-2, batch_size=2, grad_accum=1, warmup_ratio=0.0, log_every=1)
    return SFTConfig(**{**values, **overrides})


# ---- SFT ----


def test_encode_chat_labels_only_the_assistant_turns(tok):
    messages = EXAMPLES[2]["messages"]
    item = encode_chat(tok, messages, max_len=1024)
    full = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert item.input_ids == list(full) and not item.truncated
    learned = [token for token, label in zip(item.input_ids, item.labels, strict=True) if label != IGNORE_INDEX]
    assert tok.decode(learned) == "Four.<|im_end|>\nSix, of course.<|im_end|>\n"
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(item.input_ids, item.labels, strict=True))
    # the first answer starts exactly where generation starts at inference
    prompt = tok.apply_chat_template(messages[:2], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert item.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert item.labels[len(prompt)] == item.input_ids[len(prompt)]
    # a control token inside a message is text, as at inference
    tricky = [{"role": "user", "content": "end<|im_end|>here"}, {"role": "assistant", "content": "ok"}]
    encoded = encode_chat(tok, tricky, max_len=1024)
    assert encoded.input_ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 2  # the template's two only
    assert encoded.input_ids[: len(prompt_ids(tok, "end<|im_end|>here", ""))] == prompt_ids(
        tok, "end<|im_end|>here", ""
    )
    # truncation keeps the beginning
    short = encode_chat(tok, messages, max_len=10)
    assert short.truncated and short.input_ids == item.input_ids[:10] and short.loss_tokens == 0


def test_first_loss_is_the_assistant_token_loss_and_it_decreases(tiny_model, tok):
    model = tiny_model(len(tok))
    encoded = [encode_chat(tok, e["messages"], 1024) for e in EXAMPLES]
    with torch.no_grad():
        nats = tokens = all_nats = all_tokens = 0.0
        for item in encoded:
            ids = torch.tensor([item.input_ids])
            logits = model(input_ids=ids).logits[0, :-1]
            labels = torch.tensor(item.labels[1:])
            per_token = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
            keep = labels != IGNORE_INDEX
            nats += float(per_token[keep].sum())
            tokens += int(keep.sum())
            all_nats += float(per_token.sum())
            all_tokens += len(per_token)
    reports: list[dict] = []
    result = run_sft(model, tok, EXAMPLES, sft(trainable="full", batch_size=4, epochs=40), progress=reports.append)
    assert result.first_loss == pytest.approx(nats / tokens, rel=1e-4)  # prompt tokens carry no loss
    assert abs(nats / tokens - all_nats / all_tokens) > 1e-3
    assert result.steps == result.total_steps == 40 and len(reports) == 40
    assert result.tokens == 40 * tokens and result.examples == 4 and result.skipped == 0
    assert result.final_loss is not None and result.final_loss < 0.3 * result.first_loss
    assert [r["step"] for r in reports] == list(range(1, 41)) and reports[-1]["loss"] == result.final_loss


@pytest.mark.parametrize("tied", [True, False])
def test_lora_on_first_and_last_layers_is_merged_and_the_rest_is_untouched(tok, tied):
    model = four_layer_model(len(tok), tied=tied)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    grads_before = {name: p.requires_grad for name, p in model.named_parameters()}
    result = run_sft(model, tok, EXAMPLES, sft(lr=5e-2, epochs=3, lora_alpha=8.0))
    assert result.steps == 6 and not result.cancelled
    after = model.state_dict()
    assert list(after) == list(before)  # no LoRA keys left
    assert not any("peft" in type(m).__module__ for m in model.modules())
    assert not hasattr(model, "peft_config") or not model.peft_config
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    expected = {
        name
        for name in before
        if any(name.startswith(f"model.layers.{i}.") for i in (0, 3)) and any(p in name for p in projections)
    }
    expected |= {"model.embed_tokens.weight", "lm_head.weight"}  # one shared matrix when tied
    assert changed == expected
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    for name in before:
        if name not in expected:
            assert torch.equal(before[name], after[name]), name  # bit-identical
        assert after[name].dtype == before[name].dtype
    assert not model.training
    assert {name: p.requires_grad for name, p in model.named_parameters()} == grads_before


def test_sft_is_deterministic(tiny_model, tok):
    weights = []
    for _ in range(2):
        model = tiny_model(len(tok), tied=False)
        run_sft(model, tok, EXAMPLES, sft(epochs=2, seed=3, trainable="lora+head"))
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_sft_cancel_and_skipped_examples(tiny_model, tok):
    model = tiny_model(len(tok))
    too_long = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "x"}]}
    result = run_sft(model, tok, [*EXAMPLES, too_long], sft(max_len=64, epochs=5), should_cancel=lambda: True)
    assert result.cancelled and result.steps == 1 and result.skipped == 1 and result.examples == 4
    assert not any("lora" in name for name in model.state_dict())


def test_a_non_finite_loss_stops_sft(tiny_model, tok):
    model = tiny_model(len(tok))
    with torch.no_grad():
        model.get_input_embeddings().weight.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="sft diverged") as caught:
        run_sft(model, tok, EXAMPLES, sft(epochs=2))
    assert caught.value.code == "training_diverged"
    assert not any("lora" in name for name, _ in model.named_modules())  # the adapter is dropped, not merged


def test_sft_rejects_bad_input(tiny_model, tok):
    model = tiny_model(len(tok))
    with pytest.raises(ValidationError, match="trainable"):
        SFTConfig(trainable="embeddings")
    with pytest.raises(ValidationError, match="learning_rate"):
        SFTConfig.model_validate({"learning_rate": 1.0})
    with pytest.raises(AdaptationInputError, match="out of range"):
        lora_layer_indices(model, (0, 5))
    assert lora_layer_indices(model, (0, -1)) == [0, 1] and lora_layer_indices(model, None) is None
    no_answer = {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(AdaptationInputError, match="no assistant message"):
        run_sft(model, tok, [no_answer], sft())
    with pytest.raises(AdaptationInputError, match="role"):
        run_sft(model, tok, [{"messages": [{"role": "user"}]}], sft())
    plain = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="<|im_end|>")
    with pytest.raises(AdaptationInputError, match="chat template"):
        run_sft(model, plain, EXAMPLES, sft())


# ---- filters ----


def test_filters_name_each_reason(ru_texts):
    profile = script_profile(ru_texts[:3])
    assert profile.script == "CYRILLIC" and profile.share > 0.9
    options = CalibrationConfig()
    good = "Это рассказ о том, как молодой человек возвращается в родной город после долгой разлуки."
    assert answer_problem(good, True, profile, options) is None
    assert answer_problem("  \n", True, profile, options) == "empty"
    assert answer_problem(good, False, profile, options) == "truncated"
    loop = "Он пошёл домой. " * 12
    assert repeated_ngram_ratio(loop, 20) > 0.8 > 0.05 > repeated_ngram_ratio(good, 20)
    assert answer_problem(loop, True, profile, options) == "repetition"
    english = "This story tells of a young man who returns to his home town after a long absence."
    assert answer_problem(english, True, profile, options) == "wrong_language"
    assert answer_problem("Ответ: the answer is 42, то есть сорок два.", True, profile, options) is None
    assert answer_problem("12 + 30 = 42", True, profile, options) is None  # no letters: not judged
    assert script_share("abc где", "LATIN") == pytest.approx(0.5)
    latin = script_profile(["Plain English text, with a few words."])
    assert latin.script == "LATIN" and answer_problem(good, True, latin, options) == "wrong_language"


# ---- the calibration set ----


class CountingGenerate:
    """Wraps a model's `generate` to count the prompts it is asked to answer."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        self.inner, self.prompts = model.generate, 0
        model.generate = self  # type: ignore[method-assign]

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.prompts += len(kwargs["input_ids"])
        return self.inner(*args, **kwargs)


def small_options(**overrides: Any) -> CalibrationConfig:
    values: dict[str, Any] = dict(
        method="self+copy",
        self_calibration_examples=6,
        copy_examples=4,
        max_new_tokens=6,
        batch_size=4,
        passage_max_chars=60,
        passage_min_chars=20,
        corpus_chars=60_000,
    )
    return CalibrationConfig(**{**values, **overrides})


def test_answers_are_cached_and_reused(tiny_model, tok, ru_corpus, tmp_path):
    model = tiny_model(len(tok))
    counter = CountingGenerate(model)
    cache = str(tmp_path / "cache" / "answers.jsonl")
    examples, stats = build_calibration_set(model, tok, ru_corpus, small_options(), cache)
    assert (stats.generated, stats.reused, stats.prompts, counter.prompts) == (6, 0, 6, 6)
    assert stats.kept + sum(stats.dropped.values()) == 6 and set(stats.dropped) == set(DROP_REASONS)
    assert stats.prompt_source == "corpus" and stats.script == "CYRILLIC" and stats.language == "ru"
    assert len(examples) == stats.examples == stats.kept + stats.copy_examples and stats.copy_examples == 4
    lines = Path(cache).read_text(encoding="utf-8").splitlines()
    assert len(lines) == 7 and json.loads(lines[0])["max_new_tokens"] == 6
    mtime = os.stat(cache).st_mtime_ns

    again, stats2 = build_calibration_set(model, tok, ru_corpus, small_options(), cache)
    assert (stats2.generated, stats2.reused, counter.prompts) == (0, 6, 6)  # nothing generated
    assert again == examples and os.stat(cache).st_mtime_ns == mtime

    _, more = build_calibration_set(model, tok, ru_corpus, small_options(self_calibration_examples=8), cache)
    assert (more.generated, more.reused, counter.prompts) == (2, 6, 8)  # the prompts are prefix-stable: resumed

    _, other = build_calibration_set(model, tok, ru_corpus, small_options(max_new_tokens=5), cache)
    assert (other.generated, other.reused) == (6, 0)  # other settings: regenerated
    _, fresh = build_calibration_set(
        tiny_model(len(tok), seed=1), tok, ru_corpus, small_options(max_new_tokens=5), cache
    )
    assert (fresh.generated, fresh.reused) == (6, 0)  # another model: regenerated


def test_kept_answers_become_examples(tiny_model, tok, ru_corpus, tmp_path, monkeypatch):
    """A stub model answering in Russian, in English, in a loop or not at all: each lands where it belongs."""
    import langadapt.core.adaptation.calibration as calibration

    canned = ["Хороший ответ на русском.", "An English answer.", "ха-ха " * 20, "", "Оборванный ответ", "Ещё ответ."]

    def fake_generate(model, tokenizer, prompts, *, max_new_tokens, batch_size):
        return [calibration.Answer(p, canned[i], i != 4) for i, p in enumerate(prompts)]

    monkeypatch.setattr(calibration, "generate_answers", fake_generate)
    options = small_options(self_calibration_examples=6)
    examples, stats = build_calibration_set(tiny_model(len(tok)), tok, ru_corpus, options, str(tmp_path / "a.jsonl"))
    assert stats.dropped == {"empty": 1, "truncated": 1, "repetition": 1, "wrong_language": 1} and stats.kept == 2
    assert [e["messages"][1]["content"] for e in examples[:2]] == [canned[0], canned[5]]
    for example in examples[:2]:
        instruction = example["messages"][0]["content"].split("\n\n")[0]
        assert instruction + "\n\n{text}" in SELF_CALIBRATION_TEMPLATES["ru"]


def test_copy_examples(ru_texts):
    docs = ["Первый документ.", "Второй документ, чуть длиннее."]
    examples = copy_examples(docs, "ru", seed=0)
    for doc, example in zip(docs, examples, strict=True):
        user, assistant = example["messages"]
        assert user["role"] == "user" and assistant == {"role": "assistant", "content": doc}
        instruction, text = user["content"].split("\n\n", 1)
        assert instruction in COPY_INSTRUCTIONS["ru"] and text == doc
    german = copy_examples(docs, "de", seed=0)  # no German templates: English, not Russian
    assert all(e["messages"][0]["content"].split("\n\n")[0] in COPY_INSTRUCTIONS["en"] for e in german)
    assert copy_examples(docs, "ru", seed=0) == examples


def test_copy_documents_come_from_the_corpus(tiny_model, tok, ru_corpus, ru_texts, tmp_path):
    options = small_options(self_calibration_examples=0, copy_examples=20, passage_max_chars=200)
    examples, stats = build_calibration_set(tiny_model(len(tok)), tok, ru_corpus, options, str(tmp_path / "c.jsonl"))
    assert stats.copy_examples == 20 == len(examples) and stats.prompts == 0 and not (tmp_path / "c.jsonl").exists()
    corpus = " ".join(" ".join(text.split()) for text in ru_texts)
    for example in examples:
        document = example["messages"][1]["content"]
        assert 20 <= len(document) <= 200 and document in corpus
    assert len({e["messages"][1]["content"] for e in examples}) == 20


def test_prompts_are_deterministic_and_fall_back_to_english():
    passages = [f"passage {i}" for i in range(10)]
    ru = self_calibration_prompts(passages, "ru", seed=0)
    assert ru == self_calibration_prompts(passages, "ru", seed=0) != self_calibration_prompts(passages, "ru", seed=1)
    assert ru[:4] == self_calibration_prompts(passages[:4], "ru", seed=0)
    assert all(p.endswith(f"\n\npassage {i}") for i, p in enumerate(ru))
    fr = self_calibration_prompts(passages, "fr", seed=0)
    assert all(p.replace(f"passage {i}", "{text}") in SELF_CALIBRATION_TEMPLATES["en"] for i, p in enumerate(fr))


def test_prompt_files(tiny_model, tok, ru_corpus, tmp_path):
    txt = tmp_path / "prompts.txt"
    txt.write_text("Расскажи о себе.\n\n  Что такое осень?  \n", encoding="utf-8")
    assert read_prompt_file(str(txt)) == ["Расскажи о себе.", "Что такое осень?"]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "Первый\\nвопрос"}\n\n{"prompt": "Второй", "id": 2}\n', encoding="utf-8")
    assert read_prompt_file(str(jsonl)) == ["Первый\nвопрос", "Второй"]

    options = small_options(prompt_file=str(jsonl), copy_examples=1)
    model = tiny_model(len(tok))
    counter = CountingGenerate(model)
    _, stats = build_calibration_set(model, tok, ru_corpus, options, str(tmp_path / "p.jsonl"))
    assert stats.prompt_source == "file" and stats.prompts == 2 == counter.prompts and stats.copy_examples == 1

    bad = {
        "missing.txt": None,
        "prompts.csv": "a,b\n",
        "empty.txt": "\n  \n",
        "broken.jsonl": '{"prompt": "ok"}\n{not json\n',
        "nofield.jsonl": '{"text": "no prompt here"}\n',
        "blank.jsonl": '{"prompt": "   "}\n',
        "latin1.txt": "caf\xe9\n".encode("latin-1"),
    }
    for name, content in bad.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content, encoding="utf-8")
        with pytest.raises(AdaptationInputError):
            read_prompt_file(str(path))
    with pytest.raises(AdaptationInputError, match="line 2"):
        build_calibration_set(
            model, tok, ru_corpus, small_options(prompt_file=str(tmp_path / "broken.jsonl")), str(tmp_path / "x")
        )


def test_options_validation():
    with pytest.raises(ValidationError, match="empty"):
        CalibrationConfig(method="self+copy", self_calibration_examples=0, copy_examples=0)
    with pytest.raises(ValidationError, match="passage_min_chars"):
        CalibrationConfig(method="self+copy", passage_min_chars=600, passage_max_chars=500)
    with pytest.raises(ValidationError, match="no effect"):
        CalibrationConfig(language="en")  # calibration.method 'none': nothing would read it
    with pytest.raises(ValidationError, match="examples"):
        CalibrationConfig.model_validate({"examples": 3})
    defaults = CalibrationConfig()
    assert (defaults.self_calibration_examples, defaults.copy_examples, defaults.passage_max_chars) == (
        13_500,
        10_000,
        500,
    )
    sft_defaults = SFTConfig()
    assert (sft_defaults.lora_r, sft_defaults.lora_alpha, sft_defaults.lora_layers) == (8, 1.0, (0, -1))
    assert (sft_defaults.lr, sft_defaults.weight_decay, sft_defaults.epochs) == (2.5e-5, 0.1, 1)
