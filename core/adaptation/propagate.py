"""Learned Embedding Propagation (LEP; Tikhomirov & Chernyshev 2024, arXiv 2412.21140).

Inputs: the original base model B (old vocabulary), the adapted base model B' (new vocabulary, embeddings learned
by continued pretraining) and the instruct model I (old vocabulary, same architecture as B). Output: I' = I's
transformer layers with new-vocabulary input embeddings and LM head.

Every variant has one form, applied separately to the input embedding matrix E and the output head H:

    E_I' = E_B' · P        E_B': [V_new, d],  P: [d, d]

where P maps the base model's embedding space into the instruct model's:

- `swap`:       P = identity: the adapted base rows as they are.
- `overlap`:    P = argmin ||E_B[S] · P - E_I[S]||², S = old-vocabulary ids of the tokens that also exist in the
                new vocabulary (matched by decoded text, `TokenKey`).
- `conversion`: Ê_B = A · E_B and Ê_I = A · E_I express both old matrices in the new vocabulary the way mean
                initialisation does (A averages the old rows of each new token's old tokenisation, special tokens
                matched by name; see `VocabMapping`), then P = argmin ||Ê_B · P - Ê_I||².

Least squares are solved in float64 (normal equations accumulated in row blocks on `compute_device()`, then the
d x d system by `torch.linalg.lstsq` on the CPU, whose SVD driver also handles a rank-deficient system) and cast
back. With I = B every variant gives
P = identity, so I' = B'; with E_I = E_B · Q for an invertible Q, `overlap` and `conversion` recover Q.

Special and added tokens of I's tokenizer (chat-template tokens such as `<|im_start|>`) are carried into the output
tokenizer with their rows copied from I, and I's chat template and special-token roles are kept.

Propagation is a list of steps over I'; `propagate_embeddings` is the first. When CPT also trained LoRA adapters on
the base's transformer layers (`lora+head`), `merge_layer_delta` is the second: the layers' change learned on B,
ΔW = (alpha / r) · B_lora · A_lora, is added to I's matching weights with a configurable scale, W_I' = W_I + s · ΔW.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from safetensors.torch import load_file
from tokenizers import AddedToken, Tokenizer
from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from langadapt.core.adaptation.config import VARIANTS, Variant
from langadapt.core.adaptation.device import compute_device
from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.core.adaptation.mapping import VocabMapping
from langadapt.core.adaptation.sources import load_model, save_pretrained
from langadapt.core.adaptation.surgery import check_tokenizer_matches, has_tied_head, set_vocab_rows
from langadapt.core.adaptation.tokens import Vocabulary
from langadapt.core.adaptation.weights import input_rows, output_rows

CHUNK_ROWS = 8192  # rows per float64 block: memory stays O(chunk x d + d x d) at any vocabulary size


def solve_projection(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """P: [d, d] = argmin sum ||X · P - Y||² over row blocks (X, Y: [n, d]), in float64.

    Solved through the normal equations (Xᵀ X) P = Xᵀ Y accumulated block by block, so a 128 K x 4096 problem never
    holds more than one block in float64; `lstsq` on the d x d system also handles a rank-deficient Xᵀ X.
    """
    gram: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    for x, y in pairs:
        x64, y64 = x.to(torch.float64), y.to(torch.float64)
        gram = x64.T @ x64 if gram is None else gram.addmm_(x64.T, x64)
        cross = x64.T @ y64 if cross is None else cross.addmm_(x64.T, y64)
    if gram is None or cross is None:
        raise AdaptationInputError("no rows to fit the projection on")
    return torch.linalg.lstsq(gram.cpu(), cross.cpu(), driver="gelsd").solution.to(gram.device)


def _blocks(total: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, CHUNK_ROWS):
        yield start, min(start + CHUNK_ROWS, total)


def projection(
    variant: Variant, base_rows: torch.Tensor, instruct_rows: torch.Tensor, mapping: VocabMapping
) -> torch.Tensor:
    """The d x d float64 projection of `variant` from base rows E_B to instruct rows E_I (both [V_old, d])."""
    d = base_rows.shape[1]
    if variant == "swap":
        return torch.eye(d, dtype=torch.float64, device=base_rows.device)
    if variant == "overlap":
        old_ids = mapping.overlap_index()[1].to(base_rows.device)
        if len(old_ids) == 0:
            raise AdaptationInputError("variant 'overlap' needs tokens shared by the old and new vocabularies; none")
        return solve_projection(
            (base_rows[old_ids[a:b]], instruct_rows[old_ids[a:b]]) for a, b in _blocks(len(old_ids))
        )
    if variant == "conversion":
        return solve_projection(
            (mapping.mean_rows(base_rows, range(a, b)), mapping.mean_rows(instruct_rows, range(a, b)))
            for a, b in _blocks(mapping.new_size)
        )
    raise AdaptationInputError(f"unknown LEP variant '{variant}' (choose from {', '.join(VARIANTS)})")


def propagate_rows(
    variant: Variant,
    base_rows: torch.Tensor,
    adapted_rows: torch.Tensor,
    instruct_rows: torch.Tensor,
    mapping: VocabMapping,
) -> torch.Tensor:
    """E_I' = E_B' · P for one matrix; returns [V_new, d] in the instruct rows' dtype.

    P is solved in float64 and cast back; the product E_B' · P runs in float32 (float64 inputs stay float64),
    and `swap` skips it, since its P is the identity.
    """
    adapted = adapted_rows[: mapping.new_size].detach()
    if variant == "swap":
        return adapted.to(instruct_rows.dtype).clone()
    vocab = mapping.old_size
    compute = torch.float64 if adapted.dtype == torch.float64 else torch.float32
    p = projection(variant, base_rows[:vocab], instruct_rows[:vocab], mapping).to(compute)
    out = torch.empty(mapping.new_size, adapted.shape[1], dtype=instruct_rows.dtype, device=adapted.device)
    for a, b in _blocks(mapping.new_size):
        out[a:b] = (adapted[a:b].to(compute) @ p).to(instruct_rows.dtype)
    return out


@dataclass(frozen=True)
class PropagationReport:
    variant: Variant
    vocab_size: int
    overlapping_tokens: int
    carried_special_tokens: list[str]
    tied: bool


def _check_compatible(base: PreTrainedModel, adapted: PreTrainedModel, instruct: PreTrainedModel) -> None:
    b, a, i = base.config, adapted.config, instruct.config
    if (b.hidden_size, b.num_hidden_layers) != (i.hidden_size, i.num_hidden_layers):
        raise AdaptationInputError("the base and instruct models have different architectures")
    if a.hidden_size != b.hidden_size:
        raise AdaptationInputError("the adapted base model's hidden size differs from the base model's")
    if base.get_input_embeddings().weight.shape != instruct.get_input_embeddings().weight.shape:
        raise AdaptationInputError("the base and instruct models have different vocabularies (embedding shapes)")


def output_tokenizer(
    adapted_tokenizer: PreTrainedTokenizerBase, instruct_tokenizer: PreTrainedTokenizerBase
) -> tuple[PreTrainedTokenizerFast, list[str]]:
    """B''s tokenizer plus I's added tokens it lacks, with I's chat template and special-token roles.

    Returns the tokenizer and the added tokens of I (content strings) whose rows must come from I.
    """
    backend = Tokenizer.from_str(adapted_tokenizer.backend_tokenizer.to_str())
    carried = [tok for _, tok in sorted(instruct_tokenizer.added_tokens_decoder.items())]
    vocab = backend.get_vocab(with_added_tokens=True)
    missing = [tok for tok in carried if tok.content not in vocab]
    if missing:
        backend.add_special_tokens([AddedToken(tok.content, special=tok.special, normalized=False) for tok in missing])
    roles = {}
    for role in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = getattr(instruct_tokenizer, role, None) or getattr(adapted_tokenizer, role, None)
        if value is not None:
            roles[role] = str(value)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **roles)
    tokenizer.chat_template = instruct_tokenizer.chat_template
    tokenizer.model_max_length = instruct_tokenizer.model_max_length
    return tokenizer, [tok.content for tok in carried]


def propagate_embeddings(
    *,
    base: PreTrainedModel,
    base_tokenizer: PreTrainedTokenizerBase,
    adapted: PreTrainedModel,
    adapted_tokenizer: PreTrainedTokenizerBase,
    instruct: PreTrainedModel,
    instruct_tokenizer: PreTrainedTokenizerBase,
    variant: Variant,
) -> tuple[PreTrainedTokenizerFast, PropagationReport]:
    """Give `instruct` (in place) the new vocabulary's embeddings and head by LEP `variant`.

    The transformer layers of `instruct` are not touched. Returns I''s tokenizer and a report. Only embedding
    matrices are read, so the models may stay on the CPU; the arithmetic runs on `compute_device()`.
    """
    if variant not in VARIANTS:
        raise AdaptationInputError(f"unknown LEP variant '{variant}' (choose from {', '.join(VARIANTS)})")
    _check_compatible(base, adapted, instruct)
    check_tokenizer_matches(base, base_tokenizer, "base model")
    check_tokenizer_matches(adapted, adapted_tokenizer, "adapted base model")
    check_tokenizer_matches(instruct, instruct_tokenizer, "instruct model")
    mapping = VocabMapping.build(Vocabulary(base_tokenizer), Vocabulary(adapted_tokenizer))
    tokenizer, carried = output_tokenizer(adapted_tokenizer, instruct_tokenizer)

    device = compute_device()

    def matrices(model: PreTrainedModel) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = input_rows(model).detach().to(device)
        head = output_rows(model)
        if head is None or has_tied_head(model):
            return embeddings, embeddings
        return embeddings, head.detach().to(device)

    (e_b, h_b), (e_a, h_a), (e_i, h_i) = matrices(base), matrices(adapted), matrices(instruct)
    tied = has_tied_head(instruct)
    embeddings = propagate_rows(variant, e_b, e_a, e_i, mapping)
    head = None if tied else propagate_rows(variant, h_b, h_a, h_i, mapping)
    embeddings, head = _with_carried_rows(tokenizer, instruct_tokenizer, carried, embeddings, head, e_i, h_i)
    set_vocab_rows(instruct, embeddings, head)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        for config in (instruct.config, instruct.generation_config):
            if config is not None and getattr(tokenizer, name, None) is not None:
                setattr(config, name, getattr(tokenizer, name))
    report = PropagationReport(
        variant=variant,
        vocab_size=len(tokenizer),
        overlapping_tokens=len(mapping.overlap),
        carried_special_tokens=carried,
        tied=tied,
    )
    return tokenizer, report


def _with_carried_rows(
    tokenizer: PreTrainedTokenizerBase,
    instruct_tokenizer: PreTrainedTokenizerBase,
    carried: list[str],
    embeddings: torch.Tensor,
    head: torch.Tensor | None,
    instruct_embeddings: torch.Tensor,
    instruct_head: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Grow the matrices to the output tokenizer's size and copy I's rows for its added/special tokens."""
    size = len(tokenizer)
    if size > embeddings.shape[0]:
        pad = embeddings.new_zeros(size - embeddings.shape[0], embeddings.shape[1])
        embeddings = torch.cat([embeddings, pad])
        head = None if head is None else torch.cat([head, pad])
    device = embeddings.device
    new_ids = torch.tensor(tokenizer.convert_tokens_to_ids(carried), dtype=torch.long, device=device)
    old_ids = torch.tensor(instruct_tokenizer.convert_tokens_to_ids(carried), dtype=torch.long, device=device)
    embeddings[new_ids] = instruct_embeddings[old_ids]
    if head is not None:
        head[new_ids] = instruct_head[old_ids]
    return embeddings, head


