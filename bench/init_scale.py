"""Does the init stage stay minutes at LLaMa-3 scale on the CPU? Time and peak memory of each init method.

The real LLaMa-3 tokenizer (128,256 tokens) extended with `--new-tokens` target tokens trained on Russian literature,
random old rows of width `--dim` (no model is loaded: the init only does row arithmetic), the auxiliary space
trained on `--aux-chars` characters (timed once, then cached: the per-method times exclude it). One JSON line per
method with its seconds and its peak resident memory (the process's peak from just before the method: the old rows,
tokenizers and auxiliary space included; Linux); the ratio is against the first method run in the same process.

    python bench/init_scale.py [--new-tokens 64000] [--dim 4096] [--vocab-chars 20000000] [--aux-chars 20000000]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time

import torch

from langadapt.core.adaptation.config import AuxiliaryConfig, InitConfig, VocabConfig
from langadapt.core.adaptation.init.auxiliary import auxiliary_space
from langadapt.core.adaptation.mapping import VocabMapping
from langadapt.core.adaptation.sources import load_tokenizer
from langadapt.core.adaptation.surgery import new_vocab_rows
from langadapt.core.adaptation.tokens import Vocabulary
from langadapt.core.adaptation.vocab import build_vocab

DATA = "../shared/data"


def peak_gib() -> float:
    """The process's peak resident memory since the start or the last `reset_peak()`."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 2**20, 2)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # no /proc: the lifetime peak


def reset_peak() -> None:
    """Linux: start the peak over at the current resident size (clear_refs 5), so each method shows its own."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--tokenizer", default="llama-3")
    parser.add_argument("--new-tokens", type=int, default=64_000)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--vocab-chars", type=int, default=20_000_000)
    parser.add_argument("--aux-chars", type=int, default=20_000_000)
    parser.add_argument("--methods", default="mean,focus,omp,regression")
    parser.add_argument(
        "--cache-dir",
        help="auxiliary spaces (default: a temporary folder); run one method per process to see each "
        "method's own peak memory, the space trained by the first",
    )
    args = parser.parse_args()
    corpus = f"{args.data}/ru/ruslit.jsonl.xz"
    old_tokenizer = load_tokenizer(args.tokenizer)
    started = time.perf_counter()
    vocab_config = VocabConfig(new_tokens=args.new_tokens, train_chars=args.vocab_chars, priority="new-first")
    new_tokenizer = build_vocab(old_tokenizer, corpus, vocab_config).tokenizer
    old, new = Vocabulary(old_tokenizer), Vocabulary(new_tokenizer)
    mapping = VocabMapping.build(old, new)
    print(
        json.dumps(
            {
                "phase": "vocab",
                "old_tokens": old.size,
                "new_vocab": new.size,
                "initialised_tokens": len(mapping.new_ids),
                "seconds": round(time.perf_counter() - started, 1),
            }
        ),
        flush=True,
    )
    aux = AuxiliaryConfig(train_chars=args.aux_chars)
    cache = args.cache_dir or tempfile.mkdtemp(prefix="init-scale-aux-")
    started = time.perf_counter()
    space = auxiliary_space(new_tokenizer, corpus, aux, 0, cache)
    print(
        json.dumps(
            {
                "phase": "auxiliary",
                "tokens": int(space.counts.sum()),
                "seconds": round(time.perf_counter() - started, 1),
                "peak_gib": peak_gib(),
            }
        ),
        flush=True,
    )
    rows = torch.randn(old.size, args.dim, generator=torch.Generator().manual_seed(0)).mul_(0.02)
    baseline = None
    for method in args.methods.split(","):
        config = InitConfig(method=method, cache_dir=cache, **({"auxiliary": aux} if method != "mean" else {}))
        reset_peak()
        started = time.perf_counter()
        result = new_vocab_rows(rows, mapping, old, new, config, 0, space if method != "mean" else None)
        seconds = time.perf_counter() - started
        baseline = baseline or seconds
        finite = bool(torch.isfinite(result).all())
        del result
        print(
            json.dumps(
                {
                    "bench": "init_scale",
                    "method": method,
                    "old_tokens": old.size,
                    "new_tokens": len(mapping.new_ids),
                    "dim": args.dim,
                    "seconds": round(seconds, 1),
                    "ratio_vs_mean": round(seconds / baseline, 2),
                    "peak_gib": peak_gib(),
                    "finite": finite,
                    "threads": torch.get_num_threads(),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
