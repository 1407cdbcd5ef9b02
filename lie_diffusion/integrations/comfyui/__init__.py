"""ComfyUI nodes that load lie-diffusion files exactly: "Load Lie Adapter" (MODEL + CLIP) and a model-only variant.

Lie layers become patches computing W ⊙ exp(t·sΔ) at the node's strength t; the file's LoRA section loads the
way ComfyUI loads any LoRA. SD1/2/SDXL UNets, Flux.1 and SD3/SD3.5 transformers (where a diffusers module can
be rows of a fused weight, patched in place). Install with `lie-diffusion install comfyui PATH/TO/ComfyUI`, with
lie-diffusion installed in ComfyUI's Python. ComfyUI (GPL) is imported only inside these functions, when ComfyUI
runs them.
"""

from __future__ import annotations

import functools
import os

from lie_diffusion.hosts import TEXT_ENCODERS, UNET, LiePatch, as_lie_file, patch_targets


@functools.cache
def lie_weight_adapter() -> type[LiePatch]:
    """LiePatch as a `WeightAdapterBase`, the type ComfyUI's calculate_weight hands the weight to."""
    from comfy.weight_adapter import WeightAdapterBase

    return type("LieWeightAdapter", (LiePatch, WeightAdapterBase), {"__doc__": LiePatch.__doc__})


def load_lie_adapter(model, clip, adapter, strength_model: float, strength_clip: float):
    """(model, clip) with the adapter's patches added to clones; checks everything before patching either."""
    import comfy.lora

    targets = []
    if model is not None and strength_model != 0:
        keys, weights = comfy.lora.model_lora_keys_unet(model.model, {}), model.model.state_dict()
        targets.append((model, UNET, keys, weights, strength_model))
    if clip is not None and strength_clip != 0:
        keys, weights = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}), clip.cond_stage_model.state_dict()
        targets.append((clip, TEXT_ENCODERS, keys, weights, strength_clip))
    patched = patch_targets(adapter, targets, comfy.lora.load_lora, lie_weight_adapter(), _add_to_clone)
    return patched.get(id(model), model), patched.get(id(clip), clip)


def _add_to_clone(model, patches, strength):
    clone = model.clone()
    clone.add_patches(patches, strength)
    return clone


class LieAdapterLoader:
    """Like ComfyUI's LoRA loader, for lie-diffusion files: exact at every strength, composes with other LoRAs."""

    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "load"
    CATEGORY = "loaders"
    DESCRIPTION = ("Applies a lie-diffusion adapter exactly: Lie layers as W ⊙ exp(strength · sΔ), LoRA layers as "
                   "any LoRA. A negative strength undoes the adapter.")

    def __init__(self):
        self.loaded = None  # (path, mtime, parsed file): a strength change does not re-read the file

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        strength = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}
        return {"required": {
            "model": ("MODEL",),
            "clip": ("CLIP",),
            "lora_name": (folder_paths.get_filename_list("loras"), {"tooltip": "A lie-diffusion .safetensors file."}),
            "strength_model": ("FLOAT", strength),
            "strength_clip": ("FLOAT", strength),
        }}

    def read(self, lora_name: str):
        import folder_paths

        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        stamp = (path, os.path.getmtime(path))
        if self.loaded is None or self.loaded[0] != stamp:
            self.loaded = (stamp, as_lie_file(path))
        return self.loaded[1]

    def load(self, model, clip, lora_name, strength_model, strength_clip):
        return load_lie_adapter(model, clip, self.read(lora_name), strength_model, strength_clip)


class LieAdapterLoaderModelOnly(LieAdapterLoader):
    """The UNet or transformer part only (text-encoder modules of the file are left out)."""

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load_model_only"

    @classmethod
    def INPUT_TYPES(cls):
        required = super().INPUT_TYPES()["required"]
        return {"required": {key: required[key] for key in ("model", "lora_name", "strength_model")}}

    def load_model_only(self, model, lora_name, strength_model):
        return (load_lie_adapter(model, None, self.read(lora_name), strength_model, 0)[0],)


NODE_CLASS_MAPPINGS = {"LieAdapterLoader": LieAdapterLoader, "LieAdapterLoaderModelOnly": LieAdapterLoaderModelOnly}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LieAdapterLoader": "Load Lie Adapter (lie-diffusion)",
    "LieAdapterLoaderModelOnly": "Load Lie Adapter, model only (lie-diffusion)",
}
