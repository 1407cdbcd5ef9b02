"""Prompt encodings of the CLIP + T5 families (Flux, SD3): each image's prompt comes with its batch."""

from __future__ import annotations

import torch


class ClipT5Prompts:
    """Encodes prompts one distinct prompt at a time and keeps what does not change: T5's embeddings for the whole
    run (T5 never trains), the CLIP part too unless CLIP trains (`cache=False`). A family says how its CLIP
    encoders are read (`encode_clip`) and how the parts condition its transformer (`__call__`)."""

    def __init__(self, tokenizers, device, max_sequence_length, cache):
        *self.clip_tokenizers, self.t5_tokenizer = tokenizers
        self.device, self.max_sequence_length, self.cache = device, max_sequence_length, cache
        self.clip_cache, self.t5_cache = {}, {}

    def ids(self, tokenizer, prompt, length):
        return tokenizer(prompt, padding="max_length", max_length=length, truncation=True,
                         return_tensors="pt").input_ids.to(self.device)

    def encode_clip(self, clips, ids):
        raise NotImplementedError

    def clip(self, clips, prompt):
        if prompt in self.clip_cache:
            return self.clip_cache[prompt]
        ids = [self.ids(tokenizer, prompt, tokenizer.model_max_length) for tokenizer in self.clip_tokenizers]
        encoded = self.encode_clip(clips, ids)
        if self.cache:
            self.clip_cache[prompt] = encoded
        return encoded

    @torch.no_grad()
    def t5(self, t5, prompt):
        if prompt not in self.t5_cache:
            self.t5_cache[prompt] = t5(self.ids(self.t5_tokenizer, prompt, self.max_sequence_length))[0]
        return self.t5_cache[prompt]
