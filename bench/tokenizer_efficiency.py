"""The LEP paper's Table 2 (symbols per token) on the real Mistral-7B v1 and LLaMa-3 tokenizers.

For each source tokenizer: the original, then bpe / unigram / extended / optimized trained on a Russian corpus at
the paper's sizes, measured on held-out Russian (taiga) and English (EWT) text. Each build runs in a fresh process
so its wall time and peak memory (max RSS) are its own. Prints a table, then one JSON line per row with the ratio
against the original tokenizer measured in the same run.

    python bench/tokenizer_efficiency.py [--train-chars N] [--only mistral-7b-v1] [--methods extended] [--out F]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import time
from dataclasses import dataclass
from typing import Any

SHARED = "../shared/data"
# The paper's sizes (Table 2 / §2.2); the paper's merge priority is new-first.
ROWS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "mistral-7b-v1": [
        ("bpe", {"vocab_size": 32_000}),
        ("unigram", {"vocab_size": 32_000}),
        ("extended", {"new_tokens": 32_000, "priority": "new-first"}),
        ("extended", {"new_tokens": 32_000, "priority": "old-first"}),
        ("extended", {"new_tokens": 32_000, "priority": "target-first"}),
    ],
    "llama-3": [
        ("bpe", {"vocab_size": 128_000}),
        ("unigram", {"vocab_size": 128_000}),
        ("extended", {"new_tokens": 64_000, "priority": "new-first"}),
        ("extended", {"new_tokens": 64_000, "priority": "old-first"}),
        ("extended", {"new_tokens": 64_000, "priority": "target-first"}),
        ("optimized", {"new_tokens": 64_000, "keep_tokens": 64_000, "priority": "new-first"}),
        ("optimized", {"new_tokens": 64_000, "keep_tokens": 64_000, "keep_by": "first-ids", "priority": "new-first"}),
    ],
}
# What the paper's authors' own tokenizers (trained on a much larger Russian web corpus) give on taiga_devtest.
PUBLISHED = {
    ("mistral-7b-v1", "bpe"): 3.51,
    ("mistral-7b-v1", "unigram"): 3.40,
    ("llama-3", "bpe"): 4.07,
    ("llama-3", "unigram"): 3.99,
}


@dataclass
class Paths:
    corpus: str
    heldout_ru: str
    heldout_en: str
    source_corpus: str


def _measure(
    source: str,
    method: str | None,
    options: dict[str, Any],
    paths: Paths,
    train_chars: int | None,
    queue: multiprocessing.Queue,
) -> None:
    from langadapt.core.adaptation.corpus import iter_documents
    from langadapt.core.adaptation.sources import load_tokenizer
    from langadapt.core.adaptation.vocab import VocabConfig, build_vocab
    from langadapt.core.adaptation.vocab.common import chars_per_token

    tokenizer = load_tokenizer(source)
    started = time.perf_counter()
    report: dict[str, Any] = {}
    if method is not None:
        if method == "optimized":
            options = {**options, "source_corpus": paths.source_corpus}
        config = VocabConfig(method=method, train_chars=train_chars, **options)
        result = build_vocab(tokenizer, paths.corpus, config, heldout=paths.heldout_ru)
        tokenizer, report = result.tokenizer, result.report.to_dict()
    seconds = time.perf_counter() - started
    ru = list(iter_documents(paths.heldout_ru))
    en = list(iter_documents(paths.heldout_en))
    queue.put(
        {
            "vocab_size": len(tokenizer),
            "new_tokens": report.get("new_tokens", 0),
            "removed_tokens": report.get("removed_tokens", 0),
            "ru_chars_per_token": round(chars_per_token(tokenizer, ru), 4),
            "en_chars_per_token": round(chars_per_token(tokenizer, en), 4),
            "build_s": round(seconds, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        }
    )


def measure(
    source: str, method: str | None, options: dict[str, Any], paths: Paths, train_chars: int | None
) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_measure, args=(source, method, options, paths, train_chars, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=SHARED)
    parser.add_argument("--train-chars", type=int, default=None, help="cap on training characters (default: all)")
    parser.add_argument("--only", choices=sorted(ROWS), action="append")
    parser.add_argument("--methods", help="comma-separated methods to build (default: all), e.g. extended")
    parser.add_argument("--out", help="also append the JSON lines to this file")
    args = parser.parse_args()
    paths = Paths(
        corpus=f"{args.data}/ru/ruslit.jsonl.xz",
        heldout_ru=f"{args.data}/ru/taiga_devtest.jsonl",
        heldout_en=f"{args.data}/en/ewt.jsonl.xz",
        source_corpus=f"{args.data}/en/ewt.jsonl.xz",
    )
    header = (
        f"{'source':<15}{'method':<28}{'vocab':>8}{'new':>8}{'ru c/t':>8}{'en c/t':>8}{'ratio':>7}{'s':>8}{'MB':>7}"
    )
    print(header, flush=True)
    for source in args.only or ROWS:
        original = measure(source, None, {}, paths, None)
        wanted = ROWS[source] if not args.methods else [r for r in ROWS[source] if r[0] in args.methods.split(",")]
        for method, options in [(None, {}), *wanted]:
            row = original if method is None else measure(source, method, options, paths, args.train_chars)
            label = (
                "original"
                if method is None
                else method + "".join(f" {k}={v}" for k, v in options.items() if k in ("priority", "keep_by"))
            )
            ratio = row["ru_chars_per_token"] / original["ru_chars_per_token"]
            record = {
                "bench": "tokenizer_efficiency",
                "source": source,
                "method": label,
                **row,
                "ru_ratio_vs_original": round(ratio, 3),
                "en_ratio_vs_original": round(row["en_chars_per_token"] / original["en_chars_per_token"], 3),
                "paper_published_ru": PUBLISHED.get((source, method or "")),
            }
            print(
                f"{source:<15}{label:<28}{row['vocab_size']:>8}{row['new_tokens']:>8}"
                f"{row['ru_chars_per_token']:>8.3f}{row['en_chars_per_token']:>8.3f}{ratio:>7.2f}"
                f"{row['build_s']:>8.1f}{row['peak_rss_mb']:>7}",
                flush=True,
            )
            print(json.dumps(record), flush=True)
            if args.out:
                with open(args.out, "a") as handle:
                    handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
