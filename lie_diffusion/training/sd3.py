"""Stable Diffusion 3 / 3.5: two CLIP text encoders (penultimate hidden states side by side, pooled embeddings
concatenated) and a T5 encoder whose tokens follow CLIP's (T5 never trains)."""

from __future__ import annotations

import torch

from .model_card import ModelFamily
from .prompts import ClipT5Prompts

FAMILY = ModelFamily("Stable Diffusion 3", "StableDiffusion3Pipeline", ("sd3", "sd3-diffusers", "template:sd-lora"),
                     "dreambooth-lie-sd3", denoiser="transformer", dtype="bfloat16")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


class PromptEncoder(ClipT5Prompts):
    """(token embeddings: both CLIPs' penultimate hidden states side by side, zero-padded to T5's width, then T5's;
    pooled: both CLIPs' projected embeddings) of a batch's prompts."""

    def encode_clip(self, clips, ids):
        hidden, pooled = [], []
        for clip, clip_ids in zip(clips, ids):
            output = clip(clip_ids, output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled.append(output[0])  # the projected pooled embedding (text_embeds)
        return torch.cat(hidden, dim=-1), torch.cat(pooled, dim=-1)

    def __call__(self, text_encoders, prompts):
        *clips, t5 = text_encoders
        embeds, pooled = [], []
        for prompt in prompts:
            clip_hidden, clip_pooled = self.clip(clips, prompt)
            t5_hidden = self.t5(t5, prompt)
            clip_hidden = torch.nn.functional.pad(clip_hidden, (0, t5_hidden.shape[-1] - clip_hidden.shape[-1]))
            embeds.append(torch.cat([clip_hidden, t5_hidden], dim=-2))
            pooled.append(clip_pooled)
        return torch.cat(embeds), torch.cat(pooled)
