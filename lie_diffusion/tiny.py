"""Tiny diffusers pipelines built offline from configs (no model hub needed).

The quickstart, the tests and the CPU benchmarks all need a real pipeline folder that
`from_pretrained` can read. These builders make one with random weights in seconds: the same
module layout as SD1.x / SD2.x / SDXL (ResNet convs with shortcuts, down/up samplers, cross
attention), Flux.1 (double- and single-stream blocks, guidance embedding as in FLUX.1-dev) and
SD3 / SD3.5 (joint blocks, the last one context-pre-only; SD3.5 with qk RMS-norm and a dual-attention
`attn2` block), at a toy width, with a CLIP tokenizer written from a byte-level vocabulary and a
byte-level T5 tokenizer (ByT5's, which needs no files).
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


_SD3_COMMON = dict(
    sample_size=TINY_RESOLUTION // 2,
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=64,  # = the T5 width; the two CLIP encoders' 32 + 32 are padded to it
    caption_projection_dim=32,
    pooled_projection_dim=64,  # the two CLIP encoders' pooled 32 + 32
    pos_embed_max_size=16,
)
TRANSFORMER_CONFIGS = {
    # FLUX.1-dev's layout: in_channels = 4 latent channels x 2x2 packing; RoPE axes sum to the head dim
    "flux": dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ),
    "sd3": _SD3_COMMON,
    # SD3.5 Medium's features: qk RMS-norm everywhere and a second self-attention (attn2) in the first block
    "sd3.5": dict(_SD3_COMMON, qk_norm="rms_norm", dual_attention_layers=(0,)),
}
T5_WIDTH = {"flux": 32, "sd3": 64, "sd3.5": 64}
FLOW_VAE_FACTORS = {"flux": (0.3611, 0.1159), "sd3": (1.5305, 0.0609), "sd3.5": (1.5305, 0.0609)}  # scale, shift
TINY_KINDS = tuple(UNET_CONFIGS) + tuple(TRANSFORMER_CONFIGS)


def tiny_unet(kind: str = "sd1", seed: int = 0):
    """A random-weight UNet2DConditionModel with the layout of SD1.x ("sd1"), SD2.x ("sd2") or SDXL ("sdxl")."""
    from diffusers import UNet2DConditionModel

    if kind not in UNET_CONFIGS:
        raise ValueError(f"Unknown tiny UNet kind {kind!r}; choose from {sorted(UNET_CONFIGS)}.")
    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_CONFIGS[kind])


def tiny_transformer(kind: str = "flux", seed: int = 0):
    """A random-weight FluxTransformer2DModel ("flux") or SD3Transformer2DModel ("sd3", "sd3.5")."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    if kind not in TRANSFORMER_CONFIGS:
        raise ValueError(f"Unknown tiny transformer kind {kind!r}; choose from {sorted(TRANSFORMER_CONFIGS)}.")
    torch.manual_seed(seed)
    model_class = FluxTransformer2DModel if kind == "flux" else SD3Transformer2DModel
    return model_class(**TRANSFORMER_CONFIGS[kind])


def tiny_t5_encoder(seed: int = 0, d_model: int = 32):
    """A random T5 encoder over ByT5's byte vocabulary (3 specials + 256 bytes + 125 sentinels)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=384, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, feed_forward_proj="gated-gelu")
    return T5EncoderModel(config)


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


def tiny_vae(seed: int = 0, scaling_factor: float = 0.18215, shift_factor: float | None = None,
             quant_convs: bool = True):
    """The tiny VAE (4 latent channels, /2); Flux's and SD3's VAEs add a shift factor and drop the quant convs."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=TINY_RESOLUTION, scaling_factor=scaling_factor, shift_factor=shift_factor,
        use_quant_conv=quant_convs, use_post_quant_conv=quant_convs,
    )


def build_tiny_pipeline(directory: str | Path, kind: str = "sd1", seed: int = 0) -> Path:
    """Write a complete tiny pipeline folder and return its path: a StableDiffusionPipeline ("sd1", "sd2"),
    a StableDiffusionXLPipeline ("sdxl": two text encoders, the second with projection, two tokenizers),
    a FluxPipeline ("flux": CLIP + T5) or a StableDiffusion3Pipeline ("sd3", "sd3.5": two CLIPs + T5)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    if kind not in TINY_KINDS:
        raise ValueError(f"Unknown tiny pipeline kind {kind!r}; choose from {list(TINY_KINDS)}.")
    directory = Path(directory)
    tokenizer = CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(directory / "tokenizer")))
    if kind in TRANSFORMER_CONFIGS:
        pipeline = _tiny_flow_pipeline(kind, tokenizer, seed)
    elif kind == "sdxl":
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


def _tiny_flow_pipeline(kind: str, tokenizer, seed: int):
    """Flux: CLIP (pooled) + T5 (sequence); SD3/SD3.5: two CLIPs with projection + T5, as the real pipelines."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
    from transformers import ByT5Tokenizer

    t5_tokenizer = ByT5Tokenizer()
    t5 = tiny_t5_encoder(seed + 2, d_model=T5_WIDTH[kind])
    scaling_factor, shift_factor = FLOW_VAE_FACTORS[kind]
    vae = tiny_vae(seed, scaling_factor, shift_factor, quant_convs=False)
    if kind == "flux":
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096,
        )
        return FluxPipeline(
            scheduler=scheduler, vae=vae, text_encoder=tiny_text_encoder(seed),
            tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=tiny_transformer(kind, seed),
        )
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=tiny_text_encoder(seed, with_projection=True),
        tokenizer=tokenizer,
        text_encoder_2=tiny_text_encoder(seed + 1, with_projection=True),
        tokenizer_2=tokenizer,
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer,
        transformer=tiny_transformer(kind, seed),
    )
