"""Does mean initialisation keep a real model intact? SmolLM2-135M-Instruct after `extended` + `mean` / `random`.

Held-out Russian (taiga) and English (EWT) bits per character of the original model and of the surgered models,
with no training at all: mean init should stay close to the original, random init should not. One JSON line per
model with the ratio against the original measured in the same process.

    python bench/init_quality.py [--new-tokens 16000] [--train-chars 10000000] [--eval-chars 30000]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

from langadapt.core.adaptation.config import InitConfig, VocabConfig
from langadapt.core.adaptation.corpus import iter_documents
from langadapt.core.adaptation.evaluate.bits_per_char import bits_per_char
from langadapt.core.adaptation.sources import load_model
from langadapt.core.adaptation.surgery import change_vocabulary
from langadapt.core.adaptation.vocab import build_vocab
from langadapt.core.adaptation.vocab.common import chars_per_token

DATA = "../shared/data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--new-tokens", type=int, default=16_000)
    parser.add_argument("--train-chars", type=int, default=10_000_000)
    parser.add_argument("--eval-chars", type=int, default=30_000)
    args = parser.parse_args()
    ru = list(iter_documents(f"{args.data}/ru/taiga_devtest.jsonl", limit_chars=args.eval_chars))
    en = list(iter_documents(f"{args.data}/en/ewt.jsonl.xz", limit_chars=args.eval_chars))
    model, tokenizer = load_model("smollm2-135m-instruct")

    def score(name: str, candidate, candidate_tokenizer, seconds: float, baseline=None) -> dict:
        row = {
            "bench": "init_quality",
            "model": "SmolLM2-135M-Instruct",
            "variant": name,
            "vocab_size": len(candidate_tokenizer),
            "seconds": round(seconds, 1),
        }
        for lang, texts in (("ru", ru), ("en", en)):
            result = bits_per_char(candidate, candidate_tokenizer, texts)
            row[f"{lang}_bits_per_char"] = round(result.bits_per_char, 4)
            row[f"{lang}_chars_per_token"] = round(chars_per_token(candidate_tokenizer, texts), 3)
            if baseline:
                row[f"{lang}_ratio_vs_original"] = round(result.bits_per_char / baseline[f"{lang}_bits_per_char"], 3)
        print(json.dumps(row), flush=True)
        return row

    original = score("original", model, tokenizer, 0.0)
    for priority in ("new-first", "old-first"):
        started = time.perf_counter()
        config = VocabConfig(
            method="extended",
            new_tokens=args.new_tokens,
            train_chars=args.train_chars,
            priority=priority,  # type: ignore[arg-type]
        )
        corpus, heldout = f"{args.data}/ru/ruslit.jsonl.xz", f"{args.data}/ru/taiga_devtest.jsonl"
        new_tokenizer = build_vocab(tokenizer, corpus, config, heldout=heldout).tokenizer
        vocab_seconds = time.perf_counter() - started
        for init in ("mean", "random"):
            candidate = copy.deepcopy(model)
            started = time.perf_counter()
            change_vocabulary(candidate, tokenizer, new_tokenizer, InitConfig(method=init))  # type: ignore[arg-type]
            seconds = vocab_seconds + time.perf_counter() - started
            score(f"extended({priority})+{init}", candidate, new_tokenizer, seconds, original)


if __name__ == "__main__":
    main()
