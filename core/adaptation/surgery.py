"""Model surgery: give a causal LM a new vocabulary, initialising the rows of tokens it did not have.

`rows: [V, d]` everywhere: V rows of width d, one per token id. Both the input embedding matrix and (when untied)
the output head are rebuilt; tied weights stay tied.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from langadapt.core.adaptation.config import AUXILIARY_METHODS, InitConfig
from langadapt.core.adaptation.corpus import require_documents
from langadapt.core.adaptation.device import compute_device
from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.core.adaptation.init import InitContext, get_init
from langadapt.core.adaptation.init.auxiliary import AuxiliarySpace, auxiliary_space
from langadapt.core.adaptation.init.scale import ScaleFit, fit_scale, scale_rows
from langadapt.core.adaptation.mapping import VocabMapping
from langadapt.core.adaptation.tokens import Vocabulary
from langadapt.core.adaptation.weights import input_rows, output_rows


def check_tokenizer_matches(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, what: str = "model") -> None:
    """Refuse a tokenizer with ids the model has no embedding row for."""
    rows = input_rows(model).shape[0]
    if len(tokenizer) > rows:
        raise AdaptationInputError(
            f"the tokenizer ({len(tokenizer)} tokens) does not match the {what} ({rows} embedding rows)"
        )


def has_tied_head(model: PreTrainedModel) -> bool:
    head = output_rows(model)
    return head is None or head is input_rows(model)


def new_vocab_rows(
    old_rows: torch.Tensor,
    mapping: VocabMapping,
    old: Vocabulary,
    new: Vocabulary,
    config: InitConfig,
    seed: int,
    auxiliary: AuxiliarySpace | None = None,
) -> torch.Tensor:
    """rows: [V_new, d] in old_rows' dtype and on their device. Overlapping tokens copy their old row exactly; the
    others come from the `config.method`."""
    old_rows = old_rows[: mapping.old_size]
    device = old_rows.device
    out = torch.empty(mapping.new_size, old_rows.shape[1], dtype=old_rows.dtype, device=device)
    new_idx, old_idx = (index.to(device) for index in mapping.overlap_index())
    out[new_idx] = old_rows[old_idx]  # bit-exact copies
    fresh = torch.tensor(mapping.new_ids, dtype=torch.long, device=device)
    if len(fresh):
        generator = torch.Generator().manual_seed(seed)
        ctx = InitContext(
            old_rows=old_rows,
            mapping=mapping,
            old_vocab=old,
            new_vocab=new,
            generator=generator,
            config=config,
            auxiliary=auxiliary,
        )
        out[fresh] = get_init(config.method)(ctx, fresh).to(old_rows.dtype)
    return out


def set_vocab_rows(model: PreTrainedModel, embeddings: torch.Tensor, head: torch.Tensor | None) -> None:
    """Resize the model to len(embeddings) rows and write the rows; `head=None` keeps input and output tied."""
    model.resize_token_embeddings(embeddings.shape[0], mean_resizing=False)
    with torch.no_grad():
        input_rows(model).copy_(embeddings)
        if head is not None:
            head_rows = output_rows(model)
            assert head_rows is not None
            head_rows.copy_(head)
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


@dataclass(frozen=True)
class VocabChange:
    mapping: VocabMapping
    scale: float  # the factor the new rows were multiplied by (init.scale; 1: unchanged)
    scale_fit: ScaleFit | None  # how it was chosen, when fitted


def change_vocabulary(
    model: PreTrainedModel,
    old_tokenizer: PreTrainedTokenizerBase,
    new_tokenizer: PreTrainedTokenizerBase,
    config: InitConfig,
    corpus: str | None = None,
    scale_progress: Callable[[int, int], None] | None = None,
) -> VocabChange:
    """Switch `model` (in place) from `old_tokenizer`'s vocabulary to `new_tokenizer`'s.

    `corpus`: target-language text, read by the methods that train an auxiliary space (focus, omp, regression) and
    by the scale fit. The row arithmetic runs on `compute_device()`, as do the scale fit's forward passes (the
    model returns to where it was).
    """
    check_tokenizer_matches(model, old_tokenizer)
    old, new = Vocabulary(old_tokenizer), Vocabulary(new_tokenizer)
    mapping = VocabMapping.build(old, new)
    auxiliary = None
    scale = config.resolved_scale
    if corpus is None and (config.method in AUXILIARY_METHODS or scale == "fit"):
        need = "init.scale 'fit'" if config.method not in AUXILIARY_METHODS else f"init method '{config.method}'"
        raise AdaptationInputError(f"{need} needs a target-language corpus")
    if config.method in AUXILIARY_METHODS and mapping.new_ids:
        assert corpus is not None
        auxiliary = auxiliary_space(new_tokenizer, corpus, config.auxiliary, config.seed, config.cache_dir)
    tied = has_tied_head(model)
    device = compute_device()

    def rows(matrix: torch.Tensor | None, seed: int) -> torch.Tensor:
        assert matrix is not None
        old_rows = matrix.detach().to(device)
        return new_vocab_rows(old_rows, mapping, old, new, config, seed, auxiliary).to(matrix.device)

    embeddings = rows(input_rows(model), config.seed)
    head = None if tied else rows(output_rows(model), config.seed + 1)
    set_vocab_rows(model, embeddings, head)
    remap_special_token_ids(model, old_tokenizer, new_tokenizer)
    fit = None
    if scale == "fit" and mapping.new_ids:
        assert corpus is not None
        texts = list(require_documents(corpus, limit_chars=config.scale_chars))
        fit = fit_scale(model, new_tokenizer, mapping.new_ids, texts, progress=scale_progress)
    elif scale != "fit" and scale != 1.0:
        scale_rows(model, mapping.new_ids, scale)
    factor = fit.scale if fit is not None else (1.0 if scale == "fit" else scale)
    return VocabChange(mapping=mapping, scale=factor, scale_fit=fit)
