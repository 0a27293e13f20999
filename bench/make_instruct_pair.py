"""Make a STAND-IN base/instruct pair for LEP experiments: B = SmolLM2-135M-Instruct, I = B after a short SFT.

LEP propagates embeddings learned on a base model B into its instruct model I of the same family. No such pair
installs offline, so this script derives one: B is the installed SmolLM2-135M-Instruct (used as the base) and I is
B fine-tuned in full (`run_sft`, `trainable="full"`, a small learning rate) on chat examples built from the shared
corpora, Russian (ruslit) and English (EWT), whose answers come from the texts themselves:

- copy:           "repeat this text exactly" -> the text;
- continue:       the first half of a passage -> its second half;
- first sentence: "quote the first sentence of this text" -> that sentence.

This pair is a stand-in, not a real base/instruct pair: I differs from B by a small fine-tune, not by instruction
tuning, so it only exercises the machinery (propagation, calibration) on real weights and real tokenizers. I is
written with `save_pretrained` to `--out` (with B's tokenizer and chat template). One JSON line: the SFT steps and
losses, the time, and held-out bits per character of I and B (Russian: taiga; English: the end of EWT, never
trained on) with their ratio I / B, which stays close to 1 for a fine-tune this small.

    python bench/make_instruct_pair.py --out /tmp/smol-instruct [--examples 96] [--max-len 192] [--lr 1e-5]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import time
from collections.abc import Callable
from itertools import islice

from langadapt.core.adaptation.calibration import chat_example, copy_examples
from langadapt.core.adaptation.corpus import iter_documents
from langadapt.core.adaptation.evaluate.bits_per_char import bits_per_char
from langadapt.core.adaptation.evaluate.darucopy import copy_documents
from langadapt.core.adaptation.sources import load_model, save_pretrained
from langadapt.core.adaptation.train.sft import SFTConfig, encode_chat, run_sft

DATA = "../shared/data"
SENTENCE_END = re.compile(r"(?<=[.!?…])\s+")
INSTRUCTIONS = {
    "ru": {
        "continue": "Продолжи текст.",
        "first_sentence": "Процитируй первое предложение этого текста.",
    },
    "en": {
        "continue": "Continue the text.",
        "first_sentence": "Quote the first sentence of this text.",
    },
}


def split_half(passage: str) -> tuple[str, str] | None:
    """The passage cut at the space nearest its middle; None when either half would be empty."""
    middle = len(passage) // 2
    cut = passage.rfind(" ", 0, middle + 1)
    cut = cut if cut > 0 else passage.find(" ", middle)
    if cut <= 0:
        return None
    return passage[:cut].strip(), passage[cut:].strip()


def language_examples(
    texts: list[str], language: str, count: int, fits: Callable[[dict], bool], rng: random.Random
) -> list[dict]:
    """`count` examples that `fits` (whole within max_len): a third copy, the rest alternately continue and first
    sentence, from passages of `texts`."""
    short = copy_documents(texts, max_chars=150, min_chars=40)  # copy: the text appears twice in the sequence
    long = copy_documents(texts, max_chars=300, min_chars=80)
    rng.shuffle(short)
    rng.shuffle(long)
    n_copy = count // 3
    candidates = copy_examples(short, language, seed=rng.randrange(1 << 30))
    examples = list(islice(filter(fits, candidates), n_copy))
    instructions = INSTRUCTIONS[language]
    for index, passage in enumerate(long):
        if len(examples) == count:
            break
        if index % 2 == 0 and (halves := split_half(passage)) is not None:
            example = chat_example(f"{instructions['continue']}\n\n{halves[0]}", halves[1])
        else:
            first = SENTENCE_END.split(passage, maxsplit=1)[0]
            example = chat_example(f"{instructions['first_sentence']}\n\n{passage}", first)
        if fits(example):
            examples.append(example)
    return examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="where to write I (a new or empty directory)")
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--examples", type=int, default=96, help="SFT examples, half Russian, half English")
    parser.add_argument("--max-len", type=int, default=192)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--eval-chars", type=int, default=10_000, help="held-out characters per language")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if os.path.isdir(args.out) and os.listdir(args.out):
        parser.error(f"--out is not empty: {args.out}")
    started = time.perf_counter()

    rng = random.Random(args.seed)
    ru_train = list(iter_documents(f"{args.data}/ru/ruslit.jsonl.xz", limit_chars=2_000_000))
    en_all = list(iter_documents(f"{args.data}/en/ewt.jsonl.xz"))
    en_heldout, held = [], 0
    while en_all and held < args.eval_chars:  # the end of EWT, never trained on
        en_heldout.insert(0, en_all.pop())
        held += len(en_heldout[0])
    heldout = {
        "ru": list(iter_documents(f"{args.data}/ru/taiga_devtest.jsonl", limit_chars=args.eval_chars)),
        "en": en_heldout,
    }
    model, tokenizer = load_model("smollm2-135m-instruct")

    def fits(example: dict) -> bool:
        return not encode_chat(tokenizer, example["messages"], args.max_len).truncated

    n_ru = args.examples // 2
    examples = language_examples(ru_train, "ru", n_ru, fits, rng)
    examples += language_examples(en_all, "en", args.examples - n_ru, fits, rng)
    base_bpc = {lang: bits_per_char(model, tokenizer, texts).bits_per_char for lang, texts in heldout.items()}
    config = SFTConfig(
        trainable="full",
        lr=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accum=1,
        max_len=args.max_len,
        warmup_ratio=0.1,
        seed=args.seed,
        log_every=1,
    )
    losses: list[float] = []
    result = run_sft(model, tokenizer, examples, config, progress=lambda report: losses.append(report["loss"]))
    instruct_bpc = {lang: bits_per_char(model, tokenizer, texts).bits_per_char for lang, texts in heldout.items()}
    save_pretrained(model, tokenizer, args.out)

    row = {
        "bench": "make_instruct_pair",
        "stand_in": True,
        "base": "smollm2-135m-instruct",
        "out": args.out,
        "examples": result.examples,
        "steps": result.steps,
        "assistant_tokens": result.tokens,
        "first_loss": round(result.first_loss or 0.0, 4),
        "final_loss": round(result.final_loss or 0.0, 4),
        "losses": [round(loss, 3) for loss in losses],  # per step (assistant tokens only)
        "train_seconds": round(result.seconds, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }
    for lang in heldout:
        row[f"{lang}_bits_per_char_base"] = round(base_bpc[lang], 4)
        row[f"{lang}_bits_per_char_instruct"] = round(instruct_bpc[lang], 4)
        row[f"{lang}_ratio_instruct_vs_base"] = round(instruct_bpc[lang] / base_bpc[lang], 4)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
