"""The host-free core of the ComfyUI, Forge and A1111 loaders: a lie-diffusion file → the patches a host applies.

The hosts hold SD models in the LDM/SGM layout and find a LoRA's layers through kohya key names, so each
module is named the way `export` names it (the UNet fingerprint in the file tells SD1/2 from SDXL). Lie
modules become `LiePatch`es that compute W ⊙ exp(t·sΔ) (exp) or W + t·s·W ⊙ Δ (taylor) in float32 at the
host's strength t: the exact Lie model at every strength, not export's W + t·ΔW. The LoRA section is handed
to the host's own LoRA loader. Everything is checked before a host is touched: names, shapes, and that the
adapted weights are finite at that strength.

Nothing here imports a host (they are GPL/AGPL): the glue in `integrations/` does, when the host runs it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from safetensors import SafetensorError, safe_open

from .naming import is_sdxl, kohya_name
from .functional import LieFactor, lie_update
from .io import METADATA_KEY, LieFile, ModuleEntry, check_adapted_finite, read_lie_file, resolve_weight_file

UNET = ("unet",)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


class LiePatch:
    """One Lie module as a weight patch. `calculate_weight` has the call signature of ComfyUI's
    `WeightAdapterBase.calculate_weight`; the ComfyUI glue makes a subclass that is also one."""

    name = "lie"  # ComfyUI names the adapter in its warnings

    def __init__(self, entry: ModuleEntry):
        self.entry = entry

    def update(self, weight: torch.Tensor, strength: float) -> torch.Tensor:
        """ΔW = W ⊙ expm1(t·sΔ) (exp) or t·s·W ⊙ Δ (taylor) at strength t, in float32: hosts that add patches
        (W + ΔW) then get the exact Lie model at t."""
        entry = self.entry
        factor = LieFactor(entry.A.to(weight.device), entry.B.to(weight.device), strength * entry.scaling, entry.mode)
        return lie_update(weight.float(), factor)

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weights=None):
        """W ← W + function(ΔW), summed in float32 and rounded once to W's dtype (fp16/bf16 in ComfyUI's low-VRAM
        path). In place: ComfyUI keeps the tensor it passed when the patch targets a slice."""
        return weight.copy_(weight.float() + function(self.update(weight, strength)))


def is_lie_file(path) -> bool:
    """Whether `path` is a safetensors file with lie-diffusion metadata (hosts read many other LoRA files)."""
    try:
        with safe_open(str(path), framework="pt") as file:
            return METADATA_KEY in (file.metadata() or {})
    except (SafetensorError, OSError):
        return False


def as_lie_file(adapter) -> LieFile:
    """A `LieFile` (read from a path if needed) that is a lie-diffusion file, not some other LoRA."""
    if not isinstance(adapter, LieFile):
        path = resolve_weight_file(adapter)
        adapter = read_lie_file(path) if is_lie_file(path) else None
    if adapter is None or adapter.info is None:
        raise ValueError(f"{path if adapter is None else adapter.path}: not a lie-diffusion file (not a readable "
                         f"safetensors file with '{METADATA_KEY}' metadata); load other LoRA files with the host's own "
                         "LoRA loader.")
    return adapter


def kohya_names(adapter: LieFile, components: Iterable[str], sgm_unet: bool = False
                ) -> tuple[dict[str, ModuleEntry], list[str]]:
    """kohya key stem → module, for the file's modules of `components`; and the modules kohya cannot name.
    `sgm_unet`: SGM UNet names for every layout (see `naming.kohya_name`)."""
    config = base_config(adapter)
    names, problems = {}, []
    for entry in adapter.modules:
        if entry.component in components:
            try:
                names[kohya_name(entry.component, entry.module, config, sgm_unet)] = entry
            except ValueError as error:
                problems.append(str(error))
    return names, problems


def base_config(adapter: LieFile) -> dict:
    """The UNet config entries the file was saved for (its fingerprint; empty for files saved without a UNet)."""
    return ((adapter.info or {}).get("fingerprint") or {}).get("unet") or {}


def refuse(adapter: LieFile, problems: list[str]) -> None:
    """One error for every module that does not fit, with the base model the file was saved for."""
    if not problems:
        return
    config = base_config(adapter)
    hint = ""
    if config:
        family = "SDXL" if is_sdxl(config) else "SD 1.x/2.x"
        hint = f" (the file was saved for an {family} UNet, block_out_channels {config.get('block_out_channels')})"
    shown = "; ".join(problems[:5]) + (f"; ... (+{len(problems) - 5} more)" if len(problems) > 5 else "")
    raise ValueError(f"{adapter.path}: does not fit this model{hint}: {shown}.")


def kohya_lora_tensors(name: str, entry: ModuleEntry) -> dict[str, torch.Tensor]:
    """A LoRA-section module as the tensors of a kohya LoRA file, which every host's own LoRA loader reads."""
    return {f"{name}.lora_down.weight": entry.A, f"{name}.lora_up.weight": entry.B,
            f"{name}.alpha": torch.tensor(entry.alpha)}


