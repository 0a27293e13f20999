"""The quality study: what keeps an adapted model good at the target language without making it worse at the
source language or at following instructions.

One command, real weights: SmolLM2-135M-Instruct adapted directly (it is its own instruct model), an `extended`
vocabulary trained on Russian literature, `mean` init, one fixed CPT budget (`embeddings+head`), and a grid over

    cpt.train_rows      all | new          (new: the source's rows stay bit-identical)
    cpt.source_mix      0 | 0.1            (English replay from held-out-free EWT text)
    vocab.priority      new-first | target-first
    calibration         none | self+copy   (the original model's own answers plus the copy task)

and over the init methods given by `--inits` (default: `mean` alone; e.g. `--inits mean,mean:fit,focus,omp`, where
`:fit` or `:0.9` sets the new rows' scale, `init.scale`).
Runs share every stage they have in common (the tokenizer per priority, the init per priority x init, CPT per
priority x init x rows x mix, the calibration set once; the auxiliary spaces of focus / omp / regression are cached
once per tokenizer), so the grid costs 8 CPT runs per init, not 16. Every
model is scored once with the project's own evaluation on held-out text: Russian literature held out of every
training stage, and English web text held out of the replay corpus.

    python bench/quality_study.py --tiny     # CPU, minutes, tiny budgets (the test suite runs it)
    python bench/quality_study.py            # the full grid on one GPU (sized for about 9 minutes on an H200)
    python bench/quality_study.py --tiny --inits mean,regression   # an init axis on top

Prints one JSON line per grid run and per model, then a table. Metrics: target / source chars per token
(`symbols_per_token`), target / source bits per char, copy_ru / copy_en F1, ruWorldTree accuracy, generation
chars/s at batch 1 (and chars per step), wall time per stage.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from langadapt.core.adaptation.config import AUXILIARY_METHODS
from langadapt.core.adaptation.corpus import iter_documents
from langadapt.core.adaptation.device import compute_device, inference_dtype
from langadapt.core.adaptation.evaluate import EvalData, evaluate
from langadapt.core.adaptation.pipeline import run_pipeline, stages
from langadapt.core.adaptation.rundir import stage_dirname
from langadapt.core.adaptation.sources import load_model, save_pretrained
from langadapt.core.adaptation.spec import AdaptationSpec

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TASKS = ["symbols_per_token", "bits_per_char", "copy_ru", "copy_en", "mc_ruworldtree", "generation_speed"]
GRID = {
    "train_rows": ("all", "new"),
    "source_mix": (0.0, 0.1),
    "priority": ("new-first", "target-first"),
    "calibration": ("none", "self+copy"),
}


@dataclass(frozen=True)
class Size:
    new_tokens: int
    vocab_chars: int  # corpus characters the vocabulary is trained on
    train_chars: int  # corpus characters written for CPT (the stream repeats when it runs out)
    heldout_chars: int  # held-out Russian and English characters for evaluation
    cpt: dict[str, Any]
    calibration: dict[str, Any]
    limit: int


FULL = Size(
    new_tokens=16_000,
    vocab_chars=20_000_000,
    train_chars=30_000_000,
    heldout_chars=100_000,
    cpt={"steps": 300, "seq_len": 1024, "batch_size": 16, "grad_accum": 1, "lr": 2e-4, "checkpoint_every": 100},
    calibration={
        "self_calibration_examples": 256,
        "copy_examples": 256,
        "max_new_tokens": 256,
        "batch_size": 32,
        "sft": {"batch_size": 8, "grad_accum": 2, "max_len": 768},
    },
    limit=50,
)
TINY = Size(
    new_tokens=600,
    vocab_chars=300_000,
    train_chars=300_000,
    heldout_chars=4_000,
    cpt={"steps": 4, "seq_len": 64, "batch_size": 2, "grad_accum": 1, "lr": 5e-3, "warmup_steps": 1},
    calibration={
        "self_calibration_examples": 2,
        "copy_examples": 2,
        "max_new_tokens": 8,
        "batch_size": 4,
        "passage_max_chars": 80,
        "passage_min_chars": 20,
        "sft": {"batch_size": 2, "grad_accum": 1, "max_len": 192, "lr": 1e-4},
    },
    limit=1,
)


def write_texts(path: Path, texts: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return str(path)


def split(source: Path, heldout_chars: int, rest_chars: int, out: Path, name: str) -> tuple[str, str]:
    """(held-out file, training file): the first `heldout_chars` characters, then the next `rest_chars`."""
    docs = list(iter_documents(str(source), limit_chars=heldout_chars + rest_chars))
    heldout, rest, seen = [], [], 0
    for doc in docs:
        if seen < heldout_chars:
            head = doc[: heldout_chars - seen]
            heldout.append(head)
            seen += len(head)
            doc = doc[len(head) :]
        if doc.strip():
            rest.append(doc)
    return write_texts(out / f"{name}.heldout.jsonl", heldout), write_texts(out / f"{name}.train.jsonl", rest)


def init_settings(init: str, aux_cache: str | None) -> dict[str, Any]:
    """`--inits` entry -> init section: a method, optionally with its new rows' scale (`mean:fit`, `focus:0.9`)."""
    method, _, scale = init.partition(":")
    settings: dict[str, Any] = {"method": method, "cache_dir": aux_cache if method in AUXILIARY_METHODS else None}
    if scale:
        settings["scale"] = scale if scale == "fit" else float(scale)
    return settings


