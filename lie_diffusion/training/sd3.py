"""Stable Diffusion 3 / 3.5: two CLIP text encoders (penultimate hidden states side by side, pooled embeddings
concatenated) and a T5 encoder whose tokens follow CLIP's (T5 never trains); optional EDM-style
preconditioning of the outputs."""

from __future__ import annotations

import functools

import torch

from .model_card import ModelFamily

FAMILY = ModelFamily("Stable Diffusion 3", "StableDiffusion3Pipeline", ("sd3", "sd3-diffusers", "template:sd-lora"),
                     "dreambooth-lie-sd3", denoiser="transformer", dtype="bfloat16")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


class PromptEncoder:
    """(token embeddings: CLIP's, zero-padded to T5's width, then T5's; pooled: both CLIPs') of a batch's prompts.

    T5 runs once per distinct prompt for the run (it is frozen); the CLIPs too, unless they train (`cache=False`)."""

    def __init__(self, tokenizers, device, max_sequence_length, cache):
        self.tokenizers, self.device, self.max_sequence_length = tokenizers, device, max_sequence_length
        self.cache, self.clip_cache, self.t5_cache = cache, {}, {}

    def _ids(self, tokenizer, prompt, length):
        return tokenizer(prompt, padding="max_length", max_length=length, truncation=True,
                         return_tensors="pt").input_ids.to(self.device)

    @functools.cache
    def clip_ids(self, prompt):
        return [self._ids(tokenizer, prompt, tokenizer.model_max_length) for tokenizer in self.tokenizers[:2]]

    def _clip(self, clips, prompt):
        if prompt in self.clip_cache:
            return self.clip_cache[prompt]
        hidden, pooled = [], []
        for clip, ids in zip(clips, self.clip_ids(prompt)):
            output = clip(ids, output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled.append(output[0])  # the projected pooled embedding (text_embeds)
        encoded = torch.cat(hidden, dim=-1), torch.cat(pooled, dim=-1)
        if self.cache:
            self.clip_cache[prompt] = encoded
        return encoded

    @torch.no_grad()
    def _t5(self, t5, prompt):
        if prompt not in self.t5_cache:
            self.t5_cache[prompt] = t5(self._ids(self.tokenizers[2], prompt, self.max_sequence_length))[0]
        return self.t5_cache[prompt]

    def __call__(self, text_encoders, prompts):
        *clips, t5 = text_encoders
        embeds, pooled = [], []
        for prompt in prompts:
            clip_hidden, clip_pooled = self._clip(clips, prompt)
            t5_hidden = self._t5(t5, prompt)
            clip_hidden = torch.nn.functional.pad(clip_hidden, (0, t5_hidden.shape[-1] - clip_hidden.shape[-1]))
            embeds.append(torch.cat([clip_hidden, t5_hidden], dim=-2))
            pooled.append(clip_pooled)
        return torch.cat(embeds), torch.cat(pooled)
