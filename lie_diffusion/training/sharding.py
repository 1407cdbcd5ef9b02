"""Sharded training under Accelerate's FSDP (version 2): the frozen base and the adapters are split across the
processes, each Lie op gathers its layer's weight as any module does. Saving gathers the adapters, resuming
scatters them back, and each process keeps the optimizer state of its own shards."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from accelerate.utils import DistributedType
from torch.distributed.tensor import DTensor, distribute_tensor

from .errors import TrainingError


def is_sharded(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def check_sharding(args, accelerator) -> None:
    """Only FSDP2 shards parameters as tensors these helpers read (FSDP1 flattens them), and Accelerate's FSDP2
    prepares one model: the denoiser."""
    if not is_sharded(accelerator):
        return
    if accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise TrainingError("FSDP training needs FSDP version 2: set fsdp_version: 2 in the accelerate config "
                            "(or FSDP_VERSION=2).")
    if args.train_text_encoder:
        raise TrainingError("--train_text_encoder does not go with FSDP: Accelerate's FSDP2 shards one model, the "
                            "denoiser. Train the text encoder adapters without FSDP, or leave the flag out.")


@torch.no_grad()
def broadcast_adapters(accelerator, models) -> None:
    """Start every process from the main process's adapters, as DDP does; FSDP shards each process's own."""
    if is_sharded(accelerator):
        for model in models:
            for parameter in model.parameters():
                if parameter.requires_grad:
                    torch.distributed.broadcast(parameter.data, src=0)


@contextmanager
def gathered(models):
    """The sharded modules of `models` hold their full weights inside the block (every process must enter it)."""
    from torch.distributed.fsdp import FSDPModule

    sharded = [module for model in models for module in model.modules() if isinstance(module, FSDPModule)]
    for module in sharded:
        module.unshard()
    try:
        yield
    finally:
        for module in sharded:
            module.reshard()


@torch.no_grad()
def copy_into(parameter, full):
    """Copy a full tensor into a parameter, which may be sharded (each process keeps its shard of `full`)."""
    full = full.to(parameter.device, parameter.dtype)
    if isinstance(parameter, DTensor):
        full = distribute_tensor(full, parameter.device_mesh, parameter.placements)
    parameter.copy_(full)


def all_finite(accelerator, params) -> bool:
    """Whether every process's share of `params` is finite."""
    finite = all(torch.isfinite(local(p)).all() for p in params)
    if not is_sharded(accelerator):
        return finite
    return accelerator.reduce(torch.tensor(float(finite), device=accelerator.device), reduction="sum").item() \
        == accelerator.num_processes


def local(tensor):
    """This process's shard of a sharded tensor; any other tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_optimizer_state(state_dict):
    """An optimizer state dict with each sharded tensor replaced by this process's shard (what it saves)."""
    return {**state_dict, "state": {index: {name: local(value) for name, value in values.items()}
                                    for index, values in state_dict["state"].items()}}


def reshard_optimizer_state(optimizer) -> None:
    """After loading a process's saved shards: make each state tensor a shard of its parameter's layout again."""
    for parameter, values in optimizer.state.items():
        if isinstance(parameter, DTensor):
            for name, value in values.items():
                if torch.is_tensor(value) and not isinstance(value, DTensor) and value.shape == parameter.to_local().shape:
                    values[name] = DTensor.from_local(value, parameter.device_mesh, parameter.placements,
                                                      shape=parameter.shape, stride=parameter.stride())
