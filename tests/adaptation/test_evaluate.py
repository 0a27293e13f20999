"""The Darumeru-like evaluation suite: metric functions on hand-made inputs, task paths on a tiny random Llama."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
from decimal import Decimal
from pathlib import Path

import pytest
import torch

from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.core.adaptation.evaluate import TASK_NAMES, TASKS, EvalData, ScoreRow, evaluate, micro_avg
from langadapt.core.adaptation.evaluate.bits_per_char import bits_per_char_rows
from langadapt.core.adaptation.evaluate.darucopy import (
    char_f1,
    copy_documents,
    copy_en,
    copy_ru,
    copy_scores,
    exact_match,
)
from langadapt.core.adaptation.evaluate.generation import greedy_generate, prompt_ids
from langadapt.core.adaptation.evaluate.generation_speed import generation_speed
from langadapt.core.adaptation.evaluate.mc_ruworldtree import continuation_logprobs, mc_ruworldtree, question_prompt
from langadapt.core.adaptation.evaluate.mera_arith import mera_arith, numbers_match, parse_number
from langadapt.core.adaptation.evaluate.symbols_per_token import symbols_per_token
from tests.conftest import shared_file

RU_SENTENCES = [
    "Мороз и солнце; день чудесный!",
    "Ещё ты дремлешь, друг прелестный.",
    "Пора, красавица, проснись.",
    "Вечор, ты помнишь, вьюга злилась.",
]
EN_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "I would recommend this place to anyone.",
    "Please send me the report by Friday.",
]


@pytest.fixture(scope="module")
def tokenizer(english_byte_level_tokenizer):
    return english_byte_level_tokenizer


@pytest.fixture(scope="module")
def model(tiny_model, tokenizer):
    return tiny_model(len(tokenizer))


@pytest.fixture(scope="module")
def mera_dir() -> Path:
    return shared_file("eval/mera/ruWorldTree.jsonl").parent


def _direct_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) from one unbatched, unpadded forward pass."""
    context_ids = tokenizer.encode(context, add_special_tokens=True)
    whole = tokenizer.encode(context + continuation, add_special_tokens=True)
    assert whole[: len(context_ids)] == context_ids  # byte-level BPE: the space boundary splits cleanly
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([whole])).logits[0].log_softmax(-1)
    return sum(float(logprobs[p - 1, whole[p]]) for p in range(len(context_ids), len(whole)))


# --- rows and registry ---------------------------------------------------------------------------------------------


def test_score_row_is_frozen_and_serialises():
    row = ScoreRow("copy_ru", "f1", 0.5, 3)
    assert row.to_dict() == {"task": "copy_ru", "metric": "f1", "value": 0.5, "n": 3}
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.value = 1.0  # type: ignore[misc]


def test_registry_names():
    assert set(TASKS) == {
        "symbols_per_token",
        "bits_per_char",
        "copy_ru",
        "copy_en",
        "mc_ruworldtree",
        "mera_arith",
        "generation_speed",
    }
    assert TASK_NAMES[-1] == "micro_avg"


@pytest.mark.parametrize(
    ("tasks", "limit", "match"),
    [
        (["copy_ru", "no_such_task"], None, "no_such_task"),
        ([], None, "no evaluation task"),
        (["micro_avg"], None, "micro_avg"),
        (["micro_avg", "symbols_per_token"], None, "micro_avg"),
        (["symbols_per_token"], 0, "limit"),
    ],
)
def test_evaluate_rejects_bad_requests(model, tokenizer, tasks, limit, match):
    with pytest.raises(AdaptationInputError, match=match):
        evaluate(model, tokenizer, tasks, EvalData(target_texts=RU_SENTENCES), limit=limit)


def test_missing_inputs_are_user_errors(model, tokenizer, tmp_path):
    with pytest.raises(AdaptationInputError, match="MERA folder"):
        mc_ruworldtree(model, tokenizer, EvalData())
    with pytest.raises(AdaptationInputError, match="not found"):
        mera_arith(model, tokenizer, EvalData(mera_dir=tmp_path))
    with pytest.raises(AdaptationInputError, match="source"):
        copy_en(model, tokenizer, EvalData(target_texts=RU_SENTENCES))
    with pytest.raises(AdaptationInputError, match="at least 20"):
        copy_ru(model, tokenizer, EvalData(target_texts=["Да.", "Нет."]))
    with pytest.raises(AdaptationInputError):
        symbols_per_token(model, tokenizer, EvalData())
    with pytest.raises(AdaptationInputError):
        bits_per_char_rows(model, tokenizer, EvalData(target_texts=[""]))


# --- symbols per token, bits per char ------------------------------------------------------------------------------


