"""A StableDiffusionXLPipeline that loads lie-diffusion adapter files, as a diffusers community pipeline.

pipe = DiffusionPipeline.from_pretrained(
    sdxl_base, custom_pipeline="<lie-diffusion>/pipelines/lie_stable_diffusion_xl", trust_remote_code=True
)
pipe.load_lie_weights("path/to/adapter")   # UNet, text_encoder and text_encoder_2 sections

The class lives in the installed package (`pip install lie-diffusion`); this folder only names it.
"""

from lie_diffusion.pipelines import COMMUNITY_PIPELINES, LieStableDiffusionXLPipeline

# diffusers runs every local community `pipeline.py` into one cached module: drop the classes a previous
# load of another lie-diffusion folder left there, or it finds two pipeline classes and refuses.
for _other in set(COMMUNITY_PIPELINES) - {"LieStableDiffusionXLPipeline"}:
    globals().pop(_other, None)

__all__ = ["LieStableDiffusionXLPipeline"]
