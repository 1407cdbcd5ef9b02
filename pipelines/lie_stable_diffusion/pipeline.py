"""A StableDiffusionPipeline that loads lie-diffusion adapter files, as a diffusers community pipeline.

pipe = DiffusionPipeline.from_pretrained(
    base, custom_pipeline="<lie-diffusion>/pipelines/lie_stable_diffusion", trust_remote_code=True
)
pipe.load_lie_weights("path/to/adapter")   # then fuse_lie, set_lie_scale, unload_lie_weights, ...
"""

from diffusers import StableDiffusionPipeline

from .lie_loader import LieLoaderMixin


class LieStableDiffusionPipeline(LieLoaderMixin, StableDiffusionPipeline):
    """Stable Diffusion 1.x / 2.x plus `load_lie_weights`, `fuse_lie`, `unfuse_lie`, `set_lie_scale`, ..."""
