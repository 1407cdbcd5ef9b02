"""Small, real text-to-image pipelines on colour emoji (Stable Diffusion, pretrained and shipped; Flux, its script),
their data set and their judge."""

from lie_diffusion.emoji.classifier import load_classifier
from lie_diffusion.emoji.data import HELD_OUT, load_renders
from lie_diffusion.emoji.pipeline import (pretrained_emoji_path, pretrained_emoji_pipeline, sampling_kwargs,
                                          trained_classes)

__all__ = ["HELD_OUT", "load_classifier", "load_renders", "pretrained_emoji_path", "pretrained_emoji_pipeline",
           "sampling_kwargs", "trained_classes"]