def test_symbols_per_token_matches_a_manual_count_and_respects_limit(model, tokenizer):
    data = EvalData(target_texts=RU_SENTENCES, source_texts=EN_SENTENCES)
    rows = {row.metric: row for row in symbols_per_token(model, tokenizer, data, limit=2)}
    for metric, texts in (("target", RU_SENTENCES[:2]), ("source", EN_SENTENCES[:2])):
        tokens = sum(len(tokenizer.encode(text, add_special_tokens=False)) for text in texts)
        chars = sum(map(len, texts))
        assert rows[metric].n == chars
        assert rows[metric].value == pytest.approx(chars / tokens)
    # an English-only BPE is far more efficient on English than on Russian
    assert rows["source"].value > 2 * rows["target"].value


def test_bits_per_char_equals_a_manual_computation(model, tokenizer):
    texts = ["Hello world.", "Привет, мир! Как дела?"]
    nats = 0.0
    for text in texts:
        ids = [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False)]
        with torch.no_grad():
            logprobs = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        nats -= sum(float(logprobs[p - 1, ids[p]]) for p in range(1, len(ids)))
    expected = nats / math.log(2) / sum(map(len, texts))
    rows = bits_per_char_rows(model, tokenizer, EvalData(target_texts=texts), batch_size=2)
    assert rows == [ScoreRow("bits_per_char", "target", pytest.approx(expected, rel=1e-5), sum(map(len, texts)))]


# --- copy ----------------------------------------------------------------------------------------------------------


def test_copy_metrics_on_strings():
    assert char_f1("Мороз и солнце", "Мороз и солнце") == 1.0
    assert char_f1("  same ", "same") == 1.0
    assert char_f1("", "") == 1.0
    assert char_f1("", "abc") == 0.0
    assert char_f1("abd", "abc") == pytest.approx(2 * 2 / 6)
    assert char_f1("abcabc", "abc") == pytest.approx(2 * 3 / 9)  # precision 1/2, recall 1
    assert char_f1("cba", "abc") == pytest.approx(2 * 1 / 6)  # order-aware: a bag of characters would say 1.0
    assert exact_match(" text\n", "text") == 1.0
    assert exact_match("text.", "text") == 0.0


def test_copy_scores_of_an_oracle_are_one_and_of_garbage_are_low():
    documents = copy_documents(RU_SENTENCES)
    assert copy_scores("copy_ru", documents, documents) == [
        ScoreRow("copy_ru", "exact_match", 1.0, len(documents)),
        ScoreRow("copy_ru", "f1", 1.0, len(documents)),
    ]
    half = copy_scores("copy_ru", [documents[0], "xyz"], documents[:2])
    assert half[0].value == 0.5
    assert 0.5 <= half[1].value < 0.55


def test_copy_documents_are_sentence_packed_and_round_robin(ru_texts):
    texts = [text[:5000] for text in ru_texts[:3]]
    documents = copy_documents(texts, max_chars=300)
    assert len(documents) > 20
    assert all(20 <= len(d) <= 300 and "  " not in d and "\n" not in d for d in documents)
    firsts = [copy_documents([text])[0] for text in texts]
    assert documents[: len(firsts)] == firsts
    assert copy_documents(["Один. Два. " * 3], max_chars=300, min_chars=1) == ["Один. Два. Один. Два. Один. Два."]
    long_word_text = "а" * 50 + " " + "б" * 50
    assert copy_documents([long_word_text], max_chars=60, min_chars=1) == ["а" * 50, "б" * 50]


def test_prompts_use_the_chat_template_when_there_is_one(tokenizer):
    ids = prompt_ids(tokenizer, "Повтори: текст", "plain text")
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == im_start
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    assert prompt_ids(plain, "Повтори: текст", "plain text") == plain.encode("plain text", add_special_tokens=True)


def test_greedy_generation_does_not_depend_on_the_batch(model, tokenizer):
    prompts = [tokenizer.encode(text, add_special_tokens=False) for text in [*EN_SENTENCES, "Hi"]]
    budgets = [5, 12, 1, 8]
    one_by_one = greedy_generate(model, tokenizer, prompts, budgets, batch_size=1)
    batched = greedy_generate(model, tokenizer, prompts, budgets, batch_size=4)
    assert batched == one_by_one
    assert len(batched) == 4 and all(isinstance(text, str) for text in batched)


def test_copy_tasks_run_on_a_tiny_model_within_limit(model, tokenizer):
    data = EvalData(target_texts=RU_SENTENCES, source_texts=EN_SENTENCES)
    for task, rows in (
        ("copy_ru", copy_ru(model, tokenizer, data, limit=3, batch_size=2)),
        ("copy_en", copy_en(model, tokenizer, data, limit=2, batch_size=2)),
    ):
        assert [(r.task, r.metric) for r in rows] == [(task, "exact_match"), (task, "f1")]
        assert rows[0].n == rows[1].n == (3 if task == "copy_ru" else 2)
        assert rows[0].value == 0.0  # a random model does not copy
        assert 0.0 <= rows[1].value < 1.0


