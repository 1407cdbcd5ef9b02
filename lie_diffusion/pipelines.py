"""Lie adapter methods for diffusers pipelines, named after diffusers' LoRA methods.

Mix `LieLoaderMixin` into a pipeline class that has diffusers' LoRA loader (every Stable Diffusion
and SDXL pipeline does), before it in the bases:

    class MyPipeline(LieLoaderMixin, StableDiffusionXLPipeline): ...

or use the ready-made `LieStableDiffusionPipeline` / `LieStableDiffusionXLPipeline`. Lie adapters are
peft LoRA layers underneath, so diffusers' own `fuse_lora`, `set_adapters`, `disable_lora` and
`unload_lora_weights` act on them as well; the methods here add loading from lie-diffusion files and
a scale setter that leaves the set of active adapters alone.

This module is part of the installed package; the community pipeline folders in the repository's
`pipelines/` import their classes from here.
"""

from __future__ import annotations

from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from peft.tuners.lora import LoraLayer

from .io import load_lie_weights


class LieLoaderMixin:
    """`load_lie_weights`, `fuse_lie`, `unfuse_lie`, `set_lie_scale`, `unload_lie_weights`."""

    def load_lie_weights(self, path_or_dir, adapter_name: str | None = None, scale: float = 1.0, weight_name=None):
        """Load a lie-diffusion (or plain peft-style LoRA) file as a new adapter; it becomes the active one.

        `adapter_name=None` picks "default", then "default_1", ... like diffusers' `load_lora_weights`.
        """
        if adapter_name is None:
            taken = {name for names in self.get_list_adapters().values() for name in names}
            adapter_name, index = "default", 0
            while adapter_name in taken:
                index += 1
                adapter_name = f"default_{index}"
        load_lie_weights(self, path_or_dir, adapter_name=adapter_name, scale=scale, weight_name=weight_name)

    def fuse_lie(self, components=None, lie_scale: float = 1.0, safe_fusing: bool = False, adapter_names=None):
        """Fold the active (or named) adapters into the weights: W ⊙ exp(sΔ) for Lie, W + sBA for LoRA."""
        self.fuse_lora(
            components=components or self._lora_loadable_modules,
            lora_scale=lie_scale,
            safe_fusing=safe_fusing,
            adapter_names=adapter_names,
        )

    def unfuse_lie(self, components=None):
        """Undo `fuse_lie` exactly (Lie layers divide their multipliers back out)."""
        self.unfuse_lora(components=components or self._lora_loadable_modules)

    def set_lie_scale(self, scale: float, adapter_names: list[str] | str | None = None):
        """Set the strength of the named (default: all) adapters without changing which are active.

        Refused while adapters are fused: the fused weights would no longer match the recorded scale.
        """
        names = [adapter_names] if isinstance(adapter_names, str) else adapter_names
        layers = [
            module
            for component in self._lora_loadable_modules
            if getattr(self, component, None) is not None
            for module in getattr(self, component).modules()
            if isinstance(module, LoraLayer)
        ]
        if any(layer.merged for layer in layers):
            raise ValueError("Adapters are fused; call unfuse_lie() before set_lie_scale().")
        known = {name for layer in layers for name in layer.scaling}
        unknown = sorted(set(names or ()) - known)
        if unknown:
            raise ValueError(f"No adapter named {unknown} is loaded (loaded: {sorted(known)}).")
        for layer in layers:
            for name in names or list(layer.scaling):
                layer.set_scale(name, scale)

    def unload_lie_weights(self):
        """Remove every adapter; fused ones stay folded into the weights (as with `unload_lora_weights`)."""
        self.unload_lora_weights()


class LieStableDiffusionPipeline(LieLoaderMixin, StableDiffusionPipeline):
    """Stable Diffusion 1.x / 2.x plus `load_lie_weights`, `fuse_lie`, `unfuse_lie`, `set_lie_scale`, ..."""


class LieStableDiffusionXLPipeline(LieLoaderMixin, StableDiffusionXLPipeline):
    """Stable Diffusion XL plus `load_lie_weights`, `fuse_lie`, ...; adapters on the UNet and both text encoders."""
