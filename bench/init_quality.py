"""How well does each init method start the new tokens? SmolLM2-135M-Instruct after `extended` + every init.

Held-out Russian (taiga) and English (EWT) bits per character of the original model and of the surgered models,
with no training at all, and the share of the predicted probability that goes to new tokens on English text (a new
token should not take probability in source-language contexts). One JSON line per model with the ratio against the
original measured in the same process, and per method the share of mean's Russian excess over the original it
removes (`ru_excess_cut_vs_mean_step0`: 1 - (method - original) / (mean - original)). With `--cpt-steps N` every model
then gets the same short CPT (N steps of `--cpt-batch` x `--cpt-seq-len` tokens of the corpus, new rows trained,
as a job trains them after `extended`) and is scored again, with its cut of mean's excess after the same CPT
(`ru_excess_cut_vs_mean_after_cpt`).

    python bench/init_quality.py [--new-tokens 16000] [--train-chars 10000000] [--aux-chars 20000000]
        [--eval-chars 30000] [--priorities new-first,target-first] [--cpt-steps 0]
        [--inits '["mean", {"method": "mean", "scale": "fit"}, "random", "focus", "omp", "regression"]']
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from langadapt.core.adaptation.config import AUXILIARY_METHODS, AuxiliaryConfig, CPTConfig, InitConfig, VocabConfig
from langadapt.core.adaptation.corpus import iter_documents
from langadapt.core.adaptation.evaluate.bits_per_char import bits_per_char
from langadapt.core.adaptation.sources import load_model
from langadapt.core.adaptation.surgery import change_vocabulary
from langadapt.core.adaptation.train.cpt import run_cpt
from langadapt.core.adaptation.vocab import build_vocab
from langadapt.core.adaptation.vocab.common import chars_per_token

DATA = "../shared/data"
SHOWN_AS_IS = ("method", "auxiliary", "cache_dir")


@torch.inference_mode()
def new_token_share(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], new_ids: list[int], window: int = 512
) -> float:
    """Mean over predicted positions of the probability the model gives to the tokens in `new_ids`."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    fresh = torch.tensor(new_ids, dtype=torch.long)
    total, positions = 0.0, 0
    for text in texts:
        ids = [start, *tokenizer.encode(text, add_special_tokens=False)]
        for first in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[first : first + window]])
            probs = model(input_ids=chunk).logits[0].float().softmax(dim=-1)
            total += float(probs[:, fresh].sum())
            positions += chunk.shape[1]
    return total / positions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--new-tokens", type=int, default=16_000)
    parser.add_argument("--train-chars", type=int, default=10_000_000)
    parser.add_argument("--aux-chars", type=int, default=20_000_000, help="corpus characters of the auxiliary space")
    parser.add_argument("--eval-chars", type=int, default=30_000)
    parser.add_argument("--priorities", default="new-first,target-first")
    parser.add_argument(
        "--inits",
        default='["mean", {"method": "mean", "scale": "fit"}, "random", "focus", "omp", "regression"]',
        help="JSON list: method names or InitConfig objects (mean first: the others are compared with it)",
    )
    parser.add_argument("--cpt-steps", type=int, default=0, help="short CPT after step 0 (0: none)")
    parser.add_argument("--cpt-batch", type=int, default=4, help="CPT sequences per step")
    parser.add_argument("--cpt-seq-len", type=int, default=256)
    parser.add_argument("--cpt-lr", type=float, default=5e-4)
    parser.add_argument("--cache-dir", default=None, help="auxiliary spaces (default: a temporary folder)")
    args = parser.parse_args()
    ru = list(iter_documents(f"{args.data}/ru/taiga_devtest.jsonl", limit_chars=args.eval_chars))
    en = list(iter_documents(f"{args.data}/en/ewt.jsonl.xz", limit_chars=args.eval_chars))
    corpus, heldout = f"{args.data}/ru/ruslit.jsonl.xz", f"{args.data}/ru/taiga_devtest.jsonl"
    model, tokenizer = load_model("smollm2-135m-instruct")
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="init-quality-aux-")

    def score(name: str, candidate, candidate_tokenizer, seconds: float, baseline=None, new_ids=None, **extra) -> dict:
        row = {
            "bench": "init_quality",
            "model": "SmolLM2-135M-Instruct",
            "variant": name,
            "vocab_size": len(candidate_tokenizer),
            "seconds": round(seconds, 1),
            **extra,
        }
        for lang, texts in (("ru", ru), ("en", en)):
            result = bits_per_char(candidate, candidate_tokenizer, texts)
            row[f"{lang}_bits_per_char"] = round(result.bits_per_char, 4)
            row[f"{lang}_chars_per_token"] = round(chars_per_token(candidate_tokenizer, texts), 3)
            if baseline:
                row[f"{lang}_ratio_vs_original"] = round(result.bits_per_char / baseline[f"{lang}_bits_per_char"], 3)
        if new_ids:
            row["en_new_token_probability"] = round(new_token_share(candidate, candidate_tokenizer, en, new_ids), 4)
        print(json.dumps(row), flush=True)
        return row

    original = score("original", model, tokenizer, 0.0)
    mean_excess: dict[tuple[str, str], float] = {}  # (priority, stage) -> mean's Russian excess over the original

    def cut_vs_mean(row: dict, priority: str, stage: str) -> None:
        """The share of mean's Russian excess over the original that this row removes, at the same stage."""
        excess = row["ru_bits_per_char"] - original["ru_bits_per_char"]
        if (priority, stage) not in mean_excess:
            mean_excess[priority, stage] = excess
        else:
            cut = round(1 - excess / mean_excess[priority, stage], 3)
            print(json.dumps({"variant": row["variant"], f"ru_excess_cut_vs_mean_{stage}": cut}), flush=True)

    for priority in args.priorities.split(","):
        started = time.perf_counter()
        config = VocabConfig(
            method="extended",
            new_tokens=args.new_tokens,
            train_chars=args.train_chars,
            priority=priority,  # type: ignore[arg-type]
        )
        new_tokenizer = build_vocab(tokenizer, corpus, config, heldout=heldout).tokenizer
        vocab_seconds = time.perf_counter() - started
        for init in json.loads(args.inits):
            fields = {"method": init} if isinstance(init, str) else init
            if fields["method"] in AUXILIARY_METHODS:
                fields = {"auxiliary": AuxiliaryConfig(train_chars=args.aux_chars), "cache_dir": cache_dir, **fields}
            init_config = InitConfig(**fields)
            name = "+".join([init_config.method, *(f"{k}={v}" for k, v in fields.items() if k not in SHOWN_AS_IS)])
            candidate = copy.deepcopy(model)
            started = time.perf_counter()
            change = change_vocabulary(candidate, tokenizer, new_tokenizer, init_config, corpus=corpus)
            seconds = time.perf_counter() - started
            new_ids = change.mapping.new_ids
            variant = f"extended({priority})+{name}"
            row = score(variant, candidate, new_tokenizer, seconds, original, new_ids, scale=change.scale)
            cut_vs_mean(row, priority, "step0")
            if args.cpt_steps:
                cpt = CPTConfig(
                    steps=args.cpt_steps,
                    seq_len=args.cpt_seq_len,
                    batch_size=args.cpt_batch,
                    grad_accum=1,
                    lr=args.cpt_lr,
                    warmup_steps=max(1, args.cpt_steps // 10),
                    checkpoint_every=args.cpt_steps,
                    train_rows="new",
                )
                with tempfile.TemporaryDirectory(prefix="init-quality-cpt-") as out:
                    result = run_cpt(candidate, new_tokenizer, corpus, cpt, os.path.join(out, "run"), new_rows=new_ids)
                trained = f"{variant}+cpt{args.cpt_steps}x{args.cpt_batch}x{args.cpt_seq_len}"
                row = score(trained, candidate, new_tokenizer, result.seconds, original, new_ids)
                cut_vs_mean(row, priority, "after_cpt")
        print(json.dumps({"priority": priority, "vocab_seconds": round(vocab_seconds, 1)}), flush=True)


if __name__ == "__main__":
    main()