def test_generation_speed_runs_every_model_the_same_number_of_steps(model, tokenizer, monkeypatch):
    generation_speed_module = sys.modules[generation_speed.__module__]  # the package re-exports the function
    data = EvalData(target_texts=[text * 3 for text in RU_SENTENCES])
    lengths: list[int] = []
    real = generation_speed_module.greedy_generations

    def counting(*args, **kwargs):
        outputs = real(*args, **kwargs)
        if kwargs.get("fixed_length"):
            lengths.extend(len(tokenizer.encode(o.text, add_special_tokens=False)) > 0 for o in outputs)
        return outputs

    monkeypatch.setattr(generation_speed_module, "greedy_generations", counting)
    progress: list[tuple[int, int]] = []
    rows = generation_speed(
        model, tokenizer, data, limit=3, progress=lambda done, total: progress.append((done, total))
    )
    metrics = {row.metric: row for row in rows}
    assert list(metrics) == ["chars_per_step", "chars_per_s_batch1", "chars_per_s_batch8"]
    assert all(row.n == 3 and row.value > 0 for row in rows)
    assert progress == [(1, 2), (2, 2)] and len(lengths) == 6  # 3 prompts, at batch 1 and at batch 8
    # every prompt ran exactly NEW_TOKENS steps: end tokens are suppressed until the budget is spent
    ids = [tokenizer.encode(text[: generation_speed_module.PROMPT_CHARS]) for text in data.target_texts[:3]]
    outputs = generation_speed_module.greedy_generations(
        model, tokenizer, ids, [generation_speed_module.NEW_TOKENS] * 3, batch_size=3, fixed_length=True
    )
    assert all(not output.finished for output in outputs)


# --- multiple choice -----------------------------------------------------------------------------------------------


def test_continuation_logprobs_batched_equal_direct_forward_passes(model, tokenizer):
    pairs = [
        ("Question: what is water?\nAnswer:", " rain"),
        ("Q:", " a much longer continuation with several words"),
        ("Вопрос: что это?\nОтвет:", " Пар"),
    ]
    batched = continuation_logprobs(model, tokenizer, pairs, batch_size=3)
    direct = [_direct_logprob(model, tokenizer, context, continuation) for context, continuation in pairs]
    assert batched == pytest.approx(direct, abs=1e-3)


def _write_worldtree(folder: Path, items: list[dict]) -> None:
    lines = [
        json.dumps({"task": "ruWorldTree", "label_source": "golden", **item}, ensure_ascii=False) for item in items
    ]
    (folder / "ruWorldTree.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_mc_picks_the_option_with_the_highest_log_likelihood(model, tokenizer, tmp_path):
    questions = [
        ("Что из этого является примером жидкой воды?", ["Дождь", "Лед", "Мороз", "Пар"]),
        ("Пример инстинкта -", ["лосось", "собаки делают трюки", "ребенок", "человек смеется"]),
    ]
    best, worst = [], []
    for question, options in questions:
        scores = [_direct_logprob(model, tokenizer, question_prompt(question), f" {o}") for o in options]
        best.append("ABCD"[scores.index(max(scores))])
        worst.append("ABCD"[scores.index(min(scores))])
    items = [
        {"inputs": {"question": q, **{f"option_{x}": o for x, o in zip("abcd", opts, strict=True)}}, "label": label}
        for (q, opts), label in zip(questions, best, strict=True)
    ]
    _write_worldtree(tmp_path, items)
    rows = mc_ruworldtree(model, tokenizer, EvalData(mera_dir=tmp_path), batch_size=3)
    assert rows[0] == ScoreRow("mc_ruworldtree", "accuracy", 1.0, 2)
    for item, label in zip(items, worst, strict=True):
        item["label"] = label
    _write_worldtree(tmp_path, items)
    assert mc_ruworldtree(model, tokenizer, EvalData(mera_dir=tmp_path))[0].value == 0.0
    items[0]["label"] = "E"
    _write_worldtree(tmp_path, items)
    with pytest.raises(AdaptationInputError, match="label"):
        mc_ruworldtree(model, tokenizer, EvalData(mera_dir=tmp_path))


def test_mc_on_the_real_file_agrees_with_direct_scoring(model, tokenizer, mera_dir):
    rows = mc_ruworldtree(model, tokenizer, EvalData(mera_dir=mera_dir), limit=3, batch_size=4)
    assert [(r.metric, r.n) for r in rows] == [("accuracy", 3), ("accuracy_norm", 3)]
    lines = (mera_dir / "ruWorldTree.jsonl").read_text(encoding="utf-8").splitlines()[:3]
    correct = 0
    for line in lines:
        item = json.loads(line)
        options = [item["inputs"][f"option_{x}"] for x in "abcd"]
        scores = [
            _direct_logprob(model, tokenizer, question_prompt(item["inputs"]["question"]), f" {o}") for o in options
        ]
        correct += "ABCD"[scores.index(max(scores))] == item["label"]
    assert rows[0].value == pytest.approx(correct / 3)


# --- arithmetic ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("42", Decimal(42)),
        ("-34", Decimal(-34)),
        ("\u221234", Decimal(-34)),
        ("((-6) + 9)", Decimal(-6)),
        ("  10963", Decimal(10963)),
        ("Ответ: 10 963 рубля", Decimal(10963)),
        ("1\u00a0234\u00a0567", Decimal(1234567)),
        ("12.", Decimal(12)),
        ("12.5 apples", Decimal("12.5")),
        ("12,5", Decimal("12.5")),
        ("5 - 3 = 2", Decimal(5)),
        ("- 5", Decimal(5)),
        ("1 2 3", Decimal(1)),
        ("2024 100", Decimal(2024)),
        ("no number here", None),
        ("", None),
    ],
)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


