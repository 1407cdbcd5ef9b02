"""The tiny emoji pipelines: the Stable Diffusion one's architecture, and the pretrained copies shipped with the
package (`kind="sd"`, and `kind="flux"` once trained: see `lie_diffusion.emoji.flux`).

Real diffusers/transformers classes at toy width, so every default Lie target exists: an
`AutoencoderKL` that downsamples by 2 (32 px images <-> 16x16x4 latents), a `CLIPTextModel` read
through the byte-level CLIP tokenizer of `lie_diffusion.tiny`, a `UNet2DConditionModel` with SD's
block types (DownBlock2D / CrossAttnDownBlock2D / CrossAttnUpBlock2D / UpBlock2D), DDPM's linear
noise schedule with v-prediction for training and DPM-Solver++ for sampling. `train_scripts/pretrain_tiny_emoji_sd.py`
trains it from scratch on the emoji data set.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch

PRETRAINED_ROOT = Path(__file__).resolve().parent / "pretrained"
# kind -> (folder in the package, the script that makes it)
KINDS = {
    "sd": ("tiny-emoji-sd", "train_scripts/pretrain_tiny_emoji_sd.py"),
    "flux": ("tiny-emoji-flux", "train_scripts/pretrain_tiny_emoji_flux.py"),
}
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


def save_pipeline(directory: str | Path, vae, text_encoder, tokenizer, unet, classes: list[str],
                  record: dict | None = None) -> Path:
    """Write a StableDiffusionPipeline folder (DPM-Solver++ sampler) plus the list of trained emoji names."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DPMSolverMultistepScheduler(**NOISE_SCHEDULE, algorithm_type="dpmsolver++", solver_order=2,
                                              steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return write_pipeline_folder(directory, pipeline, classes, record)


@contextlib.contextmanager
def atomic_directory(directory: str | Path):
    """Yield a fresh sibling folder to write into; on success it replaces `directory` by renames (an earlier save
    stays whole until then; a failed write leaves it untouched)."""
    directory = Path(directory)
    staging, previous = directory.with_name(directory.name + ".saving"), directory.with_name(directory.name + ".old")
    for leftover in (staging, previous):
        shutil.rmtree(leftover, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if directory.exists():
        directory.rename(previous)
    staging.rename(directory)
    shutil.rmtree(previous, ignore_errors=True)


def write_pipeline_folder(directory: str | Path, pipeline, classes: list[str], record: dict | None = None) -> Path:
    """`pipeline.save_pretrained` plus emoji_classes.json (and pretrain_args.json: `record`), atomically."""
    with atomic_directory(directory) as staging:
        pipeline.save_pretrained(str(staging))
        (staging / CLASSES_FILE).write_text(json.dumps(classes, indent=0))
        if record is not None:
            (staging / "pretrain_args.json").write_text(json.dumps(record, indent=1))
    return Path(directory)


def _kind(kind: str) -> tuple[str, str]:
    if kind not in KINDS:
        raise ValueError(f"Unknown emoji pipeline kind {kind!r}; choose from {sorted(KINDS)}.")
    return KINDS[kind]


def pretrained_emoji_path(kind: str = "sd") -> Path:
    """The shipped pipeline folder of `kind` ("sd": StableDiffusionPipeline, "flux": FluxPipeline), inside the
    package, so a checkout and an installed wheel both have it."""
    folder, script = _kind(kind)
    path = PRETRAINED_ROOT / folder
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"no pretrained emoji {kind} pipeline at {path}; train one with "
                                f"`python {script} --output_dir lie_diffusion/emoji/pretrained/{folder}` "
                                "(see docs/emoji-model.md)")
    return path


def pretrained_emoji_pipeline(path: str | Path | None = None, torch_dtype: torch.dtype = torch.float32,
                              kind: str = "sd"):
    """Load the shipped tiny emoji pipeline of `kind`, or the pipeline folder `path` (any kind: the folder's
    model_index.json names its class), progress bar off."""
    from diffusers import DiffusionPipeline

    path = Path(path) if path is not None else pretrained_emoji_path(kind)
    pipeline = DiffusionPipeline.from_pretrained(str(path), torch_dtype=torch_dtype)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sampling_kwargs(pipeline, guidance_scale: float, batch_size: int) -> dict:
    """What a call of `pipeline` needs besides prompts, steps and generators to draw the emoji it was trained on:
    32 px, and classifier-free guidance at `guidance_scale` (on Flux, whose tiny emoji model has no distilled
    guidance embedding, that is `true_cfg_scale` against an empty negative prompt)."""
    from diffusers import FluxPipeline

    from lie_diffusion.emoji.data import IMAGE_SIZE

    kwargs = dict(height=IMAGE_SIZE, width=IMAGE_SIZE)
    if isinstance(pipeline, FluxPipeline):
        return dict(kwargs, true_cfg_scale=guidance_scale, negative_prompt=[""] * batch_size,
                    max_sequence_length=MAX_LENGTH)
    return dict(kwargs, guidance_scale=guidance_scale)


def trained_classes(path: str | Path | None = None, kind: str = "sd") -> list[str]:
    """The emoji names a pipeline folder (default: the shipped one of `kind`) was pretrained on."""
    path = Path(path) if path is not None else pretrained_emoji_path(kind)
    return json.loads((path / CLASSES_FILE).read_text())
