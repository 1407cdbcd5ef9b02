"""A FluxPipeline (Flux.1 dev / schnell) that loads lie-diffusion adapter files, as a diffusers community pipeline.

pipe = DiffusionPipeline.from_pretrained(
    "black-forest-labs/FLUX.1-dev", custom_pipeline="<lie-diffusion>/pipelines/lie_flux", trust_remote_code=True
)
pipe.load_lie_weights("path/to/adapter")   # transformer and text_encoder (CLIP) sections

The class lives in the installed package (`pip install lie-diffusion`); this folder only names it.
"""

from lie_diffusion.pipelines import COMMUNITY_PIPELINES, LieFluxPipeline

# diffusers runs every local community `pipeline.py` into one cached module: drop the classes a previous
# load of another lie-diffusion folder left there, or it finds two pipeline classes and refuses.
for _other in set(COMMUNITY_PIPELINES) - {"LieFluxPipeline"}:
    globals().pop(_other, None)

__all__ = ["LieFluxPipeline"]
