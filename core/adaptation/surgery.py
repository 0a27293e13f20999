"""Model surgery: give a causal LM a new vocabulary, initialising the rows of tokens it did not have.

`rows: [V, d]` everywhere: V rows of width d, one per token id. Both the input embedding matrix and (when untied)
the output head are rebuilt; tied weights stay tied.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.core.adaptation.init import InitContext, get_init
from langadapt.core.adaptation.mapping import VocabMapping
from langadapt.core.adaptation.tokens import Vocabulary


def check_tokenizer_matches(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, what: str = "model") -> None:
    """Refuse a tokenizer with ids the model has no embedding row for."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise AdaptationInputError(
            f"the tokenizer ({len(tokenizer)} tokens) does not match the {what} ({rows} embedding rows)"
        )


def has_tied_head(model: PreTrainedModel) -> bool:
    head = model.get_output_embeddings()
    return head is None or head.weight is model.get_input_embeddings().weight


def new_vocab_rows(
    old_rows: torch.Tensor, mapping: VocabMapping, old: Vocabulary, new: Vocabulary, init: str, seed: int
) -> torch.Tensor:
    """rows: [V_new, d] in old_rows' dtype. Overlapping tokens copy their old row exactly; the others come from
    the `init` method."""
    old_rows = old_rows[: mapping.old_size]
    result = torch.empty(mapping.new_size, old_rows.shape[1], dtype=torch.float64)
    new_idx, old_idx = mapping.overlap_index()
    result[new_idx] = old_rows[old_idx].to(torch.float64)
    fresh = torch.tensor(mapping.new_ids, dtype=torch.long)
    if len(fresh):
        generator = torch.Generator().manual_seed(seed)
        ctx = InitContext(old_rows=old_rows, mapping=mapping, old_vocab=old, new_vocab=new, generator=generator)
        result[fresh] = get_init(init)(ctx, fresh)
    out = result.to(old_rows.dtype)
    out[new_idx] = old_rows[old_idx]  # bit-exact copies, independent of the float64 round trip
    return out


def set_vocab_rows(model: PreTrainedModel, embeddings: torch.Tensor, head: torch.Tensor | None) -> None:
    """Resize the model to len(embeddings) rows and write the rows; `head=None` keeps input and output tied."""
    model.resize_token_embeddings(embeddings.shape[0], mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(embeddings)
        if head is not None:
            model.get_output_embeddings().weight.copy_(head)
    model.config.vocab_size = embeddings.shape[0]


def remap_special_token_ids(
    model: PreTrainedModel, old_tokenizer: PreTrainedTokenizerBase, new_tokenizer: PreTrainedTokenizerBase
) -> None:
    """Re-point the config's and generation config's bos / eos / pad / unk ids (ints or lists) at the same tokens
    in the new vocabulary, whose ids may differ (`optimized` renumbers)."""

    new_vocab = new_tokenizer.get_vocab()

    def remap(value: int) -> int | None:
        token = old_tokenizer.convert_ids_to_tokens(value)
        return new_vocab.get(token) if isinstance(token, str) else None

    for config in (model.config, model.generation_config):
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
            value = getattr(config, name, None) if config is not None else None
            if isinstance(value, int):
                setattr(config, name, remap(value))
            elif isinstance(value, list):
                setattr(config, name, [new for new in map(remap, value) if new is not None])


def change_vocabulary(
    model: PreTrainedModel,
    old_tokenizer: PreTrainedTokenizerBase,
    new_tokenizer: PreTrainedTokenizerBase,
    *,
    init: str = "mean",
    seed: int = 0,
) -> VocabMapping:
    """Switch `model` (in place) from `old_tokenizer`'s vocabulary to `new_tokenizer`'s; returns the mapping."""
    check_tokenizer_matches(model, old_tokenizer)
    get_init(init)  # an unknown method fails before any work
    old, new = Vocabulary(old_tokenizer), Vocabulary(new_tokenizer)
    mapping = VocabMapping.build(old, new)
    tied = has_tied_head(model)
    embeddings = new_vocab_rows(model.get_input_embeddings().weight.detach(), mapping, old, new, init, seed)
    head = None
    if not tied:
        head = new_vocab_rows(model.get_output_embeddings().weight.detach(), mapping, old, new, init, seed + 1)
    set_vocab_rows(model, embeddings, head)
    remap_special_token_ids(model, old_tokenizer, new_tokenizer)
    return mapping
