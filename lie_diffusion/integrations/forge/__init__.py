"""Forge extension: `<lora:name:0.7>` with a lie-diffusion file gives the Lie model at 0.7, exactly.

Forge applies LoRA files through a ComfyUI-style patcher (SD1/SDXL UNets, Flux transformers). This extension
registers a "lie" weight calculator (W ⊙ exp(t·sΔ) in float32) and routes lie-diffusion files, told apart by
their metadata, to `load_lie_for_models`, so Forge's own loader never sees (and never rejects) their `lie.` keys;
every other file takes Forge's usual path. Install with `lie-diffusion install forge PATH/TO/forge`. Forge (AGPL) is
imported only inside these functions, when Forge runs them.
"""

from __future__ import annotations

from lie_diffusion.hosts import TEXT_ENCODERS, UNET, LiePatch, is_lie_file, patch_targets

PATCH_TYPE = "lie"


def lie_patch(entry, layout=None) -> tuple[str, LiePatch]:
    """A patch value Forge's merge_lora_to_weight hands to extra_weight_calculators[PATCH_TYPE]."""
    return PATCH_TYPE, LiePatch(entry, layout)


def calculate(weight, strength, patch: LiePatch):
    """Forge's calculator signature; `weight` arrives in Forge's computation dtype, maybe a view of rows of a fused
    Flux weight (updated in place: Forge keeps the full tensor). Forge does not pass the key's row order
    function to calculators, so the patch carries it."""
    return patch.calculate_weight(weight, None, strength, 1.0, None, patch.layout or (lambda rows: rows))


def load_lie_for_models(model, clip, filename, strength_model, strength_clip, online_mode=False):
    """Forge's `load_lora_for_models` for a lie-diffusion file: clones of (model, clip) with its patches."""
    from backend.patcher.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet

    def load_lora_section(lora, to_load):
        patches, unmatched = load_lora(lora, to_load)
        if unmatched:
            raise RuntimeError(f"{filename}: Forge did not take LoRA keys {sorted(unmatched)[:3]} (please report).")
        return patches

    def add(target, patches, strength):
        clone = target.clone()
        clone.add_patches(filename=str(filename), patches=patches, strength_patch=strength, online_mode=online_mode)
        return clone

    targets = []
    if model is not None and strength_model != 0:
        targets.append((model, UNET, model_lora_keys_unet(model.model, {}), model.model.state_dict(), strength_model))
    if clip is not None and strength_clip != 0:
        stage = clip.cond_stage_model
        targets.append((clip, TEXT_ENCODERS, model_lora_keys_clip(stage, {}), stage.state_dict(), strength_clip))
    patched = patch_targets(filename, targets, load_lora_section, lie_patch, add)
    return patched.get(id(model), model), patched.get(id(clip), clip)


def install_hooks() -> None:
    """Register the calculator and route lie-diffusion files in Forge's LoRA extension (idempotent)."""
    import networks  # Forge's built-in LoRA extension
    from backend.patcher.lora import extra_weight_calculators

    extra_weight_calculators[PATCH_TYPE] = calculate
    forge_load = getattr(networks.load_lora_for_models, "forge_original", networks.load_lora_for_models)

    def load_lora_for_models(model, clip, lora, strength_model, strength_clip, filename="default", online_mode=False):
        if is_lie_file(filename):
            return load_lie_for_models(model, clip, filename, strength_model, strength_clip, online_mode)
        return forge_load(model, clip, lora, strength_model, strength_clip, filename=filename, online_mode=online_mode)

    load_lora_for_models.forge_original = forge_load
    networks.load_lora_for_models = load_lora_for_models
