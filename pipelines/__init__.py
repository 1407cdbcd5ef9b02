"""diffusers community pipeline folders (`custom_pipeline=".../pipelines/<folder>"`).

The classes live in the installed package, `lie_diffusion.pipelines`; they are re-exported here so
that `from pipelines import LieLoaderMixin` keeps working in a checkout.
"""

from lie_diffusion.pipelines import (
    LieFluxPipeline,
    LieLoaderMixin,
    LieStableDiffusion3Pipeline,
    LieStableDiffusionPipeline,
    LieStableDiffusionXLPipeline,
)

__all__ = [
    "LieFluxPipeline",
    "LieLoaderMixin",
    "LieStableDiffusion3Pipeline",
    "LieStableDiffusionPipeline",
    "LieStableDiffusionXLPipeline",
]
