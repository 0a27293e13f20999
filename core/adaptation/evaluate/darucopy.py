"""DaruCopy: can the model repeat a document exactly? (`copy_ru` on target texts, `copy_en` on source texts.)

Vocabulary surgery breaks copying first: a model whose new embeddings are badly initialised or badly propagated
still "knows" the language but can no longer reproduce rare tokens, so copying is a cheap probe of the embeddings
that needs no labelled data. The prompt (a Russian instruction for `copy_ru`, an English one for `copy_en`) asks to
repeat a document taken from the held-out texts: whitespace runs collapsed to one space, consecutive sentences
packed up to `max_chars` characters. Documents are taken round-robin over the texts (first chunk of every text,
then the second, ...) so that a `limit` still samples many texts. Generation is greedy with a budget of
`ceil(1.25 * document tokens) + 8` new tokens.

Metrics, both on the output and the document with surrounding whitespace stripped:
- `exact_match`: the share of outputs equal to their document.
- `f1`: matched-characters F1 from `difflib.SequenceMatcher` (autojunk off): with M the characters in the matching
  blocks, precision M / len(output), recall M / len(document), F1 = 2M / (len(output) + len(document)). Unlike a
  bag-of-characters F1 it is order-aware (a shuffled copy scores low); it is Ratcliff-Obershelp matching, close to
  but not always equal to a longest-common-subsequence count.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from difflib import SequenceMatcher
from itertools import zip_longest
from typing import Literal

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.core.adaptation.evaluate.base import EvalData, ItemProgress, ScoreRow, TaskFn, require_texts, take
from langadapt.core.adaptation.evaluate.generation import greedy_generate, prompt_ids

MAX_CHARS = 300
MIN_CHARS = 20
_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+")

INSTRUCTIONS = {
    "ru": ("Повтори следующий текст в точности, без изменений и без пояснений.", "Текст:", "Повтор:"),
    "en": ("Repeat the following text exactly, without any changes or comments.", "Text:", "Copy:"),
}


def _pieces(sentence: str, max_chars: int) -> list[str]:
    """A sentence cut at whitespace (or hard, when it has none) into pieces of at most `max_chars`."""
    pieces = []
    while len(sentence) > max_chars:
        cut = sentence.rfind(" ", 0, max_chars + 1)
        cut = cut if cut > 0 else max_chars
        pieces.append(sentence[:cut].strip())
        sentence = sentence[cut:].strip()
    return [*pieces, sentence] if sentence else pieces


def _chunks(text: str, max_chars: int, min_chars: int) -> list[str]:
    chunks: list[str] = []
    current = ""
    for sentence in _SENTENCE_END.split(" ".join(text.split())):
        for piece in _pieces(sentence, max_chars):
            if current and len(current) + 1 + len(piece) > max_chars:
                chunks.append(current)
                current = piece
            else:
                current = f"{current} {piece}" if current else piece
    if current:
        chunks.append(current)
    return [chunk for chunk in chunks if len(chunk) >= min_chars]


def copy_documents(texts: Sequence[str], *, max_chars: int = MAX_CHARS, min_chars: int = MIN_CHARS) -> list[str]:
    """Sentence-packed documents of `min_chars`..`max_chars` characters, round-robin over `texts`."""
    per_text = [_chunks(text, max_chars, min_chars) for text in texts]
    return [chunk for row in zip_longest(*per_text) for chunk in row if chunk is not None]


def char_f1(prediction: str, reference: str) -> float:
    """Matched-characters F1 (see the module docstring); 1.0 for two empty strings."""
    prediction, reference = prediction.strip(), reference.strip()
    if not prediction and not reference:
        return 1.0
    blocks = SequenceMatcher(None, prediction, reference, autojunk=False).get_matching_blocks()
    return 2 * sum(block.size for block in blocks) / (len(prediction) + len(reference))


def exact_match(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def copy_scores(task: str, predictions: Sequence[str], references: Sequence[str]) -> list[ScoreRow]:
    """The `exact_match` and `f1` rows of `task` for paired outputs and documents."""
    if len(predictions) != len(references) or not references:
        raise ValueError("need one prediction per reference and at least one pair")
    n = len(references)
    pairs = list(zip(predictions, references, strict=True))
    return [
        ScoreRow(task, "exact_match", sum(exact_match(p, r) for p, r in pairs) / n, n),
        ScoreRow(task, "f1", sum(char_f1(p, r) for p, r in pairs) / n, n),
    ]


def copy_prompt(tokenizer: PreTrainedTokenizerBase, document: str, language: str) -> list[int]:
    instruction, text_cue, answer_cue = INSTRUCTIONS[language]
    return prompt_ids(
        tokenizer,
        user_message=f"{instruction}\n\n{document}",
        plain_prompt=f"{instruction}\n\n{text_cue} {document}\n{answer_cue}",
    )


def _copy_task(task: str, language: str, which: Literal["target", "source"]) -> TaskFn:
    """The copy task over the held-out `which` texts, instructed in `language`."""

    def run(
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        data: EvalData,
        *,
        limit: int | None = None,
        batch_size: int = 8,
        progress: ItemProgress | None = None,
    ) -> list[ScoreRow]:
        texts = data.target_texts if which == "target" else data.source_texts
        documents = take(copy_documents(require_texts(texts, task, which)), limit)
        if not documents:
            raise AdaptationInputError(
                f"task '{task}': no document of at least {MIN_CHARS} characters in the {which} texts"
            )
        prompts = [copy_prompt(tokenizer, document, language) for document in documents]
        budgets = [math.ceil(1.25 * len(tokenizer.encode(d, add_special_tokens=False))) + 8 for d in documents]
        outputs = greedy_generate(model, tokenizer, prompts, budgets, batch_size=batch_size, progress=progress)
        return copy_scores(task, outputs, documents)

    run.__name__ = run.__qualname__ = task
    return run


copy_ru = _copy_task("copy_ru", "ru", "target")  # held-out target texts, instructed in Russian
copy_en = _copy_task("copy_en", "en", "source")  # held-out source texts, instructed in English