def merge_layer_delta(instruct: PreTrainedModel, adapter_dir: str, *, scale: float = 1.0) -> int:
    """Add a LoRA adapter's weight delta (peft format, trained on the base) to `instruct` in place.

    W += scale · (lora_alpha / r) · lora_B @ lora_A for every adapted module; returns how many modules changed.
    The adapter must hold layer deltas only (embeddings and head are propagated by `propagate_embeddings`).
    """
    config_path = os.path.join(adapter_dir, "adapter_config.json")
    weights_path = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not (os.path.isfile(config_path) and os.path.isfile(weights_path)):
        raise AdaptationInputError(f"not a LoRA adapter directory: {adapter_dir}")
    with open(config_path, encoding="utf-8") as handle:
        adapter = json.load(handle)
    factor = scale * adapter["lora_alpha"] / adapter["r"]
    tensors = load_file(weights_path)
    modules = dict(instruct.named_modules())
    merged = 0
    for name, lora_a in tensors.items():
        if ".lora_A." not in name:
            continue
        lora_b = tensors[name.replace(".lora_A.", ".lora_B.")]
        target = name.split(".lora_A.")[0].removeprefix("base_model.model.")
        module = modules.get(target)
        if module is None or not hasattr(module, "weight"):
            raise AdaptationInputError(f"the adapter's module {target} does not exist in the instruct model")
        delta = factor * (lora_b.to(torch.float64) @ lora_a.to(torch.float64))
        if delta.shape != module.weight.shape:
            raise AdaptationInputError(f"the adapter's {target} delta {tuple(delta.shape)} does not fit the model")
        with torch.no_grad():
            module.weight.copy_((module.weight.to(torch.float64) + delta).to(module.weight.dtype))
        merged += 1
    return merged


def propagate_saved(
    *,
    base: str,
    adapted_base: str,
    instruct: str,
    variant: Variant,
    out_dir: str,
    lora_adapter: str | None = None,
    lora_scale: float = 1.0,
) -> dict[str, object]:
    """Load B, B' and I from specs, propagate (embeddings, then the LoRA layer delta if given), save I' to
    `out_dir`; returns the propagation report as a dict."""
    base_model, base_tokenizer = load_model(base)
    adapted_model, adapted_tokenizer = load_model(adapted_base)
    instruct_model, instruct_tokenizer = load_model(instruct)
    tokenizer, report = propagate_embeddings(
        base=base_model,
        base_tokenizer=base_tokenizer,
        adapted=adapted_model,
        adapted_tokenizer=adapted_tokenizer,
        instruct=instruct_model,
        instruct_tokenizer=instruct_tokenizer,
        variant=variant,
    )
    info: dict[str, object] = dict(report.__dict__)
    if lora_adapter is not None:
        info["lora_modules_merged"] = merge_layer_delta(instruct_model, lora_adapter, scale=lora_scale)
        info["lora_scale"] = lora_scale
    save_pretrained(instruct_model, tokenizer, out_dir)
    return info
