"""The contract every evaluation task follows: what it reads (`EvalData`), what it returns (`ScoreRow`s).

A task is one function with the `TaskFn` signature, so the suite runs tasks uniformly and a job service can store
the rows in one table without knowing the tasks.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from langadapt.core.adaptation.errors import AdaptationInputError

T = TypeVar("T")

ItemProgress = Callable[[int, int], None]  # (items done, items in this part of the task), after every batch


@dataclass(frozen=True)
class ScoreRow:
    """One number of one task.

    task:   the task name as registered in `TASKS` (or `micro_avg`).
    metric: what the number is (`accuracy`, `f1`, `target`, `simplear_exact_match`, ...).
    value:  the number.
    n:      what the number is averaged over: items (questions, documents) for accuracy-like metrics, characters for
            `bits_per_char` and `symbols_per_token`, datasets for `micro_avg`.
    """

    task: str
    metric: str
    value: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EvalData:
    """The evaluation material that does not ship with the model.

    target_texts: held-out target-language documents (never seen in vocabulary training or CPT).
    source_texts: held-out source-language documents (English for the reference setup).
    mera_dir:     the folder holding the MERA `.jsonl` files (`ruWorldTree.jsonl`, `SimpleAr.jsonl`, ...).
    """

    target_texts: Sequence[str] = field(default_factory=tuple)
    source_texts: Sequence[str] = field(default_factory=tuple)
    mera_dir: str | Path | None = None


class TaskFn(Protocol):
    def __call__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        data: EvalData,
        *,
        limit: int | None = None,
        batch_size: int = 8,
        progress: ItemProgress | None = None,
    ) -> list[ScoreRow]:
        """Score rows for this task; `limit` caps the items (documents, questions) per dataset; `progress` hears
        (done, total) after every batch."""
        ...


def take(items: Sequence[T], limit: int | None) -> list[T]:
    """The first `limit` items (all when `limit` is None): deterministic, so reruns score the same items."""
    return list(items if limit is None else items[:limit])


def per_language_rows(
    task: str, data: EvalData, limit: int | None, measure: Callable[[list[str]], tuple[float, int]]
) -> list[ScoreRow]:
    """One row per held-out language (`target`, `source`) that has texts: `measure(texts) -> (value, n)`."""
    rows = []
    for metric, texts in (("target", data.target_texts), ("source", data.source_texts)):
        kept = take([text for text in texts if text], limit)
        if kept:
            rows.append(ScoreRow(task, metric, *measure(kept)))
    if not rows:
        raise AdaptationInputError(f"task '{task}' needs held-out target or source texts, got none")
    return rows


def require_texts(texts: Sequence[str], task: str, which: str) -> list[str]:
    """The non-blank texts; a task that needs texts and gets none is a user error, not a row with n = 0."""
    kept = [text for text in texts if text.strip()]
    if not kept:
        raise AdaptationInputError(f"task '{task}' needs held-out {which} texts, got none")
    return kept


def load_mera(mera_dir: str | Path | None, name: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The items of `MERA/<name>.jsonl`: `{"task", "inputs": {...}, "label", "label_source", ...}` per line."""
    if mera_dir is None:
        raise AdaptationInputError(f"the MERA folder is not set (needed for {name})")
    path = Path(mera_dir) / f"{name}.jsonl"
    if not path.is_file():
        raise AdaptationInputError(f"MERA file not found: {path}")
    items: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as stream:
        for line_no, line in enumerate(stream, start=1):
            if limit is not None and len(items) >= limit:
                break
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise AdaptationInputError(f"{path}:{line_no}: not JSON ({exc.msg})") from exc
            if not isinstance(item, dict) or not isinstance(item.get("inputs"), dict) or "label" not in item:
                raise AdaptationInputError(f"{path}:{line_no}: expected an object with 'inputs' and 'label'")
            items.append(item)
    if not items:
        raise AdaptationInputError(f"{path}: no items")
    return items
