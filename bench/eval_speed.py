"""Wall time of a job's evaluation of one model: SmolLM2-135M-Instruct (real weights) with the default task list.

The held-out text is what a job without an eval file uses: the corpus's first `evaluation.heldout_chars`
characters (Russian literature). The model is placed as the evaluate stage places it (`compute_device()`, bf16 on
a GPU). Prints one JSON line per task and a summary; with `--baseline` it first runs the former defaults in the same
process (the task list before generation_speed, no item limit, batch 8) and reports the ratio.

    python bench/eval_speed.py [--baseline] [--corpus ../shared/data/ru/ruslit.jsonl.xz]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from langadapt.core.adaptation.config import EvaluationConfig
from langadapt.core.adaptation.corpus import iter_documents
from langadapt.core.adaptation.device import compute_device, inference_dtype
from langadapt.core.adaptation.evaluate import EvalData, evaluate
from langadapt.core.adaptation.sources import load_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def run(label: str, config: EvaluationConfig, model, tokenizer, data: EvalData) -> float:
    timings: dict[str, float] = {}
    started = time.perf_counter()
    for task in config.tasks:
        task_started = time.perf_counter()
        rows = evaluate(model, tokenizer, [task], data, limit=config.limit, batch_size=config.batch_size)
        timings[task] = round(time.perf_counter() - task_started, 1)
        values = {f"{row.task}/{row.metric}": round(row.value, 4) for row in rows}
        print(json.dumps({"run": label, "task": task, "seconds": timings[task], "n": rows[0].n, **values}), flush=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--corpus", default=str(SHARED / "ru" / "ruslit.jsonl.xz"))
    parser.add_argument("--baseline", action="store_true", help="also run the former defaults (no limit, batch 8)")
    args = parser.parse_args()

    config = EvaluationConfig()
    device = compute_device()
    model, tokenizer = load_model(args.model, device=device, dtype=inference_dtype(device))
    texts = tuple(iter_documents(args.corpus, limit_chars=config.heldout_chars))
    data = EvalData(target_texts=texts)
    summary: dict[str, object] = {
        "model": args.model,
        "device": str(device),
        "dtype": str(inference_dtype(device)).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "tasks": config.tasks,
        "limit": config.limit,
        "batch_size": config.batch_size,
        "heldout_chars": sum(map(len, texts)),
        "documents": len(texts),
    }
    if args.baseline:
        former_tasks = ["symbols_per_token", "bits_per_char", "copy_ru"]
        former = config.model_copy(update={"tasks": former_tasks, "limit": None, "batch_size": 8})
        summary["baseline_seconds"] = round(run("former defaults", former, model, tokenizer, data), 1)
    seconds = run("defaults", config, model, tokenizer, data)
    summary["seconds"] = round(seconds, 1)
    if args.baseline:
        summary["speedup_vs_former_defaults"] = round(summary["baseline_seconds"] / seconds, 2)  # type: ignore[operator]
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
