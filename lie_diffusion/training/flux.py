"""Flux.1: a CLIP text encoder gives the pooled embedding, a T5 encoder the token embeddings (T5 never trains);
latents are packed into 2x2 patches with their positions; FLUX.1-dev is distilled on a guidance scale."""

from __future__ import annotations

import torch
from diffusers import FluxPipeline

from .model_card import ModelFamily
from .prompts import ClipT5Prompts

FAMILY = ModelFamily("Flux.1", "FluxPipeline", ("flux", "flux-diffusers", "template:sd-lora"), "dreambooth-lie-flux",
                     denoiser="transformer", dtype="bfloat16")


class PromptEncoder(ClipT5Prompts):
    """(T5 token embeddings, CLIP pooled embedding, text position ids) of a batch's prompts."""

    def encode_clip(self, clips, ids):
        return clips[0](ids[0], output_hidden_states=False).pooler_output

    def __call__(self, text_encoders, prompts, dtype):
        clip, t5 = text_encoders
        prompt_embeds = torch.cat([self.t5(t5, prompt) for prompt in prompts])
        pooled = torch.cat([self.clip([clip], prompt) for prompt in prompts])
        text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=self.device, dtype=dtype)
        return prompt_embeds, pooled, text_ids


def pack(latents):
    """(the latents as a sequence of 2x2 patches, each patch's (0, row, column) position id)."""
    batch, channels, height, width = latents.shape
    packed = FluxPipeline._pack_latents(latents, batch, channels, height, width)
    ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, latents.device, latents.dtype)
    return packed, ids


def unpack(sequence, like):
    """The inverse of `pack`: a patch sequence back to latents shaped `like` (sizes in latent pixels)."""
    return FluxPipeline._unpack_latents(sequence, like.shape[2], like.shape[3], vae_scale_factor=1)


def guidance(transformer, args, batch_size, device):
    """FLUX.1-dev's distilled guidance scale as an input (`--guidance_scale`); None for models without it."""
    if not transformer.config.guidance_embeds:
        return None
    return torch.full((batch_size,), args.guidance_scale, device=device)
