"""Evaluation tasks, Darumeru-like: one module per task, each returning score rows, picked by name.

Every task has the `TaskFn` signature and returns `ScoreRow(task, metric, value, n)`s, so a suite run is a flat
list of rows a job service can store as they are. `micro_avg` is not a model task but the mean over the rows of the
other tasks run in the same call (see `micro_avg.py` for which metric of each task enters); it is computed last
wherever it appears in the list.

| task              | metrics                                        | data                                 |
|-------------------|------------------------------------------------|--------------------------------------|
| symbols_per_token | target, source (chars per token)               | held-out texts, tokenizer only       |
| bits_per_char     | target, source                                 | held-out texts                       |
| copy_ru, copy_en  | exact_match, f1                                | held-out target / source texts       |
| mc_ruworldtree    | accuracy, accuracy_norm                        | MERA/ruWorldTree.jsonl               |
| mera_arith        | simplear_exact_match, rumultiar_exact_match    | MERA/SimpleAr.jsonl, ruMultiAr.jsonl |
| generation_speed  | chars_per_step, chars_per_s_batch1, _batch8    | held-out target texts (openings)     |
| micro_avg         | mean                                           | the rows above                       |
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.core.adaptation.evaluate.base import EvalData, ScoreRow, TaskFn
from langadapt.core.adaptation.evaluate.bits_per_char import bits_per_char_rows
from langadapt.core.adaptation.evaluate.darucopy import copy_en, copy_ru
from langadapt.core.adaptation.evaluate.generation_speed import generation_speed
from langadapt.core.adaptation.evaluate.mc_ruworldtree import mc_ruworldtree
from langadapt.core.adaptation.evaluate.mera_arith import mera_arith
from langadapt.core.adaptation.evaluate.micro_avg import MICRO_AVG_METRICS, micro_avg
from langadapt.core.adaptation.evaluate.symbols_per_token import symbols_per_token
from langadapt.core.adaptation.task_names import AVERAGED_TASKS, MICRO_AVG, MODEL_TASKS, TASK_NAMES

TASKS: dict[str, TaskFn] = {
    "symbols_per_token": symbols_per_token,
    "bits_per_char": bits_per_char_rows,
    "copy_ru": copy_ru,
    "copy_en": copy_en,
    "mc_ruworldtree": mc_ruworldtree,
    "mera_arith": mera_arith,
    "generation_speed": generation_speed,
}
assert tuple(TASKS) == MODEL_TASKS, "task_names.TaskName is out of date"
assert {task for task, _ in MICRO_AVG_METRICS} == AVERAGED_TASKS, "task_names.AVERAGED_TASKS is out of date"

TaskProgress = Callable[[str, int, int], None]  # (task, items done, items in this part of the task)


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str],
    data: EvalData,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    progress: TaskProgress | None = None,
) -> list[ScoreRow]:
    """Run `tasks` (each once, in the given order; `micro_avg` last) and return their rows.

    `limit` caps the items (documents, questions) of each dataset; the first items are taken, so reruns score the
    same ones. The model is put in eval mode; everything runs under `torch.inference_mode` and is deterministic
    (greedy decoding, no sampling). Unknown task names, an empty task list, `micro_avg` without a task it averages
    or a bad `limit` / `batch_size` raise `AdaptationInputError` before anything runs. `progress` hears
    (task, done, total) after every batch; a task with several parts (target and source texts) restarts its count.
    """
    unknown = [name for name in tasks if name not in TASK_NAMES]
    if unknown:
        raise AdaptationInputError(
            f"unknown evaluation task(s) {', '.join(map(repr, unknown))} (choose from {', '.join(TASK_NAMES)})"
        )
    if not tasks:
        raise AdaptationInputError(f"no evaluation task given (choose from {', '.join(TASK_NAMES)})")
    if MICRO_AVG in tasks and not AVERAGED_TASKS.intersection(tasks):
        raise AdaptationInputError(
            f"micro_avg averages the rows of {', '.join(sorted(AVERAGED_TASKS))}: run one of them too"
        )
    if limit is not None and limit < 1:
        raise AdaptationInputError(f"limit must be at least 1, got {limit}")
    if batch_size < 1:
        raise AdaptationInputError(f"batch_size must be at least 1, got {batch_size}")
    model.eval()
    rows: list[ScoreRow] = []
    for name in dict.fromkeys(tasks):
        if name == MICRO_AVG:
            continue
        task_progress = None if progress is None else partial(progress, name)
        rows.extend(TASKS[name](model, tokenizer, data, limit=limit, batch_size=batch_size, progress=task_progress))
    if MICRO_AVG in tasks:
        rows.append(micro_avg(rows))
    return rows


__all__ = [
    "MICRO_AVG_METRICS",
    "TASKS",
    "TASK_NAMES",
    "EvalData",
    "ScoreRow",
    "TaskFn",
    "evaluate",
    "micro_avg",
]
