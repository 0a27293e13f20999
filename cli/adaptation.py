"""Sub-commands over `langadapt.core.adaptation`: run, evaluate, tokenizer stats, vocab build, embed init, propagate.

Every command writes its output directory atomically and prints one JSON line describing the result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, get_args

import platformdirs

from langadapt.core.adaptation.config import (
    AUXILIARY_METHODS,
    DEFAULT_EVAL_TASKS,
    VARIANTS,
    EvaluationConfig,
    InitConfig,
    KeepBy,
    Priority,
    VocabConfig,
    VocabMethod,
)
from langadapt.core.adaptation.corpus import require_documents
from langadapt.core.adaptation.device import compute_device, inference_dtype
from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.core.adaptation.evaluate import EvalData, evaluate
from langadapt.core.adaptation.events import Event, Message, Progress, StageDone, StageSkipped, StageStarted
from langadapt.core.adaptation.fsutil import atomic_output_dir
from langadapt.core.adaptation.init import INIT_METHODS
from langadapt.core.adaptation.pipeline import run_pipeline
from langadapt.core.adaptation.propagate import propagate_saved
from langadapt.core.adaptation.sources import load_model, load_tokenizer, save_pretrained
from langadapt.core.adaptation.spec import load_spec
from langadapt.core.adaptation.surgery import change_vocabulary
from langadapt.core.adaptation.vocab import build_vocab
from langadapt.core.adaptation.vocab.common import count_tokens


def _emit(payload: dict[str, Any]) -> None:
    print(json.dumps(payload, ensure_ascii=False), flush=True)


def tokenizer_stats(args: argparse.Namespace) -> None:
    tokenizer = load_tokenizer(args.tokenizer)
    texts = list(require_documents(args.corpus, limit_chars=args.limit_chars))
    chars, tokens = sum(len(text) for text in texts), count_tokens(tokenizer, texts)
    _emit({"chars": chars, "tokens": tokens, "chars_per_token": round(chars / tokens, 4) if tokens else 0.0})


def vocab_build(args: argparse.Namespace) -> None:
    given = {
        "vocab_size": args.vocab_size,
        "new_tokens": args.new_tokens,
        "keep_tokens": args.keep_tokens,
        "keep_by": args.keep_by,
        "priority": args.priority,
        "train_chars": args.train_chars,
        "heldout_chars": args.heldout_chars,
        "source_corpus": args.source_corpus,
    }
    config = VocabConfig(method=args.method, **{name: value for name, value in given.items() if value is not None})
    source = load_tokenizer(args.source)
    with atomic_output_dir(args.out) as tmp:
        result = build_vocab(source, args.corpus, config, heldout=args.heldout)
        result.save(tmp)
    _emit(result.report.to_dict())


def _scale(value: str | None) -> float | str | None:
    """--scale: 'fit' or a number."""
    if value is None or value == "fit":
        return value
    try:
        return float(value)
    except ValueError:
        raise AdaptationInputError(f"--scale takes a number or 'fit', not '{value}'") from None


def embed_init(args: argparse.Namespace) -> None:
    auxiliary = {
        "dim": args.aux_dim,
        "epochs": args.aux_epochs,
        "window": args.aux_window,
        "train_chars": args.aux_chars,
    }
    given = {
        "neighbours": args.neighbours,
        "terms": args.terms,
        "mean_weight": args.mean_weight,
        "head_norm": args.head_norm,
        "scale": _scale(args.scale),
        "scale_chars": args.scale_chars,
        "auxiliary": {name: value for name, value in auxiliary.items() if value is not None} or None,
    }
    config = InitConfig(
        method=args.init,
        seed=args.seed,
        cache_dir=args.cache_dir or os.path.join(platformdirs.user_cache_dir("langadapt"), "auxiliary"),
        **{name: value for name, value in given.items() if value is not None},
    )
    if args.corpus is None and (config.method in AUXILIARY_METHODS or config.resolved_scale == "fit"):
        what = f"--init {config.method}" if config.method in AUXILIARY_METHODS else "--scale fit"
        raise AdaptationInputError(f"{what} needs --corpus (target-language text)")
    model, old_tokenizer = load_model(args.model)
    new_tokenizer = load_tokenizer(args.tokenizer)
    with atomic_output_dir(args.out) as tmp:
        change = change_vocabulary(model, old_tokenizer, new_tokenizer, config, corpus=args.corpus)
        save_pretrained(model, new_tokenizer, tmp)
    _emit(
        {
            "init": args.init,
            "vocab_size": change.mapping.new_size,
            "copied_tokens": len(change.mapping.overlap),
            "initialised_tokens": len(change.mapping.new_ids),
            "new_row_scale": round(change.scale, 4),
            "out": os.path.abspath(args.out),
        }
    )


def propagate(args: argparse.Namespace) -> None:
    with atomic_output_dir(args.out) as tmp:
        report = propagate_saved(
            base=args.base,
            adapted_base=args.adapted_base,
            instruct=args.instruct,
            variant=args.variant,
            out_dir=tmp,
            lora_adapter=args.lora_adapter,
            lora_scale=args.lora_scale,
        )
    _emit({**report, "out": os.path.abspath(args.out)})


def run(args: argparse.Namespace) -> None:
    spec = load_spec(args.spec)

    report = run_pipeline(spec, args.out, emit=lambda event: print(describe(event), file=sys.stderr, flush=True))
    _emit(report.to_dict())


def describe(event: Event) -> str:
    """One line of progress for the terminal."""
    if isinstance(event, StageStarted):
        return f"[{event.stage}] started"
    if isinstance(event, StageSkipped):
        return f"[{event.stage}] complete output found: skipped"
    if isinstance(event, StageDone):
        return f"[{event.stage}] done in {event.seconds} s"
    if isinstance(event, Progress):
        total = "?" if event.total is None else event.total
        details = " ".join(f"{k} {_short(v)}" for k, v in event.data.items() if k not in ("step", "total_steps"))
        eta = "" if event.eta_s is None else f" eta {event.eta_s:.0f} s"
        return f"[{event.stage}] {event.step}/{total} {event.unit}{eta} {details}".rstrip()
    assert isinstance(event, Message)
    return f"[{event.stage or 'run'}] {event.text}"


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def register(commands: argparse._SubParsersAction) -> None:
    pipeline = commands.add_parser("run", help="run a whole adaptation job from a spec file, resuming if possible")
    pipeline.add_argument("spec", help="YAML job spec (see README)")
    pipeline.add_argument("--out", required=True, help="run directory (re-running resumes from completed stages)")
    pipeline.set_defaults(handler=run)

    defaults = EvaluationConfig()
    scoring = commands.add_parser("evaluate", help="score a model with the job's evaluation tasks (JSON lines)")
    scoring.add_argument("--model", required=True, help="model spec (shortcut, HF dir, .gguf)")
    scoring.add_argument("--heldout", required=True, help="held-out target-language text (.txt / .jsonl)")
    scoring.add_argument("--source-heldout", help="held-out source-language text (copy_en, source metrics)")
    scoring.add_argument("--tasks", default=",".join(DEFAULT_EVAL_TASKS), help="comma-separated task names")
    scoring.add_argument("--limit", type=int, default=defaults.limit, help="items per task")
    scoring.add_argument("--heldout-chars", type=int, default=defaults.heldout_chars)
    scoring.add_argument("--batch-size", type=int, default=defaults.batch_size)
    scoring.add_argument("--mera-dir", help="folder of MERA .jsonl files (mc_ruworldtree, mera_arith)")
    scoring.set_defaults(handler=evaluate_model)

    tokenizer = commands.add_parser("tokenizer", help="tokenizer utilities")
    tokenizer_cmds = tokenizer.add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")
    stats = tokenizer_cmds.add_parser("stats", help="chars per token of a tokenizer on a corpus")
    stats.add_argument("--tokenizer", required=True, help="shortcut, HF dir, .gguf, SentencePiece or tiktoken file")
    stats.add_argument("--corpus", required=True, help=".txt or .jsonl, optionally .xz / .gz")
    stats.add_argument("--limit-chars", type=int, default=None)
    stats.set_defaults(handler=tokenizer_stats)

    vocab = commands.add_parser("vocab", help="target-language vocabularies")
    vocab_cmds = vocab.add_subparsers(dest="vocab_command", required=True, metavar="COMMAND")
    build = vocab_cmds.add_parser("build", help="build a vocabulary by one of the paper's methods")
    build.add_argument("--method", required=True, choices=get_args(VocabMethod))
    build.add_argument("--source", required=True, help="source tokenizer spec")
    build.add_argument("--corpus", required=True, help="target-language training corpus")
    build.add_argument("--vocab-size", type=int, help="total size of a replacing vocabulary (bpe, unigram)")
    build.add_argument("--new-tokens", type=int, help="M: size of the target BPE to add (extended, optimized)")
    build.add_argument("--keep-tokens", type=int, help="N: source tokens kept by optimized")
    build.add_argument("--keep-by", choices=get_args(KeepBy), help="optimized: which source tokens are kept")
    build.add_argument("--priority", choices=get_args(Priority), help="do new merges outrank old ones (new-first)")
    build.add_argument("--source-corpus", help="source-language sample for optimized's token frequencies")
    build.add_argument("--heldout", help="held-out corpus for chars/token (default: the corpus's first chars)")
    build.add_argument("--heldout-chars", type=int, help="held-out characters for chars/token (200,000)")
    build.add_argument("--train-chars", type=int, default=None, help="train on at most this many characters")
    build.add_argument("--out", required=True)
    build.set_defaults(handler=vocab_build)

    embed = commands.add_parser("embed", help="embedding initialisation")
    embed_cmds = embed.add_subparsers(dest="embed_command", required=True, metavar="COMMAND")
    init = embed_cmds.add_parser("init", help="switch a model to a new vocabulary, initialising new tokens")
    init.add_argument("--model", required=True, help="model spec (shortcut, HF dir, .gguf)")
    init.add_argument("--tokenizer", required=True, help="the new tokenizer (e.g. a `vocab build` output)")
    init.add_argument("--init", required=True, choices=sorted(INIT_METHODS))
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--corpus", help="target-language text (.txt / .jsonl[.xz|.gz]): focus, omp, regression")
    init.add_argument("--aux-dim", type=int, help="auxiliary vector size (default 100)")
    init.add_argument("--aux-epochs", type=int, help="auxiliary training epochs (default 3)")
    init.add_argument("--aux-window", type=int, help="auxiliary context window (default 5)")
    init.add_argument("--aux-chars", type=int, help="corpus characters the auxiliary space reads (default 20 M)")
    init.add_argument("--neighbours", type=int, help="focus: nearest anchors (default 50)")
    init.add_argument("--terms", type=int, help="omp: anchors per token (default 8)")
    init.add_argument("--mean-weight", type=float, help="share of the mean init blended in (default 0.5)")
    init.add_argument("--head-norm", choices=["cap", "none"], help="cap new rows at their mean row's norm (default)")
    init.add_argument(
        "--scale",
        help="factor for the new rows, or 'fit' (on the corpus; default for focus / omp / regression; 1 for mean)",
    )
    init.add_argument("--scale-chars", type=int, help="scale fit: corpus characters per trial (default 10000)")
    init.add_argument("--cache-dir", help="cached auxiliary spaces (default: the user cache folder)")
    init.add_argument("--out", required=True)
    init.set_defaults(handler=embed_init)

    lep = commands.add_parser("propagate", help="Learned Embedding Propagation into an instruct model")
    lep.add_argument("--base", required=True, help="original base model B (old vocabulary)")
    lep.add_argument("--adapted-base", required=True, help="adapted base model B' (new vocabulary)")
    lep.add_argument("--instruct", required=True, help="instruct model I (old vocabulary)")
    lep.add_argument("--variant", required=True, choices=VARIANTS)
    lep.add_argument("--lora-adapter", help="LoRA adapter learned on B during CPT (lora+head): merged into I")
    lep.add_argument("--lora-scale", type=float, default=1.0, help="scale of the merged LoRA delta")
    lep.add_argument("--out", required=True)
    lep.set_defaults(handler=propagate)


def evaluate_model(args: argparse.Namespace) -> None:
    """Score any model exactly as jobs score theirs: one JSON line per score row."""
    config = EvaluationConfig(
        tasks=args.tasks.split(","),
        limit=args.limit,
        heldout_chars=args.heldout_chars,
        batch_size=args.batch_size,
        mera_dir=args.mera_dir,
    )
    device = compute_device()
    model, tokenizer = load_model(args.model, device=device, dtype=inference_dtype(device))
    data = EvalData(
        target_texts=tuple(require_documents(args.heldout, limit_chars=config.heldout_chars)),
        source_texts=tuple(require_documents(args.source_heldout, limit_chars=config.heldout_chars))
        if args.source_heldout
        else (),
        mera_dir=config.mera_dir,
    )
    for row in evaluate(model, tokenizer, config.tasks, data, limit=config.limit, batch_size=config.batch_size):
        _emit({"model": args.model, **row.to_dict()})