def test_numbers_match():
    assert numbers_match(" -18\nThat is all.", "-18")
    assert numbers_match("12.0", "12")
    assert not numbers_match("18", "-18")
    assert not numbers_match("", "7")
    with pytest.raises(AdaptationInputError):
        numbers_match("7", "seven")


def test_every_mera_arithmetic_label_parses(mera_dir):
    for name in ("SimpleAr", "ruMultiAr"):
        for line in (mera_dir / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
            label = json.loads(line)["label"]
            assert str(parse_number(label)) == label


def test_mera_arith_runs_within_limit(model, tokenizer, mera_dir):
    rows = mera_arith(model, tokenizer, EvalData(mera_dir=mera_dir), limit=2, batch_size=2)
    assert [(r.task, r.metric, r.n) for r in rows] == [
        ("mera_arith", "simplear_exact_match", 2),
        ("mera_arith", "rumultiar_exact_match", 2),
    ]
    assert all(r.value in (0.0, 0.5, 1.0) for r in rows)


# --- micro average and the whole suite -----------------------------------------------------------------------------


def test_micro_avg_weighs_each_dataset_once():
    rows = [
        ScoreRow("symbols_per_token", "target", 3.2, 1000),
        ScoreRow("bits_per_char", "target", 1.5, 1000),
        ScoreRow("copy_ru", "exact_match", 0.0, 10),
        ScoreRow("copy_ru", "f1", 0.5, 10),
        ScoreRow("mc_ruworldtree", "accuracy", 0.25, 555),
        ScoreRow("mc_ruworldtree", "accuracy_norm", 0.9, 555),
        ScoreRow("mera_arith", "simplear_exact_match", 1.0, 230),
        ScoreRow("mera_arith", "rumultiar_exact_match", 0.0, 630),
    ]
    assert micro_avg(rows) == ScoreRow("micro_avg", "mean", (0.5 + 0.25 + 1.0 + 0.0) / 4, 4)
    assert micro_avg([*rows, ScoreRow("copy_en", "f1", 0.75, 5)]).value == pytest.approx(2.5 / 5)
    with pytest.raises(AdaptationInputError):
        micro_avg(rows[:3])
    with pytest.raises(ValueError, match="twice"):
        micro_avg([*rows, rows[3]])


def test_evaluate_runs_the_suite_in_order(model, tokenizer, mera_dir):
    data = EvalData(target_texts=RU_SENTENCES, source_texts=EN_SENTENCES, mera_dir=mera_dir)
    tasks = ["micro_avg", "symbols_per_token", "mc_ruworldtree", "copy_en", "mc_ruworldtree"]
    rows = evaluate(model, tokenizer, tasks, data, limit=2, batch_size=4)
    assert [(r.task, r.metric) for r in rows] == [
        ("symbols_per_token", "target"),
        ("symbols_per_token", "source"),
        ("mc_ruworldtree", "accuracy"),
        ("mc_ruworldtree", "accuracy_norm"),
        ("copy_en", "exact_match"),
        ("copy_en", "f1"),
        ("micro_avg", "mean"),
    ]
    assert all(r.n == 2 for r in rows[2:6])
    assert rows[-1] == ScoreRow("micro_avg", "mean", pytest.approx((rows[2].value + rows[5].value) / 2), 2)
    assert json.loads(json.dumps([r.to_dict() for r in rows]))[0]["task"] == "symbols_per_token"
