"""Training throughput (tokens/s) of our CPT loop (`run_cpt`) against the Hugging Face `Trainer`, same process.

Both train the same random-weight Llama (`135m`: SmolLM2-135M's shape, tied; `1.1b`: TinyLlama-1.1B's shape,
untied) with the same trainable set (`full` or `embeddings+head`, frozen by `apply_trainable` for both), the same
packed blocks of the corpus, micro batch, gradient accumulation and sequence length. On a GPU both use bf16
autocast over fp32 weights, TF32 and fused AdamW (`Trainer`: `bf16=True`, `optim="adamw_torch_fused"`, `tf32=True`);
the `Trainer` does no evaluation, saving or logging (`report_to=[]`). Our loop runs as jobs run it: the chunked
LM-head loss (`lm_loss.py`), frozen weights in bf16, `torch.compile` on CUDA (`--no-compile` turns it off; its
first step, compilation included, is reported apart); the `Trainer` baseline stays as configured above unless
`--trainer-compile`. Both use the same micro-batches (our memory-fitted micro-batch is off here). Steady state: the
first `--warmup` optimizer steps are not timed, the next `--steps` are (GPU synchronised at both ends). One JSON
line per (model, mode) with tokens/s, peak GPU memory of each, our MFU (`flops_per_token`) and the ratio.
`--models 8b --modes embeddings+head,lora+head --no-trainer --micro-batch 1`: the LLaMa-3-8B shape with 64 K new
rows on one GPU.

The text only feeds token ids (a byte-level BPE trained here on the corpus; the models keep their real vocabulary
sizes, so the LM head and loss cost what they cost); without the corpus file a synthetic one is used.

    python bench/cpt_throughput.py [--models 135m,1.1b] [--modes full,embeddings+head] [--seq-len 2048]
        [--micro-batch N] [--grad-accum 4] [--warmup 3] [--steps 9] [--no-compile] [--trainer-compile] [--no-trainer]
    python bench/cpt_throughput.py --tiny      # CPU smoke test: a small config, seq 128, a few steps
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import time
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from langadapt.core.adaptation.config import CPTConfig
from langadapt.core.adaptation.corpus import iter_documents
from langadapt.core.adaptation.train.common import apply_trainable
from langadapt.core.adaptation.train.cpt import CPTResult, run_cpt
from langadapt.core.adaptation.train.packing import PackedBlocks

CORPUS = "../shared/data/ru/ruslit.jsonl.xz"

SHAPES: dict[str, dict[str, Any]] = {
    "135m": dict(
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
        rope_theta=100_000.0,
    ),
    "1.1b": dict(
        hidden_size=2048,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        intermediate_size=5632,
        vocab_size=32000,
        tie_word_embeddings=False,
        max_position_embeddings=2048,
        rope_theta=10_000.0,
    ),
    "8b": dict(  # LLaMa-3-8B with 64 K new rows: random weights, built in bf16 (no Trainer baseline: --no-trainer)
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128_256 + 64_000,
        tie_word_embeddings=False,
        max_position_embeddings=8192,
        rope_theta=500_000.0,
    ),
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=0,  # the tokenizer's size
        tie_word_embeddings=False,
        max_position_embeddings=512,
    ),
}
MICRO_BATCH = {"135m": 8, "1.1b": 4, "8b": 1, "tiny": 2}
H200_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100 / H200 SXM


def train_tokenizer(corpus: str, chars: int, vocab_size: int) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(iter_documents(corpus, limit_chars=chars), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def synthetic_corpus(path: str, chars: int) -> None:
    rng = random.Random(0)
    words = [
        "".join(rng.choice("абвгдеёжзийклмнопрстуфхцчшщыьэюя") for _ in range(rng.randint(1, 9))) for _ in range(5000)
    ]
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < chars:
            line = " ".join(rng.choice(words) for _ in range(rng.randint(20, 400))) + "\n"
            f.write(line)
            written += len(line)


def build_model(shape: str, vocab_size: int, device: torch.device) -> LlamaForCausalLM:
    values = dict(SHAPES[shape])
    values["vocab_size"] = values["vocab_size"] or vocab_size
    config = LlamaConfig(**values, attn_implementation="sdpa")
    torch.manual_seed(0)
    dtype = torch.bfloat16 if shape == "8b" else torch.float32  # 8 B in float32 would not leave room to train
    with device:
        return LlamaForCausalLM(config).to(dtype)


def flops_per_token(model: LlamaForCausalLM, trainable: str, seq_len: int) -> float:
    """Model FLOPs of one trained token: forward 2N + causal attention, backward the activation gradients (as much
    again) plus 2 per trained matrix weight (N: the weights of every matmul, the LM head included)."""
    cfg = model.config
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    # Weight gradients: every matmul for full; the head for embeddings+head and lora+head (the embedding lookup is no
    # matmul, LoRA's weights are few); none for embeddings.
    trained = {"full": matmul, "embeddings": 0}.get(trainable, model.lm_head.weight.numel())
    attention = 2 * cfg.num_hidden_layers * seq_len * cfg.hidden_size  # QK^T and AV, halved by the causal mask
    return 2 * (2 * matmul + 2 * attention) + 2 * trained


def _peak_reset(cuda: bool) -> None:
    if cuda:
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(cuda: bool) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None


def measure_ours(
    model: LlamaForCausalLM, tokenizer, corpus: str, config: CPTConfig, warmup: int
) -> tuple[float, CPTResult]:
    """Steady-state tokens/s from the progress reports (each comes right after a host sync of the loss)."""
    marks: dict[int, tuple[float, int]] = {}

    def progress(report: dict[str, Any]) -> None:
        marks[report["step"]] = (time.perf_counter(), report["tokens_seen"])

    with tempfile.TemporaryDirectory(prefix="cpt-bench-") as out:
        result = run_cpt(model, tokenizer, corpus, config, os.path.join(out, "run"), progress=progress)
    (t0, n0), (t1, n1) = marks[warmup], marks[config.steps]
    return (n1 - n0) / (t1 - t0), result


class _StepTimer(TrainerCallback):
    def __init__(self, steps: tuple[int, int], cuda: bool) -> None:
        self.steps, self.cuda, self.times = steps, cuda, {}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            if self.cuda:
                torch.cuda.synchronize()
            self.times[state.global_step] = time.perf_counter()


class _Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks: list[torch.Tensor]) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def measure_trainer(
    model: LlamaForCausalLM,
    tokenizer,
    corpus: str,
    config: CPTConfig,
    warmup: int,
    cuda: bool,
    compile_: bool,
) -> float:
    total = config.steps
    needed = total * config.batch_size * config.grad_accum
    blocks = []
    for block, _ in PackedBlocks(tokenizer, corpus, config.seq_len):  # the blocks our loop trains on
        blocks.append(torch.from_numpy(block))
        if len(blocks) == needed:
            break
    apply_trainable(model, config.trainable, config)
    timer = _StepTimer((warmup, total), cuda)
    with tempfile.TemporaryDirectory(prefix="cpt-bench-trainer-") as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=total,
            per_device_train_batch_size=config.batch_size,
            gradient_accumulation_steps=config.grad_accum,
            learning_rate=config.lr,
            lr_scheduler_type="cosine",
            warmup_steps=config.warmup_steps,
            weight_decay=config.weight_decay,
            adam_beta1=config.betas[0],
            adam_beta2=config.betas[1],
            max_grad_norm=config.max_grad_norm or 0.0,
            bf16=cuda,
            tf32=cuda or None,
            optim="adamw_torch_fused" if cuda else "adamw_torch",
            report_to=[],
            save_strategy="no",
            eval_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            dataloader_pin_memory=cuda,
            use_cpu=not cuda,
            seed=config.seed,
            torch_compile=compile_,
        )
        trainer = Trainer(model=model, args=args, train_dataset=_Blocks(blocks), callbacks=[timer])
        trainer.remove_callback(PrinterCallback)  # stdout is for the JSON lines
        trainer.train()
    tokens = (total - warmup) * config.tokens_per_step()
    return tokens / (timer.times[total] - timer.times[warmup])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: small config, seq 128, few steps")
    parser.add_argument("--models", default="135m,1.1b")
    parser.add_argument("--modes", default="full,embeddings+head")
    parser.add_argument("--corpus", default=CORPUS)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=None, help="default: 8 for 135m, 4 for 1.1b")
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps")
    parser.add_argument("--steps", type=int, default=9, help="timed optimizer steps (a multiple of --warmup)")
    parser.add_argument("--no-compile", action="store_true", help="our loop without torch.compile (default on CUDA)")
    parser.add_argument("--trainer-compile", action="store_true", help="torch_compile=True for the Trainer too")
    parser.add_argument("--no-trainer", action="store_true", help="our loop only (the 8b shape: no baseline fits)")
    parser.add_argument("--peak-tflops", type=float, default=H200_BF16_TFLOPS, help="the GPU's bf16 peak, for MFU")
    args = parser.parse_args()
    if args.tiny:
        args.models, args.seq_len, args.grad_accum, args.warmup, args.steps = "tiny", 128, 2, 2, 8
        torch.set_num_threads(1)  # tiny matrices: threads only add OpenMP barrier noise on a shared CPU
    steps = -(-args.steps // args.warmup) * args.warmup  # reports come every `warmup` steps
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"

    with tempfile.TemporaryDirectory(prefix="cpt-bench-data-") as data:
        corpus = args.corpus
        if not os.path.isfile(corpus):
            corpus = os.path.join(data, "synthetic.txt")
            print(f"{args.corpus} not found: using a synthetic corpus", file=sys.stderr)
            synthetic_corpus(corpus, 3_000_000)
        tokenizer = train_tokenizer(corpus, 300_000 if args.tiny else 2_000_000, 512 if args.tiny else 4096)
        for shape in args.models.split(","):
            for mode in args.modes.split(","):
                config = CPTConfig(
                    trainable=mode,
                    steps=args.warmup + steps,
                    seq_len=args.seq_len,
                    batch_size=args.micro_batch or MICRO_BATCH[shape],
                    grad_accum=args.grad_accum,
                    warmup_steps=args.warmup,
                    log_every=args.warmup,
                    checkpoint_every=10**9,
                    compile=False if args.no_compile else None,
                    auto_micro_batch=False,  # the same micro-batches as the Trainer
                )
                _peak_reset(cuda)
                model = build_model(shape, len(tokenizer), device)
                flops = flops_per_token(model, mode, config.seq_len)
                ours, result = measure_ours(model, tokenizer, corpus, config, args.warmup)
                ours_peak = _peak_gib(cuda)
                del model
                _free()
                trainer = trainer_peak = None
                if not args.no_trainer:
                    _peak_reset(cuda)
                    model = build_model(shape, len(tokenizer), device)
                    trainer = measure_trainer(model, tokenizer, corpus, config, args.warmup, cuda, args.trainer_compile)
                    trainer_peak = _peak_gib(cuda)
                    del model
                    _free()
                row = {
                    "bench": "cpt_throughput",
                    "model": shape,
                    "mode": mode,
                    "device": torch.cuda.get_device_name() if cuda else "cpu",
                    "precision": "bf16-autocast" if cuda else "fp32",
                    "seq_len": config.seq_len,
                    "micro_batch": config.batch_size,
                    "grad_accum": config.grad_accum,
                    "timed_steps": steps,
                    "ours_compiled": result.compiled,
                    "ours_first_step_s": round(result.first_step_s or 0.0, 2),  # compilation included
                    "trainer_compile": args.trainer_compile,
                    "ours_tokens_per_s": round(ours, 1),
                    "ours_mfu": round(ours * flops / (args.peak_tflops * 1e12), 3) if cuda else None,
                    "ours_peak_gib": ours_peak,
                    "trainer_tokens_per_s": None if trainer is None else round(trainer, 1),
                    "trainer_peak_gib": trainer_peak,
                    "ratio": None if trainer is None else round(ours / trainer, 3),
                }
                print(json.dumps(row), flush=True)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
