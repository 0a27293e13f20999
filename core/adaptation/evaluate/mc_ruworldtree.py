"""ruWorldTree (MERA): zero-shot four-option science questions, answered by comparing option log-likelihoods.

Each option is scored as a cloze continuation, as lm-evaluation-harness does for ARC / WorldTree-style sets: the
log-probability of ` <option>` after `Вопрос: <question>\\nОтвет:`, summed over the option's tokens. Comparing
continuations rather than generating a letter works for base and instruct models alike and does not depend on the
model following an answer format, which is what an embedding-level adaptation must not be judged on. The prompt is
plain text (no chat template), so base and instruct models see the same string.

Metrics: `accuracy` picks the option with the highest *summed* log-probability (not length-normalised; ties go to
the earlier option); `accuracy_norm` divides each sum by the option's length in characters first (lm-eval's
`acc_norm` with characters for bytes), which is tokenizer-independent and removes the bias towards short options.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.core.adaptation.evaluate.base import EvalData, ItemProgress, ScoreRow, load_mera
from langadapt.core.adaptation.evaluate.generation import model_device, pad_token_id
from langadapt.core.adaptation.lm_loss import IGNORE_INDEX, CausalLMLoss

DATASET = "ruWorldTree"
LETTERS = "ABCD"


def question_prompt(question: str) -> str:
    return f"Вопрос: {question}\nОтвет:"


def _encode_pair(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context ids and continuation ids. The pair is encoded as one string and split where the context's own
    encoding ends, so the continuation gets the tokens it has in running text; when the two encodings disagree at
    the boundary (a merge across it), the continuation is encoded on its own instead."""
    context_ids = list(tokenizer.encode(context, add_special_tokens=True))
    whole = list(tokenizer.encode(context + continuation, add_special_tokens=True))
    if whole[: len(context_ids)] == context_ids and len(whole) > len(context_ids):
        continuation_ids = whole[len(context_ids) :]
    else:
        continuation_ids = list(tokenizer.encode(continuation, add_special_tokens=False))
    if not context_ids:  # nothing to condition the first continuation token on: start with BOS (or EOS)
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise AdaptationInputError("the tokenizer has neither a BOS nor an EOS token to start a prompt with")
        context_ids = [int(start)]
    return context_ids, continuation_ids


@torch.inference_mode()
def continuation_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 8,
    progress: ItemProgress | None = None,
) -> list[float]:
    """For each (context, continuation): the sum of log p(continuation token | everything before it), in nats.

    Sequences are right-padded (no generation here, so positions need no shifting) and batched by length.
    """
    encoded = [_encode_pair(tokenizer, context, continuation) for context, continuation in pairs]
    order = sorted(range(len(encoded)), key=lambda i: sum(map(len, encoded[i])))
    device = model_device(model)
    pad = pad_token_id(tokenizer)
    scores = [0.0] * len(encoded)
    loss = CausalLMLoss(model)
    for first in range(0, len(order), batch_size):
        batch = order[first : first + batch_size]
        sequences = [encoded[i][0] + encoded[i][1] for i in batch]
        width = max(map(len, sequences))
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (index, sequence) in enumerate(zip(batch, sequences, strict=True)):
            start = len(encoded[index][0])  # the continuation's first position
            input_ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            labels[row, start : len(sequence)] = input_ids[row, start : len(sequence)]
            mask[row, : len(sequence)] = 1
        nll = loss(input_ids.to(device), labels=labels.to(device), attention_mask=mask.to(device))
        for row, index in enumerate(batch):
            scores[index] = -float(nll[row].sum())
        if progress is not None:
            progress(min(first + batch_size, len(order)), len(order))
    return scores


def _parse_item(item: dict, position: int) -> tuple[str, list[str], int]:
    inputs = item["inputs"]
    question = inputs.get("question")
    options = [inputs.get(f"option_{letter.lower()}") for letter in LETTERS]
    label = item["label"]
    if not isinstance(question, str) or not all(isinstance(o, str) and o.strip() for o in options):
        raise AdaptationInputError(f"{DATASET} item {position}: needs a question and four non-empty options")
    if label not in LETTERS:
        raise AdaptationInputError(f"{DATASET} item {position}: label {label!r} is not one of {', '.join(LETTERS)}")
    return question, [o.strip() for o in options], LETTERS.index(label)


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def mc_ruworldtree(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: EvalData,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    progress: ItemProgress | None = None,
) -> list[ScoreRow]:
    items = [_parse_item(item, i) for i, item in enumerate(load_mera(data.mera_dir, DATASET, limit))]
    pairs = [(question_prompt(question), f" {option}") for question, options, _ in items for option in options]
    scores = continuation_logprobs(model, tokenizer, pairs, batch_size=batch_size, progress=progress)
    correct = correct_norm = 0
    for number, (_, options, label) in enumerate(items):
        sums = scores[number * len(LETTERS) : (number + 1) * len(LETTERS)]
        correct += _argmax(sums) == label
        correct_norm += _argmax([s / len(o) for s, o in zip(sums, options, strict=True)]) == label
    n = len(items)
    return [
        ScoreRow("mc_ruworldtree", "accuracy", correct / n, n),
        ScoreRow("mc_ruworldtree", "accuracy_norm", correct_norm / n, n),
    ]
