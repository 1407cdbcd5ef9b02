"""The host-free core of the ComfyUI, Forge and A1111 loaders: a lie-diffusion file → the patches a host applies.

The hosts hold SD models in the LDM/SGM layout and find a LoRA's layers through kohya key names, so each
module is named the way `export` names it (the UNet fingerprint in the file tells SD1/2 from SDXL). Flux and SD3
transformers they hold in the original checkpoints' layout and find through diffusers' names, mapped to a weight
or to rows of a fused one (q, k, v; Flux's single-block q, k, v and MLP), which the patch then updates in place. Lie
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

from .naming import dit_family, dit_host_name, is_sdxl, kohya_name
from .functional import LieFactor, lie_update
from .io import METADATA_KEY, LieFile, ModuleEntry, check_adapted_finite, read_lie_file, resolve_weight_file

UNET = ("unet", "transformer")  # the host's MODEL
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


class LiePatch:
    """One Lie module as a weight patch. `calculate_weight` has the call signature of ComfyUI's
    `WeightAdapterBase.calculate_weight`; the ComfyUI glue makes a subclass that is also one."""

    name = "lie"  # ComfyUI names the adapter in its warnings

    def __init__(self, entry: ModuleEntry, layout: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.entry = entry
        self.layout = layout  # the host's row order of the module's weight (see `host_weight`), or None

    def update(self, weight: torch.Tensor, strength: float) -> torch.Tensor:
        """ΔW = W ⊙ expm1(t·sΔ) (exp) or t·s·W ⊙ Δ (taylor) at strength t, in float32: hosts that add patches
        (W + ΔW) then get the exact Lie model at t."""
        entry = self.entry
        factor = LieFactor(entry.A.to(weight.device), entry.B.to(weight.device), strength * entry.scaling, entry.mode)
        return lie_update(weight.float(), factor)

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weights=None):
        """W ← W + function(ΔW), summed in float32 and rounded once to W's dtype (fp16/bf16 in ComfyUI's low-VRAM
        path). `function` maps the module's rows to the host's order and back (it swaps halves, its own inverse),
        so ΔW is computed on function(W), the module's weight. In place: for a module stored as rows of a fused
        weight, ComfyUI and Forge pass a view of those rows and then keep the full tensor, ignoring the result."""
        return weight.copy_(weight.float() + function(self.update(function(weight), strength)))


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
    """Host key stem → module, for the file's modules of `components`; and the modules the hosts cannot name.
    kohya names for SD UNets (`sgm_unet`: SGM names for every layout, see `naming.kohya_name`); diffusers names
    for Flux/SD3 pipelines (`naming.dit_host_name`)."""
    config, transformer = base_config(adapter), transformer_config(adapter)
    names, problems = {}, []
    for entry in adapter.modules:
        if entry.component in components:
            try:
                names[dit_host_name(entry.component, entry.module, transformer) if transformer
                      else kohya_name(entry.component, entry.module, config, sgm_unet)] = entry
            except ValueError as error:
                problems.append(str(error))
    return names, problems


def base_config(adapter: LieFile) -> dict:
    """The UNet config entries the file was saved for (its fingerprint; empty for files saved without a UNet)."""
    return ((adapter.info or {}).get("fingerprint") or {}).get("unet") or {}


def transformer_config(adapter: LieFile) -> dict:
    """The Flux/SD3 transformer config entries the file was saved for (empty for an SD file)."""
    return ((adapter.info or {}).get("fingerprint") or {}).get("transformer") or {}


def refuse(adapter: LieFile, problems: list[str]) -> None:
    """One error for every module that does not fit, with the base model the file was saved for."""
    if not problems:
        return
    config, transformer = base_config(adapter), transformer_config(adapter)
    hint = ""
    if transformer:
        width = transformer.get("num_attention_heads", 0) * transformer.get("attention_head_dim", 0)
        blocks = (f"{transformer.get('num_layers')} double-stream and {transformer['num_single_layers']} single-stream"
                  if "num_single_layers" in transformer else transformer.get("num_layers"))
        hint = (f" (the file was saved for a {dit_family(transformer).upper()} transformer of width {width}: "
                f"{blocks} blocks)")
    elif config:
        family = "SDXL" if is_sdxl(config) else "SD 1.x/2.x"
        hint = f" (the file was saved for an {family} UNet, block_out_channels {config.get('block_out_channels')})"
    shown = "; ".join(problems[:5]) + (f"; ... (+{len(problems) - 5} more)" if len(problems) > 5 else "")
    raise ValueError(f"{adapter.path}: does not fit this model{hint}: {shown}.")


def kohya_lora_tensors(name: str, entry: ModuleEntry) -> dict[str, torch.Tensor]:
    """A LoRA-section module as the tensors of a kohya LoRA file, which every host's own LoRA loader reads."""
    return {f"{name}.lora_down.weight": entry.A, f"{name}.lora_up.weight": entry.B,
            f"{name}.alpha": torch.tensor(entry.alpha)}


def host_weight(weights: Mapping[str, torch.Tensor], key) -> torch.Tensor | None:
    """The weight of one module in a host's model, as the module has it; None if the model has no such key.

    `key`: a model key, or ComfyUI's and Forge's (model key, (dim, start, length), function) for a module stored
    as rows of a fused weight (a view of them: writes reach the full tensor) or in another row order (function:
    that order, its own inverse; None or absent if the same)."""
    if isinstance(key, str):
        return weights.get(key)
    weight, offset, layout = weights.get(key[0]), key[1], host_layout(key)
    if weight is None:
        return None
    weight = weight if offset is None else weight.narrow(*offset)
    return weight if layout is None else layout(weight)


def host_layout(key):
    """The row order function of a host key (see `host_weight`), or None."""
    return key[2] if not isinstance(key, str) and len(key) > 2 else None


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

    `key_map`: host name → model key (the host's model_lora_keys_unet / _clip; see `host_weight`); `weights`: the
    model's state dict (shapes, and finiteness at `strength`); `load_lora`: the host's loader for kohya LoRA
    tensors, which makes the LoRA section the host's own LoRA patches; `lie_patch`: (module, the key's row order
    function or None) → the host's Lie patch value.
    """
    adapter = as_lie_file(adapter)
    names, problems = kohya_names(adapter, components)

    def layer_of(name):
        weight = host_weight(weights, key_map[name]) if name in key_map else None
        return None if weight is None else (weight, strength)

    check_fit(adapter, names, problems, layer_of)
    lora, to_load, lie = {}, {}, {}
    for name, entry in names.items():
        if entry.section == "lie":
            lie[key_map[name]] = lie_patch(entry, host_layout(key_map[name]))
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
