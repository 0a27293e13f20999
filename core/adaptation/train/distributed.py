"""One CPT over several processes (`torchrun`): FSDP2 sharding of the model, distributed checkpoints of the trainable
state, and the trained model gathered for export.

FSDP2 (`torch.distributed.fsdp.fully_shard`) shards each parameter's rows over the processes and all-gathers a
unit's parameters for its forward and backward. The units (`shard_for_training`):
- every transformer layer (frozen and LoRA parameters together: each layer is one dtype);
- the input embeddings of an untied model, and the final norm;
- the root, the loss head (`lm_loss.CausalLMLoss`): the LM head, whose weight the loss reads directly (not through
  the head's forward, which would all-gather it) and so must stay gathered for the whole pass, plus a tied
  embedding matrix, which is the head and stays one parameter.
Only trainable parameters must share a dtype in a unit (FSDP2 reduce-scatters their gradients in one buffer); they
are all float32 masters. Gradients are averaged over the processes (reduce-scatter with a mean) after every
micro-batch, so the gradients stay sharded in memory.

Checkpoints (`save_sharded` / `load_sharded`) go through `torch.distributed.checkpoint` (DCP): each process writes
its own shards of the trainable parameters and of the AdamW state (replicated DDP tensors are written once); frozen
parameters are left out (`ignore_frozen_params`): they are the model the run started from.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.distributed.checkpoint as dcp
from accelerate import init_empty_weights
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers import AutoModelForCausalLM, PreTrainedModel

from langadapt.core.adaptation.errors import AdaptationInputError

_TRAINABLE_ONLY = StateDictOptions(ignore_frozen_params=True)


def shard_for_training(loss_module: nn.Module, model: PreTrainedModel, device: torch.device, *, bf16: bool) -> None:
    """`fully_shard` `model` (inside its loss head `loss_module`) in place over every process, in the units the
    module doc lists. With `bf16` the units are all-gathered in bf16 and gradients reduced in float32."""
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    shard = partial(fully_shard, mesh=mesh, mp_policy=policy or MixedPrecisionPolicy())
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise AdaptationInputError(f"strategy fsdp2 needs a decoder with a list of layers: {type(decoder).__name__}")
    for layer in layers:
        shard(layer)
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight is not embeddings.weight:
        shard(embeddings)
    norm = getattr(decoder, "norm", None)
    if isinstance(norm, nn.Module):
        shard(norm)
    shard(loss_module)


def local_rows(matrix: torch.Tensor) -> torch.Tensor:
    """The global row ids (on the host) of the rows this process holds of `matrix` (all of them unless it is a
    sharded DTensor)."""
    ids = torch.arange(matrix.shape[0])
    if not isinstance(matrix, DTensor):
        return ids
    return distribute_tensor(ids, matrix.device_mesh, matrix.placements, src_data_rank=None).to_local().cpu()


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (a view: writing it writes the parameter), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def to_float(value: torch.Tensor) -> float:
    return float(value.full_tensor() if isinstance(value, DTensor) else value)


# ---- checkpoints ----


def save_sharded(path: str, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write the trainable parameters of `module` and the optimizer state to the DCP checkpoint `path` (every
    process calls it)."""
    model_state, optimizer_state = get_state_dict(module, optimizer, options=_TRAINABLE_ONLY)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=path)


def load_sharded(path: str, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read what `save_sharded` wrote into `module` and `optimizer` (every process calls it)."""
    model_state, optimizer_state = get_state_dict(module, optimizer, options=_TRAINABLE_ONLY)
    dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=path)  # in place
    # Not strict: the frozen parameters are missing on purpose (a trainable one missing fails `dcp.load` already).
    options = StateDictOptions(ignore_frozen_params=True, strict=False)
    set_state_dict(module, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state, options=options)


# ---- export ----


def gather_model(
    loss_module: nn.Module,
    model: PreTrainedModel,
    *,
    prefix: str,
    add_trainable: Callable[[PreTrainedModel], nn.Module],
) -> tuple[PreTrainedModel, nn.Module] | None:
    """The sharded `model` gathered into a new, unsharded model on the host of process 0, with the module that
    `add_trainable` made of it (its LoRA layers, which the gathered values include); None on the other processes.
    Every process calls it. `loss_module` holds `model` as its submodule `prefix`."""
    full = get_model_state_dict(loss_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if torch.distributed.get_rank() != 0:
        return None
    with init_empty_weights(include_buffers=False):  # parameters on the meta device until loaded; buffers real
        gathered = AutoModelForCausalLM.from_config(model.config)
    module = add_trainable(gathered)
    gathered.load_state_dict({name.removeprefix(f"{prefix}."): t for name, t in full.items()}, assign=True)
    gathered.tie_weights()  # a tied head's key came as a tensor of its own
    return gathered, module
