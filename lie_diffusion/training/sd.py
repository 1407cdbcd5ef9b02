"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, whose last hidden states condition the UNet."""

from __future__ import annotations

import functools

import torch

from .model_card import ModelFamily

FAMILY = ModelFamily(
    "Stable Diffusion", "DiffusionPipeline", ("stable-diffusion", "stable-diffusion-diffusers"), "dreambooth-lie"
)


class PromptEncoder:
    """Each image's prompt (its caption, or the instance / class prompt) comes with the batch: tokenize each
    distinct prompt once, encode the batch every step (the text encoder may be training)."""

    def __init__(self, tokenizer, device):
        self.tokenizer, self.device = tokenizer, device

    @functools.cache
    def ids(self, prompt):
        return self.tokenizer(
            prompt, truncation=True, padding="max_length", max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids.to(self.device)

    def __call__(self, text_encoder, prompts):
        """The hidden states that condition the UNet, one row per prompt."""
        input_ids = torch.cat([self.ids(prompt) for prompt in prompts])
        return text_encoder(input_ids, return_dict=False)[0]