def check_fit(adapter: LieFile, names: Mapping[str, ModuleEntry], problems: list[str],
              layer_of: Callable[[str], tuple[torch.Tensor, float] | None]) -> None:
    """Raise one error naming the file for every module (and each of `problems`) that has no layer of its shape,
    or at once for a module whose adapted weight would not be finite.

    `layer_of`: kohya name → (the layer's unpatched weight, the strength it gets there), or None if there is none.
    """
    for name, entry in names.items():
        layer = layer_of(name)
        if layer is None:
            problems.append(f"{entry.key_prefix}: the model has no layer {name}")
            continue
        weight, strength = layer
        shape = (entry.B.shape[0], *entry.A.shape[1:])
        if tuple(weight.shape) != shape:
            problems.append(f"{entry.key_prefix}: lora_A {tuple(entry.A.shape)}, lora_B {tuple(entry.B.shape)} do not "
                            f"fit {name} {tuple(weight.shape)}")
            continue
        check_adapted_finite(adapter.path, entry, weight, strength)
    refuse(adapter, problems)


def host_patches(
    adapter,
    key_map: Mapping[str, str],
    weights: Mapping[str, torch.Tensor],
    strength: float,
    components: Iterable[str],
    load_lora: Callable[[dict, dict], dict],
    lie_patch: Callable[[ModuleEntry], object] = LiePatch,
) -> dict:
    """The dict a ComfyUI-style `ModelPatcher.add_patches` takes (ComfyUI, Forge) for the file's modules of
    `components`; raises before anything is patched.

    `key_map`: kohya name → model key (the host's model_lora_keys_unet / _clip); `weights`: the model's state
    dict (shapes, and finiteness at `strength`); `load_lora`: the host's loader for kohya LoRA tensors, which
    makes the LoRA section the host's own LoRA patches; `lie_patch`: a module → the host's Lie patch value.
    """
    adapter = as_lie_file(adapter)
    names, problems = kohya_names(adapter, components)
    check_fit(adapter, names, problems,
              lambda name: (weights[key_map[name]], strength) if key_map.get(name) in weights else None)
    lora, to_load, lie = {}, {}, {}
    for name, entry in names.items():
        if entry.section == "lie":
            lie[key_map[name]] = lie_patch(entry)
        else:
            lora.update(kohya_lora_tensors(name, entry))
            to_load[name] = key_map[name]
    return {**(load_lora(lora, to_load) if lora else {}), **lie}


def patch_targets(adapter, targets, load_lora, lie_patch, add) -> dict:
    """Patch several targets of one host (its UNet and its text encoders) all or nothing.

    `targets`: (model, components, key_map, weights, strength) each; every target's patches are built and
    checked first, then `add(model, patches, strength)` returns the patched clone. Returns {id(model): clone}.
    """
    adapter = as_lie_file(adapter)
    patches = [host_patches(adapter, key_map, weights, strength, components, load_lora, lie_patch)
               for _, components, key_map, weights, strength in targets]
    if targets and not any(patches):
        raise ValueError(f"{adapter.path}: holds adapters for {adapter.components}, none of which this loader patches.")
    return {id(model): add(model, found, strength) for (model, *_, strength), found in zip(targets, patches)}
