"""Calibration data for LEP's self-calibration (arXiv 2412.21140, §2.4.2, Table 4).

After propagation the instruct model I' has the new vocabulary but was never trained with it; a short SFT on data
the ORIGINAL instruct model I produced itself re-aligns it without teaching it anything new (the answers are I's
own, so the calibration pulls I' towards I's behaviour, not towards a third model's). The set has two parts:

- self-calibration: prompts, either from a prompt file given with the job (`.txt`, one per line, or `.jsonl` with a
  `prompt` field) or built from the target corpus (an instruction such as "continue the text", "summarise it in one
  sentence", "what is the main topic", "rewrite it more simply" applied to a passage cut from the corpus). I
  answers each with greedy decoding; the answers are cached in a `.jsonl` file (generation is the expensive part,
  so it happens once: a re-run with the same prompts and model reuses the cache, an interrupted one resumes it).
  Answers are then filtered, each dropped one counted under its first failing reason:
  `empty`; `truncated` (hit `max_new_tokens` without an end token: a cut answer teaches the model not to stop);
  `repetition` (degenerate loops: the share of repeated character n-grams is above `max_repeat_ratio`);
  `wrong_language` (the share of the answer's letters in the corpus's dominant script (`scripts.py`) is below
  `min_script_ratio` x that share in the corpus; answers without letters are not judged). Scripts come from the
  Unicode character names (CYRILLIC, LATIN, GREEK, ARABIC, CJK, ...), so the check works for any target language
  and knows nothing about Russian in particular. Character n-grams, not words, for the same reason: scripts
  without spaces have no words to count.
- copy: the user asks to repeat a document exactly and the answer is the document (documents of at most
  `passage_max_chars` characters cut from the corpus). It keeps the new tokens' embeddings usable for exact
  reproduction, which vocabulary surgery breaks first. Its instructions are worded differently from the DaruCopy
  evaluation's, so the evaluation does not see its own prompt in training.

Instruction templates exist in Russian and English; any other target language uses the English ones (the passages
stay in the target language). The paper's sizes are the defaults: 13.5 K self-calibration and 10 K copy examples.
Everything is deterministic given `seed`. The calibration itself is `train.sft.run_sft` of I' (with I's chat
template) on the examples returned here.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from langadapt.core.adaptation.config import CalibrationConfig
from langadapt.core.adaptation.corpus import require_documents
from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.core.adaptation.evaluate.darucopy import copy_documents
from langadapt.core.adaptation.evaluate.generation import greedy_generations, has_chat_template, prompt_ids
from langadapt.core.adaptation.scripts import ScriptProfile, script_profile, script_share

ProgressCallback = Callable[[dict[str, Any]], None]
Example = dict[str, list[dict[str, str]]]

DROP_REASONS = ("empty", "truncated", "repetition", "wrong_language")
CACHE_FORMAT = "langadapt self-calibration answers"
CACHE_VERSION = 1

# Self-calibration instructions, by language of the instruction: "{text}" is a passage of the corpus.
SELF_CALIBRATION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "ru": (
        "Продолжи этот текст несколькими предложениями в том же стиле.\n\n{text}",
        "Перескажи этот текст в одном предложении.\n\n{text}",
        "Какова главная тема этого текста? Ответь коротко.\n\n{text}",
        "Перепиши этот текст более простым языком, сохранив смысл.\n\n{text}",
        "Придумай короткий заголовок к этому тексту.\n\n{text}",
        "Объясни своими словами, о чём говорится в этом отрывке.\n\n{text}",
        "Задай один вопрос по этому тексту и ответь на него.\n\n{text}",
    ),
    "en": (
        "Continue this text with a few sentences in the same style.\n\n{text}",
        "Summarise this text in one sentence.\n\n{text}",
        "What is the main topic of this text? Answer briefly.\n\n{text}",
        "Rewrite this text in simpler language, keeping its meaning.\n\n{text}",
        "Suggest a short title for this text.\n\n{text}",
        "Explain in your own words what this passage is about.\n\n{text}",
        "Ask one question about this text and answer it.\n\n{text}",
    ),
}

# Copy-task instructions (not DaruCopy's wording, see the module docstring).
COPY_INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "ru": (
        "Перепиши следующий текст слово в слово.",
        "Скопируй этот текст без единого изменения.",
        "Воспроизведи приведённый ниже текст точно так, как он написан.",
    ),
    "en": (
        "Copy the following text word for word.",
        "Reproduce this text exactly as it is written, with no changes.",
        "Write out the text below verbatim.",
    ),
}
FALLBACK_LANGUAGE = "en"


@dataclass(frozen=True)
class CalibrationStats:
    language: str  # of the instructions actually used (the fallback for languages without templates)
    script: str  # the corpus's dominant script (Unicode name prefix: CYRILLIC, LATIN, ...)
    script_share: float  # the share of the corpus's letters in that script
    prompt_source: str  # "file" or "corpus"
    prompts: int  # self-calibration prompts answered
    generated: int  # answers generated by this call
    reused: int  # answers taken from the cache
    kept: int  # self-calibration examples kept
    dropped: dict[str, int]  # reason -> answers dropped, every reason of DROP_REASONS listed
    copy_examples: int
    examples: int  # kept + copy_examples
    cancelled: bool  # stopped by `should_cancel` before every prompt was answered (the cache holds the rest)
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- filters ----


def repeated_ngram_ratio(text: str, n: int) -> float:
    """1 - distinct / all character n-grams of `text` (whitespace runs collapsed); 0 for texts shorter than 2n.

    Natural text stays near 0; a looping answer (the same phrase over and over) goes towards 1.
    """
    collapsed = " ".join(text.split())
    if len(collapsed) < 2 * n:
        return 0.0
    grams = [collapsed[i : i + n] for i in range(len(collapsed) - n + 1)]
    return 1 - len(set(grams)) / len(grams)


def answer_problem(answer: str, finished: bool, profile: ScriptProfile, options: CalibrationConfig) -> str | None:
    """The first reason (of DROP_REASONS) to drop a generated answer, or None to keep it."""
    if not answer.strip():
        return "empty"
    if not finished:
        return "truncated"
    if repeated_ngram_ratio(answer, options.repeat_ngram_chars) > options.max_repeat_ratio:
        return "repetition"
    share = script_share(answer, profile.script)
    if share is not None and share < options.min_script_ratio * profile.share:
        return "wrong_language"
    return None


# ---- prompts and copy examples ----


def instruction_language(language: str) -> str:
    """`language` when it has instruction templates, otherwise the English fallback."""
    return language if language in SELF_CALIBRATION_TEMPLATES else FALLBACK_LANGUAGE


def read_prompt_file(path: str) -> list[str]:
    """Prompts of a `.txt` file (one per non-blank line) or a `.jsonl` file (a non-blank string `prompt` field
    per non-blank line). Anything unusable is an `AdaptationInputError` naming the file and line."""
    if not os.path.isfile(path):
        raise AdaptationInputError(f"prompt file not found: {path}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".txt", ".jsonl"):
        raise AdaptationInputError(f"prompt file must be .txt (one per line) or .jsonl (a 'prompt' field): {path}")
    try:
        with open(path, encoding="utf-8", errors="strict") as handle:
            lines = handle.read().splitlines()
    except UnicodeDecodeError as exc:
        raise AdaptationInputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    prompts = []
    for line_no, line in enumerate(lines, start=1):
        if "\x00" in line:
            raise AdaptationInputError(f"{path}: binary data (NUL byte) on line {line_no}")
        if not line.strip():
            continue
        if suffix == ".txt":
            prompts.append(line.strip())
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AdaptationInputError(f"{path}: line {line_no} is not valid JSON ({exc.msg})") from None
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise AdaptationInputError(f"{path}: line {line_no} has no non-empty string 'prompt' field")
        prompts.append(prompt.strip())
    if not prompts:
        raise AdaptationInputError(f"{path}: no prompts in the file")
    return prompts


def corpus_passages(texts: Sequence[str], options: CalibrationConfig) -> list[str]:
    """Sentence-packed passages of the corpus texts (round-robin over the texts, as DaruCopy cuts them), shuffled."""
    passages = copy_documents(texts, max_chars=options.passage_max_chars, min_chars=options.passage_min_chars)
    random.Random(options.seed).shuffle(passages)
    return passages


def self_calibration_prompts(passages: Sequence[str], language: str, seed: int) -> list[str]:
    """One prompt per passage: a seeded choice of instruction template (prefix-stable: more passages, same start)."""
    templates = SELF_CALIBRATION_TEMPLATES[instruction_language(language)]
    rng = random.Random(seed)
    return [rng.choice(templates).format(text=passage) for passage in passages]


def copy_examples(documents: Sequence[str], language: str, seed: int) -> list[Example]:
    """Chat examples asking to repeat each document exactly, answered by the document itself."""
    instructions = COPY_INSTRUCTIONS[instruction_language(language)]
    rng = random.Random(seed + 1)  # not the same stream as the prompt templates
    return [chat_example(f"{rng.choice(instructions)}\n\n{document}", document) for document in documents]


def chat_example(user: str, assistant: str) -> Example:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


# ---- generation and its cache ----


@dataclass(frozen=True)
class Answer:
    prompt: str
    answer: str
    finished: bool  # an end token ended it (False: it hit max_new_tokens)


@torch.inference_mode()
def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
) -> list[Answer]:
    """Greedy answers of a chat model to one-turn prompts, with whether each ended on its own."""
    if not has_chat_template(tokenizer):
        raise AdaptationInputError("the instruct tokenizer has no chat template: self-calibration needs one")
    encoded = [prompt_ids(tokenizer, prompt, prompt) for prompt in prompts]
    was_training = model.training
    model.eval()
    try:
        generations = greedy_generations(
            model, tokenizer, encoded, [max_new_tokens] * len(encoded), batch_size=batch_size
        )
    finally:
        model.train(was_training)
    return [Answer(p, g.text.strip(), g.finished) for p, g in zip(prompts, generations, strict=True)]


def model_fingerprint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> str:
    """A cheap identity of a model and its chat format: its class, parameter shapes, the first values of every
    parameter, the vocabulary size and the chat template. A cache made by another model does not match."""
    digest = hashlib.sha256(type(model).__name__.encode())
    with torch.no_grad():
        for name, param in model.named_parameters():
            digest.update(f"{name}{tuple(param.shape)}".encode())
            digest.update(param.detach().reshape(-1)[:16].float().cpu().numpy().tobytes())
    digest.update(f"{len(tokenizer)}|{getattr(tokenizer, 'chat_template', None) or ''}".encode())
    return digest.hexdigest()[:32]


def _cache_header(fingerprint: str, max_new_tokens: int) -> dict[str, Any]:
    return {"cache": CACHE_FORMAT, "version": CACHE_VERSION, "model": fingerprint, "max_new_tokens": max_new_tokens}


def load_cached_answers(cache_path: str, header: dict[str, Any], prompts: Sequence[str]) -> list[Answer]:
    """The cached answers of the longest prefix of `prompts` the cache holds in order (none when its header, i.e.
    model or generation settings, differs). A malformed line (an interrupted write) ends the usable part."""
    return _read_cache(cache_path, header, prompts)[0]


def _read_cache(cache_path: str, header: dict[str, Any], prompts: Sequence[str]) -> tuple[list[Answer], bool]:
    """(usable answers, whether the file holds nothing else than those and answers to prompts beyond them)."""
    if not os.path.isfile(cache_path):
        return [], False
    answers: list[Answer] = []
    with open(cache_path, encoding="utf-8", errors="replace") as handle:
        try:
            if json.loads(handle.readline()) != header:
                return [], False
        except json.JSONDecodeError:
            return [], False
        for line in handle:
            if len(answers) == len(prompts):
                return answers, True  # answers to more prompts than asked now: kept for a later, larger call
            try:
                if not line.endswith("\n"):  # an interrupted write: appending after it would corrupt the next line
                    raise ValueError("unterminated line")
                record = json.loads(line)
                answer = Answer(str(record["prompt"]), str(record["answer"]), bool(record["finished"]))
            except (ValueError, KeyError, TypeError):  # json.JSONDecodeError is a ValueError
                return answers, False
            if answer.prompt != prompts[len(answers)]:
                return answers, False
            answers.append(answer)
    return answers, True


def _write_cache(cache_path: str, header: dict[str, Any], answers: Sequence[Answer]) -> None:
    tmp = f"{cache_path}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(header) + "\n")
        for answer in answers:
            handle.write(json.dumps(asdict(answer), ensure_ascii=False) + "\n")
    os.replace(tmp, cache_path)


def cached_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    cache_path: str,
    *,
    max_new_tokens: int,
    batch_size: int,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> tuple[list[Answer], int, bool]:
    """Answers to `prompts` through the cache file: the cached ones reused, the rest generated in chunks and
    appended as they come, so an interrupted run resumes. A cache of another model, other settings or other
    prompts is rewritten from the part that matches. Returns (answers, how many were generated, cancelled); a
    cancelled call returns the answers so far."""
    header = _cache_header(model_fingerprint(model, tokenizer), max_new_tokens)
    answers, clean = _read_cache(cache_path, header, prompts)
    reused = len(answers)
    if reused == len(prompts) and clean:
        return answers, 0, False  # the file is left untouched
    os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
    if not clean:
        _write_cache(cache_path, header, answers)  # keep the matching part only
    chunk = batch_size * 8
    cancelled = False
    with open(cache_path, "a", encoding="utf-8") as handle:
        while len(answers) < len(prompts):
            if should_cancel is not None and should_cancel():
                cancelled = True
                break
            todo = prompts[len(answers) : len(answers) + chunk]
            new = generate_answers(model, tokenizer, todo, max_new_tokens=max_new_tokens, batch_size=batch_size)
            for answer in new:
                handle.write(json.dumps(asdict(answer), ensure_ascii=False) + "\n")
            handle.flush()
            answers.extend(new)
            if progress is not None:
                progress({"phase": "generate", "done": len(answers), "total": len(prompts)})
    return answers, len(answers) - reused, cancelled


# ---- the set ----


def _read_texts(corpus_path: str, limit_chars: int | None) -> list[str]:
    return list(require_documents(corpus_path, limit_chars=limit_chars))


def _split(available: int, wanted_self: int, wanted_copy: int) -> tuple[int, int]:
    """How many passages go to each part: as asked, or both shrunk in proportion when the corpus is short."""
    if available >= wanted_self + wanted_copy:
        return wanted_self, wanted_copy
    n_self = available * wanted_self // (wanted_self + wanted_copy)
    return n_self, available - n_self


def build_calibration_set(
    instruct_model: PreTrainedModel,
    instruct_tokenizer: PreTrainedTokenizerBase,
    corpus_path: str,
    options: CalibrationConfig,
    cache_path: str,
    *,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> tuple[list[Example], CalibrationStats]:
    """The calibration set (kept self-calibration examples, then copy examples) and its statistics.

    `instruct_model` is the ORIGINAL instruct model I (old vocabulary) that answers the prompts; its answers are
    cached in `cache_path`. `progress` gets `{phase: "generate", done, total}` after every chunk of answers.
    """
    started = time.perf_counter()
    if options.self_calibration_examples and not has_chat_template(instruct_tokenizer):
        raise AdaptationInputError("the instruct tokenizer has no chat template: self-calibration needs one")
    texts = _read_texts(corpus_path, options.corpus_chars)
    profile = script_profile(_take_chars(texts, options.script_sample_chars))
    passages = corpus_passages(texts, options)
    language = instruction_language(options.language)

    if options.prompt_file is not None:
        prompts = read_prompt_file(options.prompt_file)[: options.self_calibration_examples]
        documents = passages[: options.copy_examples]
    else:
        n_self, n_copy = _split(len(passages), options.self_calibration_examples, options.copy_examples)
        prompts = self_calibration_prompts(passages[:n_self], language, options.seed)
        documents = passages[n_self : n_self + n_copy]
    if not prompts and not documents:
        raise AdaptationInputError(
            f"{corpus_path}: no passage of at least {options.passage_min_chars} characters for the calibration set"
        )

    answers: list[Answer] = []
    generated, cancelled = 0, False
    if prompts:
        answers, generated, cancelled = cached_answers(
            instruct_model,
            instruct_tokenizer,
            prompts,
            cache_path,
            max_new_tokens=options.max_new_tokens,
            batch_size=options.batch_size,
            progress=progress,
            should_cancel=should_cancel,
        )
    dropped = dict.fromkeys(DROP_REASONS, 0)
    examples: list[Example] = []
    for answer in answers:
        reason = answer_problem(answer.answer, answer.finished, profile, options)
        if reason is None:
            examples.append(chat_example(answer.prompt, answer.answer))
        else:
            dropped[reason] += 1
    kept = len(examples)
    examples.extend(copy_examples(documents, language, options.seed))
    stats = CalibrationStats(
        language=language,
        script=profile.script,
        script_share=round(profile.share, 4),
        prompt_source="file" if options.prompt_file is not None else "corpus",
        prompts=len(prompts),
        generated=generated,
        reused=len(answers) - generated,
        kept=kept,
        dropped=dropped,
        copy_examples=len(documents),
        examples=len(examples),
        cancelled=cancelled,
        seconds=round(time.perf_counter() - started, 2),
    )
    return examples, stats


def _take_chars(texts: Iterable[str], limit: int) -> list[str]:
    taken, total = [], 0
    for text in texts:
        if total >= limit:
            break
        taken.append(text[: limit - total])
        total += len(taken[-1])
    return taken


def save_examples(examples: Iterable[Example], path: str) -> int:
    """Write chat examples as `.jsonl` (one `{"messages": [...]}` per line, written atomically); returns the count."""
    tmp = f"{path}.tmp"
    count = 0
    with open(tmp, "w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps(example, ensure_ascii=False) + "\n")
            count += 1
    os.replace(tmp, path)
    return count


__all__ = [
    "COPY_INSTRUCTIONS",
    "DROP_REASONS",
    "SELF_CALIBRATION_TEMPLATES",
    "Answer",
    "CalibrationStats",
    "answer_problem",
    "build_calibration_set",
    "cached_answers",
    "chat_example",
    "copy_examples",
    "corpus_passages",
    "generate_answers",
    "instruction_language",
    "load_cached_answers",
    "model_fingerprint",
    "read_prompt_file",
    "repeated_ngram_ratio",
    "save_examples",
    "self_calibration_prompts",
]
