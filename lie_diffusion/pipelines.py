"""Lie adapter methods for diffusers pipelines, named after diffusers' LoRA methods.

Mix `LieLoaderMixin` into a pipeline class that has diffusers' LoRA loader (every Stable Diffusion,
SDXL, Flux.1 and SD3/SD3.5 pipeline does), before it in the bases:

    class MyPipeline(LieLoaderMixin, StableDiffusionXLPipeline): ...

or use the ready-made `LieStableDiffusionPipeline`, `LieStableDiffusionXLPipeline`, `LieFluxPipeline`,
`LieStableDiffusion3Pipeline`. Lie adapters are
peft LoRA layers underneath, so diffusers' own `fuse_lora`, `set_adapters`, `disable_lora` and
`unload_lora_weights` act on them as well; the methods here add loading from lie-diffusion files and
a scale setter that leaves the set of active adapters alone.

This module is part of the installed package; the community pipeline folders in the repository's
`pipelines/` import their classes from here.
"""

from __future__ import annotations

from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from peft.tuners.lora import LoraLayer

from .inject import merge_lie_weights
from .io import WEIGHT_NAME, load_lie_weights, save_lie_weights

# The classes the community pipeline folders name (each folder drops the others from diffusers' shared module).
COMMUNITY_PIPELINES = ("LieStableDiffusionPipeline", "LieStableDiffusionXLPipeline", "LieFluxPipeline",
                       "LieStableDiffusion3Pipeline")


class LieLoaderMixin:
    """`load_lie_weights`, `save_lie_weights`, `merge_lie_weights`, `fuse_lie`, `unfuse_lie`, `set_lie_scale`,
    `unload_lie_weights`."""

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

    def save_lie_weights(self, save_directory, adapter_name: str = "default", weight_name: str = WEIGHT_NAME):
        """Write adapter `adapter_name` of every component that carries it (UNet or transformer, text encoders)."""
        models = {component: getattr(self, component, None) for component in self._lora_loadable_modules}
        models = {c: m for c, m in models.items() if adapter_name in (getattr(m, "peft_config", None) or {})}
        if not models:
            raise ValueError(f"No component of {type(self).__name__} has an adapter named {adapter_name!r}.")
        return save_lie_weights(save_directory, adapter_name=adapter_name, weight_name=weight_name, **models)

    def merge_lie_weights(self, adapter_names: list[str] | None = None):
        """Fold the active (or named) adapters into the weights for good and drop the adapter layers."""
        merge_lie_weights(self, adapter_names)

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


class LieFluxPipeline(LieLoaderMixin, FluxPipeline):
    """Flux.1 plus `load_lie_weights`, `fuse_lie`, ...; adapters on the transformer and the CLIP text encoder."""


class LieStableDiffusion3Pipeline(LieLoaderMixin, StableDiffusion3Pipeline):
    """SD3 / SD3.5 plus `load_lie_weights`, `fuse_lie`, ...; adapters on the transformer and both CLIP encoders."""
