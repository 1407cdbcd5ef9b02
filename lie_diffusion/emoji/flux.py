"""The tiny emoji Flux pipeline: FLUX.1's architecture at toy width, made to be pretrained on the emoji data.

Real diffusers/transformers classes, so every Flux Lie target exists: a `FluxTransformer2DModel` with double-
(joint text/image) and single-stream blocks and RoPE over (0, row, column) ids; a `CLIPTextModel` (the SD emoji
model's width and byte-level tokenizer) whose pooled output conditions the modulation; a byte-level T5 encoder
(ByT5's tokenizer, which needs no files) whose token embeddings are the text stream; and the shipped SD emoji
model's VAE. That VAE's 16x16x4 latents pack into 8x8 tokens of 2x2x4 = 16 channels exactly as FLUX.1's 16-channel
latents pack into 64: the layout fits, both emoji models then share one pixel decoder (results compare), and
pretraining spends its CPU time on the transformer. Its `shift_factor` and `scaling_factor` are measured on the
emoji data (Flux normalises latents by both). Sampling: FLUX.1's flow-matching Euler scheduler with its
resolution-dependent shift. `train_scripts/pretrain_tiny_emoji_flux.py` trains it.
"""

from __future__ import annotations

import math

import torch

from lie_diffusion.emoji.pipeline import MAX_LENGTH, TEXT_CONFIG

T5_CONFIG = dict(vocab_size=384, d_model=96, d_kv=24, d_ff=256, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=16, feed_forward_proj="gated-gelu")
TRANSFORMER_CONFIG = dict(
    # width 96 with 2 double- and 2 single-stream blocks costs a CPU step what the SD emoji UNet costs (width 128
    # with 2 + 4 blocks, twice as much), so both models see the same pictures in the same time
    patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=24, num_attention_heads=4,
    joint_attention_dim=T5_CONFIG["d_model"], pooled_projection_dim=TEXT_CONFIG["hidden_size"],
    axes_dims_rope=(8, 8, 8),  # (unused text axis, row, column); they sum to the head dim
    # FLUX.1-dev learns its guidance embedding by distillation from a guided teacher; trained from scratch there is
    # no teacher, so this model is guided the classic way (true classifier-free guidance, 10% empty captions).
    guidance_embeds=False,
)
# FLUX.1's sampler: the shift grows with the image's token count (mu, interpolated between these two sizes)
SCHEDULER_CONFIG = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                        base_image_seq_len=256, max_image_seq_len=4096)


def build_components(vae, seed: int = 0) -> dict:
    """Fresh, randomly initialised transformer / text encoders around a trained `vae`, and the sampler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import ByT5Tokenizer, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return dict(
        vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)),
        text_encoder_2=T5EncoderModel(T5Config(**T5_CONFIG)),
        tokenizer_2=ByT5Tokenizer(model_max_length=MAX_LENGTH),
        transformer=FluxTransformer2DModel(**TRANSFORMER_CONFIG),
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
    )


def training_shift(scheduler, image_seq_len: int) -> float:
    """The σ shift FluxPipeline samples `image_seq_len`-token images with (exp(mu)); training draws its σ with the
    same shift, so what the model learns most is where the sampler spends its steps."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = scheduler.config
    return math.exp(calculate_shift(image_seq_len, config.base_image_seq_len, config.max_image_seq_len,
                                    config.base_shift, config.max_shift))


def encode_prompts(tokenizer, text_encoder, tokenizer_2, text_encoder_2, prompts: list[str], device):
    """(T5 token embeddings, CLIP pooled embedding), padded as FluxPipeline pads them at MAX_LENGTH tokens."""
    def ids(tok):
        return tok(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                   return_tensors="pt").input_ids.to(device)

    pooled = text_encoder(ids(tokenizer), output_hidden_states=False).pooler_output
    return text_encoder_2(ids(tokenizer_2), output_hidden_states=False)[0], pooled
