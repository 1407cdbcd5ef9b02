"""Checkpoints: atomic folders of safetensors files that resume a run exactly (adapters, optimizer, scheduler,
every process's random states); no pickle."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from accelerate.logging import get_logger
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..io import read_lie_file, save_lie_weights
from .errors import TrainingError
from .sharding import all_finite, copy_into, gathered, is_sharded, local_optimizer_state, reshard_optimizer_state

logger = get_logger(__name__)

CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")


def checkpoint_steps(output_dir):
    """Steps of the complete checkpoints in `output_dir`, oldest first (partial ones are dot-folders)."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    return sorted(int(m.group(1)) for m in map(CHECKPOINT_RE.fullmatch, names) if m)


def find_checkpoint(args):
    """The checkpoint folder to resume from, or None when "latest" finds none."""
    output_dir = Path(args.output_dir)
    if args.resume_from_checkpoint == "latest":
        steps = checkpoint_steps(output_dir)
        return output_dir / f"checkpoint-{steps[-1]}" if steps else None
    for path in (Path(args.resume_from_checkpoint), output_dir / args.resume_from_checkpoint):
        if path.is_dir() and CHECKPOINT_RE.fullmatch(path.name):
            return path
    raise TrainingError(
        f"--resume_from_checkpoint {args.resume_from_checkpoint}: no checkpoint-<step> folder there or in {output_dir}."
    )


@torch.no_grad()
def load_adapters_in_place(checkpoint, models):
    """Copy a checkpoint's adapter factors into the adapters being trained.

    In place, because the optimizer and DDP hold these very tensors (load_lie_weights would add new ones).
    """
    saved = {(m.component, m.module): m for m in read_lie_file(checkpoint).modules}
    trained = {
        (component, name): layer
        for component, model in models.items()
        for name, layer in model.named_modules()
        if "default" in getattr(layer, "lora_A", {})
    }
    if saved.keys() != trained.keys() or any(
        saved[k].A.shape != trained[k].lora_A["default"].weight.shape
        or saved[k].B.shape != trained[k].lora_B["default"].weight.shape
        for k in saved
    ):
        raise TrainingError(
            f"the adapters in {checkpoint} do not match the ones this run trains; resume with the flags of the run "
            "that wrote it (--rank, --conv_rank, --conv_targets, --attn_targets, --attn_adapter, --train_text_encoder)."
        )
    for key, entry in saved.items():
        copy_into(trained[key].lora_A["default"].weight, entry.A)
        copy_into(trained[key].lora_B["default"].weight, entry.B)


# A checkpoint folder: the adapter file (WEIGHT_NAME), TRAINING_STATE (optimizer, lr scheduler, grad scaler,
# accelerate's step counter) and one RANDOM_STATES file per process; under FSDP the optimizer state is in one
# OPTIMIZER_SHARD file per process instead. All safetensors: accelerate's save_state would pickle the states.
TRAINING_STATE = "training_state.safetensors"
RANDOM_STATES = "random_states_{}.safetensors"
OPTIMIZER_SHARD = "optimizer_{}.safetensors"
_STATE_METADATA = "lie_diffusion.state"


def save_state_file(path, tree) -> None:
    """Write nested dicts / lists / tuples of tensors, numbers, strings and None as one safetensors file: the
    tensors as tensors, the structure (with every other value, exactly) as JSON in the metadata."""
    tensors = {}

    def encode(obj):
        if isinstance(obj, torch.Tensor):
            key = str(len(tensors))
            tensors[key] = obj.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)  # never shared
            return {"tensor": key}
        if isinstance(obj, dict):  # keys of any type (the optimizer's are parameter indices)
            return {"dict": [[encode(k), encode(v)] for k, v in obj.items()]}
        if isinstance(obj, (list, tuple)):
            return {type(obj).__name__: [encode(v) for v in obj]}
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"{path}: a training state cannot hold values of type {type(obj).__name__!r}.")

    structure = json.dumps(encode(tree))
    save_file(tensors, str(path), metadata={_STATE_METADATA: structure})


def load_state_file(path):
    """The nest `save_state_file` wrote, with its tensors on the CPU."""
    with safe_open(str(path), framework="pt") as file:
        structure = (file.metadata() or {}).get(_STATE_METADATA)
    if structure is None:
        raise TrainingError(f"{path} is not a lie-diffusion training state (no {_STATE_METADATA!r} metadata).")
    tensors = load_file(str(path))

    def decode(obj):
        if not isinstance(obj, dict):
            return obj
        (kind, value), = obj.items()
        if kind == "tensor":
            return tensors[value]
        if kind == "dict":
            return {decode(k): decode(v) for k, v in value}
        items = [decode(v) for v in value]
        return tuple(items) if kind == "tuple" else items

    return decode(json.loads(structure))


