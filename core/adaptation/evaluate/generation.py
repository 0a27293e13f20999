"""Prompting and greedy, batched generation shared by the generative tasks (copy, arithmetic).

Prompts go through the tokenizer's chat template when it has one (instruct models are evaluated as they are used)
and are plain text otherwise (base models). Generation is greedy with every sampling and penalty knob pinned, since
a checkpoint's own `generation_config` (merged in by `generate` for unset fields) may carry a repetition penalty
that would punish exactly what the copy task asks for. Prompts are left-padded, sorted by length to pad little, and
each output is cut to its own token budget and at its first stop token, so the text does not depend on the batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from transformers import GenerationMixin, PreTrainedModel, PreTrainedTokenizerBase

from langadapt.core.adaptation.evaluate.base import ItemProgress

# End-of-turn markers of common chat formats (ChatML, LLaMa-3, Gemma, Phi): generation stops at any that exists.
END_OF_TURN_PIECES = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "<|end_of_text|>")


def model_device(model: PreTrainedModel) -> torch.device:
    return next(model.parameters()).device


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer: PreTrainedTokenizerBase, user_message: str, plain_prompt: str) -> list[int]:
    """Token ids of a one-turn prompt ending where the answer starts.

    With a chat template: `user_message` as the user turn plus the assistant header (`add_generation_prompt`);
    control-token look-alikes inside the message are encoded as plain text (`sanitize_control_tokens`), so a
    document that happens to contain `<|im_end|>` cannot end the turn. Without one: `plain_prompt` with the
    tokenizer's usual special tokens (a BOS where it adds one).
    """
    if has_chat_template(tokenizer):
        return chat_ids(tokenizer, [{"role": "user", "content": user_message}], add_generation_prompt=True)
    return list(tokenizer.encode(plain_prompt, add_special_tokens=True))


def chat_ids(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool
) -> list[int]:
    """Token ids of a conversation in the tokenizer's chat template; control-token look-alikes inside messages are
    encoded as text (`sanitize_control_tokens`), as at inference."""
    ids = tokenizer.apply_chat_template(
        [dict(message) for message in messages],
        add_generation_prompt=add_generation_prompt,
        tokenize=True,
        return_dict=False,
        sanitize_control_tokens=True,
    )
    return [int(i) for i in cast(list[int], ids)]


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS plus the end-of-turn tokens the tokenizer has: a chat model ends its answer with the latter."""
    stops: list[int] = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    added = tokenizer.get_added_vocab()
    for piece in END_OF_TURN_PIECES:
        token_id = added.get(piece)
        if token_id is not None and token_id not in stops:
            stops.append(int(token_id))
    return stops


@dataclass(frozen=True)
class Generation:
    text: str  # the continuation, special tokens dropped
    finished: bool  # an end token ended it (False: it ran into its max_new_tokens)


@torch.inference_mode()
def greedy_generations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[int]],
    max_new_tokens: Sequence[int],
    *,
    batch_size: int = 8,
    progress: ItemProgress | None = None,
    fixed_length: bool = False,
) -> list[Generation]:
    """The greedy continuation of each prompt, at most `max_new_tokens[i]` tokens long, and whether it ended.

    `fixed_length` suppresses the end tokens until the budget is reached: every prompt gets exactly its budget
    (for speed measurements, where every model must run the same number of steps)."""
    if len(prompts) != len(max_new_tokens):
        raise ValueError("one max_new_tokens per prompt")
    device = model_device(model)
    pad = pad_token_id(tokenizer)
    stops = stop_token_ids(tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[Generation] = [Generation("", False)] * len(prompts)
    for first in range(0, len(order), batch_size):
        batch = order[first : first + batch_size]
        width = max(len(prompts[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, index in enumerate(batch):
            ids = prompts[index]
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            mask[row, width - len(ids) :] = 1
        generated = cast(GenerationMixin, model).generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max(max_new_tokens[i] for i in batch),
            min_new_tokens=max(max_new_tokens[i] for i in batch) if fixed_length else None,
            do_sample=False,
            num_beams=1,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            pad_token_id=pad,
            eos_token_id=stops or None,
        )
        for row, index in enumerate(batch):
            new = generated[row, width:].tolist()[: max_new_tokens[index]]
            finished = False
            for position, token in enumerate(new):
                if token in stops:
                    new, finished = new[:position], True
                    break
            outputs[index] = Generation(str(tokenizer.decode(new, skip_special_tokens=True)), finished)
        if progress is not None:
            progress(min(first + batch_size, len(order)), len(order))
    return outputs


def greedy_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[int]],
    max_new_tokens: Sequence[int],
    *,
    batch_size: int = 8,
    progress: ItemProgress | None = None,
) -> list[str]:
    """The greedy continuation of each prompt (special tokens dropped), at most `max_new_tokens[i]` tokens long."""
    generations = greedy_generations(
        model, tokenizer, prompts, max_new_tokens, batch_size=batch_size, progress=progress
    )
    return [g.text for g in generations]
