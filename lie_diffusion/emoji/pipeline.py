"""The tiny emoji Stable Diffusion pipeline: its architecture, and the pretrained copy shipped with the package.

Real diffusers/transformers classes at toy width, so every default Lie target exists: an
`AutoencoderKL` that downsamples by 2 (32 px images <-> 16x16x4 latents), a `CLIPTextModel` read
through the byte-level CLIP tokenizer of `lie_diffusion.tiny`, a `UNet2DConditionModel` with SD's
block types (DownBlock2D / CrossAttnDownBlock2D / CrossAttnUpBlock2D / UpBlock2D), DDPM's linear
noise schedule with v-prediction for training and DPM-Solver++ for sampling. `train_scripts/pretrain_tiny_emoji_sd.py`
trains it from scratch on the emoji data set.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained" / "tiny-emoji-sd"
CLASSES_FILE = "emoji_classes.json"  # in the pipeline folder: which emoji (names) it was trained on
MAX_LENGTH = 64  # tokens; the byte-level tokenizer spends one per character
# Sampling defaults used by the metrics, the quickstart and the fidelity benchmark.
NUM_INFERENCE_STEPS = 25
GUIDANCE_SCALE = 4.0

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    norm_num_groups=8, sample_size=32,
)
TEXT_CONFIG = dict(
    vocab_size=514, hidden_size=96, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=MAX_LENGTH, bos_token_id=512, eos_token_id=513, pad_token_id=513, projection_dim=96,
)
UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 128),
    # attention at 8x8 and 4x4 only: self-attention over 16x16 latents cost a third of a CPU step
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=16, cross_attention_dim=96, attention_head_dim=4,
)
# v-prediction: at high noise the target is (minus) the clean latent, so the background colour and the
# layout, which a short CPU run must learn first, get a strong signal (epsilon-prediction learned them slowly).
NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                      prediction_type="v_prediction")


def write_tokenizer(directory: str | Path):
    """The byte-level CLIP tokenizer of `lie_diffusion.tiny`, with room for emoji captions (MAX_LENGTH tokens)."""
    from transformers import CLIPTokenizer

    from lie_diffusion.tiny import write_tiny_tokenizer

    directory = write_tiny_tokenizer(directory)
    tokenizer = CLIPTokenizer.from_pretrained(str(directory), model_max_length=MAX_LENGTH)
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def build_components(seed: int = 0) -> dict:
    """Fresh, randomly initialised vae / text_encoder / unet and the training noise scheduler."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return dict(vae=AutoencoderKL(**VAE_CONFIG), text_encoder=CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)),
                unet=UNet2DConditionModel(**UNET_CONFIG), noise_scheduler=DDPMScheduler(**NOISE_SCHEDULE))


def save_pipeline(directory: str | Path, vae, text_encoder, tokenizer, unet, classes: list[str]) -> Path:
    """Write a StableDiffusionPipeline folder (DPM-Solver++ sampler) plus the list of trained emoji names."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    directory = Path(directory)
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DPMSolverMultistepScheduler(**NOISE_SCHEDULE, algorithm_type="dpmsolver++", solver_order=2,
                                              steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(str(directory))
    (directory / CLASSES_FILE).write_text(json.dumps(classes, indent=0))
    return directory


def pretrained_emoji_path() -> Path:
    """The shipped pipeline folder (inside the package, so a checkout and an installed wheel both have it)."""
    if not (PRETRAINED_DIR / "model_index.json").is_file():
        raise FileNotFoundError(f"no pretrained emoji pipeline at {PRETRAINED_DIR}; train one with "
                                "train_scripts/pretrain_tiny_emoji_sd.py --output_dir <that folder>")
    return PRETRAINED_DIR


def pretrained_emoji_pipeline(path: str | Path | None = None, torch_dtype: torch.dtype = torch.float32):
    """Load the shipped (or another) tiny emoji StableDiffusionPipeline, progress bar off."""
    from diffusers import StableDiffusionPipeline

    path = Path(path) if path is not None else pretrained_emoji_path()
    pipeline = StableDiffusionPipeline.from_pretrained(str(path), torch_dtype=torch_dtype, safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def trained_classes(path: str | Path | None = None) -> list[str]:
    """The emoji names a pipeline folder was pretrained on (its training prompts)."""
    path = Path(path) if path is not None else pretrained_emoji_path()
    return json.loads((path / CLASSES_FILE).read_text())
