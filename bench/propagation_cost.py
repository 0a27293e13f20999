"""Time and peak memory of LEP projections at LLaMa-3 scale on the CPU: 128 K x 4096 random float32 matrices.

E_B and E_I are [128,256 x 4096] (old vocabulary), E_B' is [V_new x 4096]; the mapping gives every new token a
realistic old tokenisation (1 to 4 pieces; a third of the tokens shared). Each variant runs in a fresh process so
its peak RSS is its own; `swap` (one d x d product, no solve) is the baseline of the ratio.

    python bench/propagation_cost.py [--old 128256] [--new 128000] [--dim 4096]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import time


def _run(variant: str, old: int, new: int, dim: int, queue: multiprocessing.Queue) -> None:
    import torch

    from langadapt.core.adaptation.mapping import VocabMapping
    from langadapt.core.adaptation.propagate import propagate_rows

    generator = torch.Generator().manual_seed(0)
    shared = torch.randperm(old, generator=generator)[: new // 3]
    overlap = {new_id: int(old_id) for new_id, old_id in enumerate(shared)}
    lengths = torch.randint(1, 5, (new,), generator=generator)
    pieces = [
        [overlap[i]] if i in overlap else torch.randint(0, old, (int(lengths[i]),), generator=generator).tolist()
        for i in range(new)
    ]
    mapping = VocabMapping(old_size=old, new_size=new, overlap=overlap, pieces=pieces)
    e_b = torch.randn(old, dim, generator=generator)
    e_i = e_b @ (torch.eye(dim) + 0.01 * torch.randn(dim, dim, generator=generator))
    e_adapted = torch.randn(new, dim, generator=generator)
    started = time.perf_counter()
    propagate_rows(variant, e_b, e_adapted, e_i, mapping)  # type: ignore[arg-type]
    seconds = time.perf_counter() - started
    queue.put(
        {
            "seconds": round(seconds, 2),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        }
    )


def measure(variant: str, old: int, new: int, dim: int) -> dict[str, float]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_run, args=(variant, old, new, dim, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", type=int, default=128_256)
    parser.add_argument("--new", type=int, default=128_000)
    parser.add_argument("--dim", type=int, default=4096)
    args = parser.parse_args()
    inputs_gb = (2 * args.old + args.new) * args.dim * 4 / 2**30
    baseline = measure("swap", args.old, args.new, args.dim)
    for variant in ("swap", "overlap", "conversion"):
        row = baseline if variant == "swap" else measure(variant, args.old, args.new, args.dim)
        print(
            json.dumps(
                {
                    "bench": "propagation_cost",
                    "variant": variant,
                    "old_vocab": args.old,
                    "new_vocab": args.new,
                    "dim": args.dim,
                    **row,
                    "inputs_gb": round(inputs_gb, 2),
                    "time_ratio_vs_swap": round(row["seconds"] / max(baseline["seconds"], 1e-9), 2),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