def random_states() -> dict:
    """This process's Python, NumPy, torch and CUDA generator states."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_random_states(states: dict) -> None:
    random.setstate(states["python"])
    numpy_state = states["numpy"]
    numpy_state["state"]["key"] = numpy_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state(numpy_state)
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_training_state(folder, accelerator, adapted_models, optimizer, lr_scheduler) -> None:
    """What resuming needs, into `folder`: the adapters (main process), the optimizer / scheduler / scaler states
    (main process; under FSDP each process its optimizer shard) and every process's random states."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sharded = is_sharded(accelerator)
    with gathered(adapted_models.values()):
        if accelerator.is_main_process:
            save_lie_weights(folder, **adapted_models)
    if sharded:
        save_state_file(folder / OPTIMIZER_SHARD.format(accelerator.process_index),
                        local_optimizer_state(optimizer.state_dict()))
    if accelerator.is_main_process:
        scaler = accelerator.scaler
        save_state_file(folder / TRAINING_STATE, {
            "optimizer": None if sharded else optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
            "grad_scaler": None if scaler is None else scaler.state_dict(), "step": accelerator.step,
        })
    save_state_file(folder / RANDOM_STATES.format(accelerator.process_index), random_states())


def load_training_state(folder, accelerator, adapted_models, optimizer, lr_scheduler) -> None:
    """Resume from a folder `save_training_state` wrote: adapters in place, then optimizer, scheduler, scaler
    and this process's random states."""
    folder = Path(folder)
    state_file, random_file = folder / TRAINING_STATE, folder / RANDOM_STATES.format(accelerator.process_index)
    if not state_file.is_file():
        older = (" It holds pickle files (optimizer.bin, random_states_*.pkl): an earlier lie-diffusion wrote it with "
                 "accelerate's save_state. Resume it with that version, or start a new run."
                 if (folder / "optimizer.bin").exists() else "")
        raise TrainingError(f"{folder} has no {TRAINING_STATE}.{older}")
    if not random_file.is_file():
        raise TrainingError(f"{folder} has no {random_file.name}: it was saved by a run with fewer processes than "
                            f"this one ({accelerator.num_processes}).")
    load_adapters_in_place(folder, adapted_models)
    state = load_state_file(state_file)
    if (state["optimizer"] is None) != is_sharded(accelerator):
        raise TrainingError(f"{folder} was saved by a run {'with' if state['optimizer'] is None else 'without'} FSDP; "
                            "resume it the same way.")
    if state["optimizer"] is None:
        optimizer.load_state_dict(load_state_file(folder / OPTIMIZER_SHARD.format(accelerator.process_index)))
        reshard_optimizer_state(optimizer)
    else:
        optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if accelerator.scaler is not None and state["grad_scaler"] is not None:
        accelerator.scaler.load_state_dict(state["grad_scaler"])
    accelerator.step = state["step"]
    set_random_states(load_state_file(random_file))


def save_checkpoint(args, accelerator, step, params, adapted_models, optimizer, lr_scheduler):
    """The training state into a temporary folder, renamed when complete; then prune old ones."""
    if not all_finite(accelerator, params):
        raise TrainingError(f"adapter weights are not finite at step {step}; not saving a checkpoint.")
    output_dir = Path(args.output_dir)
    final, partial = output_dir / f"checkpoint-{step}", output_dir / f".checkpoint-{step}.partial"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    save_training_state(partial, accelerator, adapted_models, optimizer, lr_scheduler)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        stale = output_dir / f".checkpoint-{step}.stale"  # written by a run this one resumed from before it
        if final.exists():
            os.replace(final, stale)
        os.replace(partial, final)
        shutil.rmtree(stale, ignore_errors=True)
        logger.info(f"Saved state to {final}")
        for leftover in output_dir.glob(".checkpoint-*.removing"):  # left by a run killed while pruning
            shutil.rmtree(leftover, ignore_errors=True)
        if args.checkpoints_total_limit is not None:
            steps = checkpoint_steps(output_dir)
            for old in steps[: max(0, len(steps) - args.checkpoints_total_limit)]:
                logger.info(f"Removing checkpoint-{old} (--checkpoints_total_limit {args.checkpoints_total_limit})")
                doomed = output_dir / f".checkpoint-{old}.removing"  # never a half-deleted checkpoint-N
                os.replace(output_dir / f"checkpoint-{old}", doomed)
                shutil.rmtree(doomed)
