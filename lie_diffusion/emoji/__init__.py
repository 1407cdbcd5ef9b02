"""A small, real, pretrained Stable Diffusion pipeline on colour emoji, its data set and its judge."""

from lie_diffusion.emoji.classifier import load_classifier
from lie_diffusion.emoji.data import HELD_OUT, load_renders
from lie_diffusion.emoji.pipeline import pretrained_emoji_path, pretrained_emoji_pipeline, trained_classes

__all__ = ["HELD_OUT", "load_classifier", "load_renders", "pretrained_emoji_path", "pretrained_emoji_pipeline",
           "trained_classes"]
