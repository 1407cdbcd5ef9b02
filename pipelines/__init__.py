"""Pipeline-level API for lie-diffusion adapters.

`LieLoaderMixin` adds `load_lie_weights` & co. to any diffusers pipeline class with a LoRA loader;
`lie_stable_diffusion/` is the same as a community pipeline folder for `custom_pipeline=`.
"""

from .lie_stable_diffusion.lie_loader import LieLoaderMixin
from .lie_stable_diffusion.pipeline import LieStableDiffusionPipeline

__all__ = ["LieLoaderMixin", "LieStableDiffusionPipeline"]
