"""Tiny Stable Diffusion pipelines built offline from configs (no model hub needed).

The quickstart, the tests and the CPU benchmarks all need a real `StableDiffusionPipeline` folder
that `from_pretrained` can read. These builders make one with random weights in seconds: the same
module layout as SD1.x / SD2.x / SDXL (ResNet convs with shortcuts, down/up samplers, cross
attention), at a toy width, with a CLIP tokenizer written from a byte-level vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_RESOLUTION = 32  # pixels; the tiny VAE downsamples by 2, so latents are 16x16

_UNET_COMMON = dict(
    sample_size=TINY_RESOLUTION // 2,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
UNET_CONFIGS = {
    "sd1": dict(_UNET_COMMON, cross_attention_dim=32, attention_head_dim=8),
    "sd2": dict(_UNET_COMMON, cross_attention_dim=32, attention_head_dim=(4, 8), use_linear_projection=True),
    "sdxl": dict(
        _UNET_COMMON,
        cross_attention_dim=64,
        attention_head_dim=(4, 8),
        use_linear_projection=True,
        transformer_layers_per_block=(2, 1),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32,
    ),
}


def tiny_unet(kind: str = "sd1", seed: int = 0):
    """A random-weight UNet2DConditionModel with the layout of SD1.x ("sd1"), SD2.x ("sd2") or SDXL ("sdxl")."""
    from diffusers import UNet2DConditionModel

    if kind not in UNET_CONFIGS:
        raise ValueError(f"Unknown tiny UNet kind {kind!r}; choose from {sorted(UNET_CONFIGS)}.")
    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_CONFIGS[kind])


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def write_tiny_tokenizer(directory: str | Path) -> Path:
    """Write a CLIP tokenizer whose vocabulary is every byte (alone and word-final), with no merges."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    from transformers import CLIPTokenizer

    CLIPTokenizer.from_pretrained(str(directory), model_max_length=32).save_pretrained(str(directory))
    return directory


def tiny_text_encoder(seed: int = 0, hidden_size: int = 32, with_projection: bool = False):
    """A random CLIP text encoder; `with_projection`: SDXL's second encoder (it also returns pooled embeddings)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=1000, hidden_size=hidden_size, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=32, bos_token_id=512, eos_token_id=513, pad_token_id=513,
        projection_dim=hidden_size,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def tiny_vae(seed: int = 0, scaling_factor: float = 0.18215):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=TINY_RESOLUTION, scaling_factor=scaling_factor,
    )


def build_tiny_pipeline(directory: str | Path, kind: str = "sd1", seed: int = 0) -> Path:
    """Write a complete tiny pipeline folder and return its path: a StableDiffusionPipeline ("sd1", "sd2")
    or a StableDiffusionXLPipeline ("sdxl": two text encoders, the second with projection, two tokenizers)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    directory = Path(directory)
    tokenizer = CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(directory / "tokenizer")))
    if kind == "sdxl":
        pipeline = _tiny_sdxl_pipeline(tokenizer, seed)
    else:
        from diffusers import DDPMScheduler

        pipeline = StableDiffusionPipeline(
            vae=tiny_vae(seed),
            text_encoder=tiny_text_encoder(seed),
            tokenizer=tokenizer,
            unet=tiny_unet(kind, seed),
            scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                    beta_end=0.012, clip_sample=False, steps_offset=1),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipeline.save_pretrained(str(directory))
    return directory


def _tiny_sdxl_pipeline(tokenizer, seed: int):
    """SDXL's layout: UNet with text_time added conditioning (pooled text 32 + 6 time ids), encoders 32 + 32 wide."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=tiny_vae(seed, scaling_factor=0.13025),
        text_encoder=tiny_text_encoder(seed),
        text_encoder_2=tiny_text_encoder(seed + 1, with_projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=tiny_unet("sdxl", seed),
        scheduler=EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                         beta_end=0.012, steps_offset=1, timestep_spacing="leading"),
    )