def grid_specs(
    model: str, data: dict[str, str], size: Size, inits: tuple[str, ...] = ("mean",), aux_cache: str | None = None
) -> list[tuple[dict[str, Any], AdaptationSpec]]:
    runs = []
    for init, *values in itertools.product(inits, *GRID.values()):
        point = {"init": init, **dict(zip(GRID, values, strict=True))}
        cpt = {**size.cpt, "train_rows": point["train_rows"]}
        if point["source_mix"]:
            cpt.update(source_mix=point["source_mix"], source_corpus=data["en_train"])
        calibration = {"method": point["calibration"], **size.calibration} if point["calibration"] != "none" else {}
        spec = AdaptationSpec(
            base_model=model,
            corpus=data["ru_train"],
            heldout=data["ru_heldout"],
            source_heldout=data["en_heldout"],
            vocab={
                "method": "extended",
                "new_tokens": size.new_tokens,
                "train_chars": size.vocab_chars,
                "priority": point["priority"],
            },
            init=init_settings(init, aux_cache),
            cpt=cpt,
            calibration=calibration,
            evaluation={"tasks": ["symbols_per_token"], "limit": 1, "heldout_chars": 1000},
        )
        runs.append((point, spec))
    return runs


def stage_key(stage: str, point: dict[str, Any]) -> tuple[Any, ...]:
    """What a stage's output depends on, among the grid's settings: equal keys share one output."""
    depends = {
        "tokenizer": ("priority",),
        "init": ("priority", "init"),
        "cpt": ("priority", "init", "train_rows", "source_mix"),
        "calibration-data": (),
        "calibrate": ("priority", "init", "train_rows", "source_mix"),
    }[stage]
    return (stage, *(point[name] for name in depends))


def run_grid(
    model: str, data: dict[str, str], size: Size, out: Path, inits: tuple[str, ...] = ("mean",)
) -> list[dict[str, Any]]:
    """Run every grid point's pipeline (shared stages linked, not re-run); returns per run its point, the models
    it produced and the time of each stage."""
    done: dict[tuple[Any, ...], str] = {}
    runs = []
    for point, spec in grid_specs(model, data, size, inits, str(out / "aux-cache")):
        run_dir = out / "runs" / "-".join(str(v) for v in point.values())
        run_dir.mkdir(parents=True, exist_ok=True)
        for stage in stages(spec):
            shared = done.get(stage_key(stage.name, point)) if stage.name != "evaluate" else None
            link = run_dir / stage_dirname(stage.name)
            if shared is not None and not link.exists():
                os.symlink(shared, link)
        started = time.perf_counter()
        report = run_pipeline(spec, str(run_dir))
        for stage in stages(spec):
            if stage.name != "evaluate":
                done.setdefault(stage_key(stage.name, point), str((run_dir / stage_dirname(stage.name)).resolve()))
        seconds = {s["stage"]: s["seconds"] for s in report.stages if s["stage"] != "evaluate"}
        shared_stages = [s["stage"] for s in report.stages if s.get("skipped")]
        adapted = str((run_dir / ("calibrate" if point["calibration"] != "none" else "cpt")).resolve())
        runs.append(
            {
                "point": point,
                "model": adapted,
                "stage_seconds": seconds,
                "shared_stages": shared_stages,
                "wall_s": round(time.perf_counter() - started, 1),
            }
        )
    return runs


