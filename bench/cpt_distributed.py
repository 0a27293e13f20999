"""CPT throughput on N processes (`launch_cpt`: torchrun, DDP or FSDP2) against one process, at the same global batch.

A random-weight Llama of a `cpt_throughput.SHAPES` shape is saved to a temporary folder, with a byte-level BPE
trained on the corpus; then for each trainable set the one-process run (in this process, the baseline) and the
N-process run of each strategy train the same steps on the same sequences. Reported per (mode, strategy):
`tokens_per_s` of the training loop (`CPTResult.tokens_per_s`: start-up, loading and saving excluded) and the wall
time of the whole call (torchrun, N interpreters, loading, export included), and their ratios N-process / one.
On the CPU the processes use gloo and one thread each (`OMP_NUM_THREADS=1`); on GPUs one GPU each.

    python bench/cpt_distributed.py [--nproc 2] [--strategies ddp,fsdp2] [--modes full,embeddings+head]
        [--shape tiny] [--seq-len 128] [--micro-batch 2] [--global-batch 8] [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
from cpt_throughput import CORPUS, build_model, synthetic_corpus, train_tokenizer

from langadapt.core.adaptation.config import CPTConfig
from langadapt.core.adaptation.train.launch import CPTLaunch, launch_cpt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--strategies", default="ddp,fsdp2")
    parser.add_argument("--modes", default="full,embeddings+head")
    parser.add_argument("--shape", default="tiny")
    parser.add_argument("--corpus", default=CORPUS)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    cuda = torch.cuda.is_available()

    with tempfile.TemporaryDirectory(prefix="cpt-dist-bench-") as work:
        corpus = args.corpus
        if not os.path.isfile(corpus):
            corpus = os.path.join(work, "synthetic.txt")
            print(f"{args.corpus} not found: using a synthetic corpus", file=sys.stderr)
            synthetic_corpus(corpus, 3_000_000)
        tokenizer = train_tokenizer(corpus, 300_000, 512)
        model_dir = os.path.join(work, "model")
        build_model(args.shape, len(tokenizer), torch.device("cpu")).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        for mode in args.modes.split(","):
            config = CPTConfig(
                trainable=mode,
                steps=args.steps,
                seq_len=args.seq_len,
                batch_size=args.micro_batch,
                global_batch=args.global_batch,
                warmup_steps=1,
                log_every=args.steps,
                checkpoint_every=10**9,
                auto_micro_batch=False,  # the same micro-batches on 1 and N processes
            )

            def run(nproc: int, strategy: str, name: str) -> tuple[float, float]:
                request = CPTLaunch(
                    model=model_dir,
                    tokenizer=model_dir,
                    corpus=corpus,
                    config=config,  # noqa: B023  (called within this iteration)
                    out_dir=os.path.join(work, f"{mode}-{name}"),  # noqa: B023
                    strategy=strategy,
                )
                started = time.perf_counter()
                result = launch_cpt(request, nproc=nproc)
                return result.tokens_per_s, time.perf_counter() - started

            one, one_wall = run(1, "ddp", "one")
            for strategy in args.strategies.split(","):
                many, many_wall = run(args.nproc, strategy, strategy)
                row = {
                    "bench": "cpt_distributed",
                    "model": args.shape,
                    "mode": mode,
                    "strategy": strategy,
                    "nproc": args.nproc,
                    "device": torch.cuda.get_device_name() if cuda else "cpu (gloo, 1 thread per process)",
                    "seq_len": args.seq_len,
                    "micro_batch": args.micro_batch,
                    "global_batch": args.global_batch,
                    "steps": args.steps,
                    "one_tokens_per_s": round(one, 1),
                    "many_tokens_per_s": round(many, 1),
                    "ratio": round(many / one, 3),
                    "one_wall_s": round(one_wall, 1),
                    "many_wall_s": round(many_wall, 1),
                    "wall_ratio": round(many_wall / one_wall, 3),
                }
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
