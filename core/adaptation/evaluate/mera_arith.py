"""SimpleAr and ruMultiAr (MERA): exact match of the first number the model generates for an arithmetic formula.

Zero-shot and greedy. With a chat template the user turn asks (in Russian) for the value and only the number;
without one the prompt is the bare `<formula> =`, which a base model continues with the result. The answer is the
*first* number in the output (see `parse_number`), compared numerically with the label, so `12`, ` 12.`, `12.0`,
`Ответ: 12` all match 12, while an output that restates the formula before the result does not.

Metrics (task `mera_arith`): `simplear_exact_match` and `rumultiar_exact_match`, one per dataset; `limit` caps the
items of each dataset.
"""

from __future__ import annotations

import re
from decimal import Decimal

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.core.adaptation.evaluate.base import EvalData, ItemProgress, ScoreRow, load_mera
from langadapt.core.adaptation.evaluate.generation import greedy_generate, prompt_ids

DATASETS = {"simplear": "SimpleAr", "rumultiar": "ruMultiAr"}
MAX_NEW_TOKENS = 24  # answers have at most 6 characters; room for a short preamble such as "Ответ: "

# An optional minus (ASCII or U+2212) attached to the digits; an integer part either grouped in thousands by a
# space / no-break space / thin space ("10 963") or plain; an optional fraction after "." or ",".
_NUMBER = re.compile(
    r"(?P<sign>[-\u2212])?(?P<int>\d{1,3}(?:[ \u00a0\u202f]\d{3})+(?!\d)|\d+)(?:[.,](?P<frac>\d+))?",
)


def parse_number(text: str) -> Decimal | None:
    """The first number in `text` (None when there is none).

    `-34`, `−34` and `(-34)` give -34; `10 963` (thousands separated by spaces) gives 10963; `12.5` and `12,5` give
    12.5; trailing text is ignored (`42 apples` -> 42). A minus separated from the digits by a space is not a sign.
    Limits: `1,000` reads as 1.000 (a decimal comma), and two numbers whose second has exactly three digits
    (`42 100`) read as one.
    """
    match = _NUMBER.search(text)
    if match is None:
        return None
    digits = re.sub(r"\D", "", match["int"])
    fraction = f".{match['frac']}" if match["frac"] else ""
    return Decimal(f"{'-' if match['sign'] else ''}{digits}{fraction}")


def numbers_match(output: str, label: str) -> bool:
    expected = parse_number(label)
    if expected is None:
        raise AdaptationInputError(f"arithmetic label {label!r} is not a number")
    return parse_number(output) == expected


def arith_prompt(tokenizer: PreTrainedTokenizerBase, formula: str) -> list[int]:
    return prompt_ids(
        tokenizer,
        user_message=f"Вычисли значение выражения: {formula}\nВ ответе напиши только число.",
        plain_prompt=f"{formula} =",
    )


def mera_arith(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: EvalData,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    progress: ItemProgress | None = None,
) -> list[ScoreRow]:
    """Both datasets in one batched generation (so progress runs over all their items), scored per dataset."""
    datasets = {key: load_mera(data.mera_dir, dataset, limit) for key, dataset in DATASETS.items()}
    prompts = []
    for key, items in datasets.items():
        for position, item in enumerate(items):
            formula = item["inputs"].get("formula")
            if not isinstance(formula, str) or not formula.strip():
                raise AdaptationInputError(f"{DATASETS[key]} item {position}: needs a non-empty 'formula'")
            prompts.append(arith_prompt(tokenizer, formula.strip()))
    outputs = iter(
        greedy_generate(
            model, tokenizer, prompts, [MAX_NEW_TOKENS] * len(prompts), batch_size=batch_size, progress=progress
        )
    )
    rows = []
    for key, items in datasets.items():
        correct = sum(numbers_match(next(outputs), str(item["label"])) for item in items)
        rows.append(ScoreRow("mera_arith", f"{key}_exact_match", correct / len(items), len(items)))
    return rows