def score(model_spec: str, data: EvalData, size: Size) -> dict[str, float]:
    device = compute_device()
    model, tokenizer = load_model(model_spec, device=device, dtype=inference_dtype(device))
    rows = evaluate(model, tokenizer, TASKS, data, limit=size.limit, batch_size=16)
    return {f"{row.task}/{row.metric}": round(row.value, 4) for row in rows}


COLUMNS = (
    ("ru chars/tok", "symbols_per_token/target"),
    ("en chars/tok", "symbols_per_token/source"),
    ("ru bits/char", "bits_per_char/target"),
    ("en bits/char", "bits_per_char/source"),
    ("copy_ru F1", "copy_ru/f1"),
    ("copy_en F1", "copy_en/f1"),
    ("ruWorldTree", "mc_ruworldtree/accuracy"),
    ("gen chars/s", "generation_speed/chars_per_s_batch1"),
)


def table(rows: list[tuple[str, dict[str, float]]]) -> str:
    header = "| run | " + " | ".join(name for name, _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    for label, metrics in rows:
        lines.append(f"| {label} | " + " | ".join(f"{metrics.get(key, float('nan')):.3f}" for _, key in COLUMNS) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU-sized budgets (minutes)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", type=Path, default=SHARED, help="the shared data folder")
    parser.add_argument("--out", type=Path, default=Path("runs/quality-study"))
    parser.add_argument("--inits", default="mean", help="comma-separated init methods: the grid's init axis")
    args = parser.parse_args()
    size = TINY if args.tiny else FULL
    started = time.perf_counter()
    shutil.rmtree(args.out, ignore_errors=True)
    (args.out / "data").mkdir(parents=True)

    ru_heldout, ru_train = split(
        args.data / "ru/ruslit.jsonl.xz", size.heldout_chars, size.train_chars, args.out / "data", "ru"
    )
    en_heldout, en_train = split(args.data / "en/ewt.jsonl.xz", size.heldout_chars, 2_000_000, args.out / "data", "en")
    data = {"ru_heldout": ru_heldout, "ru_train": ru_train, "en_heldout": en_heldout, "en_train": en_train}
    original = str(args.out / "original")
    save_pretrained(*load_model(args.model), original)  # de-quantized once: every stage then loads plain weights

    inits = tuple(args.inits.split(","))
    runs = run_grid(original, data, size, args.out, inits)
    eval_data = EvalData(
        target_texts=tuple(iter_documents(ru_heldout)),
        source_texts=tuple(iter_documents(en_heldout)),
        mera_dir=str(args.data / "eval/mera"),
    )
    baseline = score(original, eval_data, size)
    print(json.dumps({"run": "original", "metrics": baseline}), flush=True)
    rows = [("original", baseline)]
    for run in runs:
        metrics = score(run["model"], eval_data, size)
        label = " ".join(f"{k}={v}" for k, v in run["point"].items() if k != "init" or len(inits) > 1)
        rows.append((label, metrics))
        print(json.dumps({**run, "metrics": metrics}), flush=True)
    print(table(rows), flush=True)
    print(
        json.dumps({"study": "done", "runs": len(runs), "seconds": round(time.perf_counter() - started, 1)}), flush=True
    )


if __name__ == "__main__":
    sys.exit(main())
