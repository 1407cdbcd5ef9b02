"""What the DreamBooth scripts (Stable Diffusion and SDXL) share: flags, data, checkpoints, the loop.

Each script in `train_scripts/` loads its models, says how a batch becomes a loss and how a pipeline
is built for validation; everything else — data set, class images, optimizer, exact resume, atomic
checkpoints, the NaN stop, validation images, the model card — lives here once, so the two scripts
behave the same and never drift apart.

Needs the `train` extra (accelerate's trackers use tensorboard by default).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    ProjectConfiguration,
    gather_object,
    set_seed,
)
from diffusers import DPMSolverMultistepScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params, compute_snr, free_memory
from diffusers.utils import make_image_grid
from diffusers.utils.import_utils import is_xformers_available
from PIL import Image, ImageOps
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import AutoConfig

from .inject import LieConfig, add_lie_adapters
from .io import WEIGHT_NAME, load_lie_weights, read_lie_file, save_lie_weights

logger = get_logger(__name__)

CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
METADATA = "metadata.jsonl"  # per-image captions, the layout diffusers' image-folder data sets use
# torchvision's InterpolationMode names (what diffusers' flag accepts), mapped onto PIL filters.
INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "nearest_exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


class TrainingError(Exception):
    """A problem the user can fix (bad input, diverged run): reported as one line, without a traceback."""


@dataclass
class ModelFamily:
    """How a script's base model is named in logs, trackers and the model card."""

    title: str  # "Stable Diffusion"
    pipeline_class: str  # shown in the model card's usage snippet
    tags: tuple[str, ...]
    tracker: str  # accelerate's project name for the trackers


# ---------------------------------------------------------------------------------------------- flags


def add_shared_arguments(parser: argparse.ArgumentParser, resolution: int, output_dir: str, text_encoders: str) -> None:
    """The flags both scripts take, with diffusers' DreamBooth LoRA meanings, plus the adapter flags.

    The defaults that differ by model are arguments: `resolution`, `output_dir`, and `text_encoders`
    (what `--train_text_encoder` adapts, for its help).
    """
    # Model
    parser.add_argument("--pretrained_model_name_or_path", type=str, required=True,
                        help="Path to a pipeline folder or a model id on huggingface.co.")
    parser.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model.")
    parser.add_argument("--variant", type=str, default=None, help="Variant of the model files, e.g. fp16.")
    # Data
    parser.add_argument("--instance_data_dir", type=str, required=True,
                        help="A folder with the instance images.")
    parser.add_argument("--instance_prompt", type=str, required=True,
                        help="The prompt with the identifier of the instance, e.g. 'a photo of sks dog'.")
    parser.add_argument("--resolution", type=int, default=resolution,
                        help="Training images are resized (shorter side) and cropped to this size.")
    parser.add_argument("--center_crop", action="store_true",
                        help="Center-crop the images; by default they are randomly cropped.")
    parser.add_argument("--random_flip", action="store_true", help="Randomly flip the images horizontally.")
    parser.add_argument("--image_interpolation_mode", type=str, default="lanczos", choices=sorted(INTERPOLATION),
                        help="The filter used to resize images.")
    parser.add_argument("--repeats", type=int, default=1, help="How many times to repeat the instance images.")
    # Captions (instance and class images alike); the prompts above are the fallback
    parser.add_argument("--caption_extension", type=_extension, default=None,
                        help="Per-image captions in sidecar files, kohya's convention: the first line of "
                             "image.txt captions image.png for '.txt'.")
    parser.add_argument("--caption_column", type=str, default=None,
                        help=f"Per-image captions from a {METADATA} in the image folder: one JSON object a line "
                             "with 'file_name' and this column (usually 'text').")
    parser.add_argument("--missing_caption", type=str, default="fallback", choices=["fallback", "error"],
                        help="An instance image without a caption (no caption file, an empty one, no metadata line) "
                             "trains with --instance_prompt ('fallback'), or stops the run at start-up ('error'). "
                             "Class images without one always take --class_prompt.")
    # Prior preservation
    parser.add_argument("--with_prior_preservation", action="store_true", help="Add the prior preservation loss.")
    parser.add_argument("--class_data_dir", type=str, default=None, help="A folder with the class images.")
    parser.add_argument("--class_prompt", type=str, default=None, help="The class prompt, e.g. 'a photo of dog'.")
    parser.add_argument("--num_class_images", type=int, default=100,
                        help="Minimal number of class images; missing ones are generated with the base model.")
    parser.add_argument("--prior_loss_weight", type=float, default=1.0, help="The weight of the prior loss.")
    parser.add_argument("--prior_generation_precision", type=str, default=None, choices=["no", "fp32", "fp16", "bf16"],
                        help="Precision of class image generation; default fp16 on a GPU, else fp32.")
    parser.add_argument("--sample_batch_size", type=int, default=4, help="Batch size for class image generation.")
    # Validation
    parser.add_argument("--validation_prompt", type=str, default=None,
                        help="A prompt used during and after training to check that the model is learning.")
    parser.add_argument("--num_validation_images", type=int, default=4, help="Images generated per validation.")
    parser.add_argument("--validation_epochs", type=int, default=50, help="Run validation every X epochs.")
    parser.add_argument("--num_inference_steps", type=int, default=25,
                        help="Denoising steps (DPM-Solver++) for validation images and generated class images.")
    # Adapters
    parser.add_argument("--rank", type=int, default=4, help="Rank of the adapters (Lie and attention).")
    parser.add_argument("--alpha", type=float, default=None,
                        help="Adapter alpha; the update is scaled by alpha / rank. Default: the rank.")
    parser.add_argument("--lie_mode", type=str, default="exp", choices=["exp", "taylor"],
                        help="Lie update: 'exp' (W ⊙ exp Δ, the group update) or 'taylor' (W + W ⊙ Δ).")
    parser.add_argument("--attn_adapter", type=str, default="lora", choices=["lora", "lie", "none"],
                        help="Adapter on the attention projections (and on the text encoders).")
    parser.add_argument("--lie_balance", type=str, default="rms", choices=["rms", "none"],
                        help="Scale of each Lie adapter: 'rms' divides its alpha by the RMS of its kernel, so one "
                             "learning rate moves Lie and LoRA weights alike; 'none': alpha / rank, as in LoRA.")
    parser.add_argument("--conv_rank", type=int, default=None, help="Rank of the conv Lie adapters (default: --rank).")
    parser.add_argument("--conv_alpha", type=float, default=None,
                        help="Alpha of the conv Lie adapters (default: --alpha, else the conv rank).")
    parser.add_argument("--conv_targets", type=str, default=None,
                        help="Comma-separated regexes matched against the end of Conv2d module names.")
    parser.add_argument("--attn_targets", type=str, default=None,
                        help="Comma-separated regexes matched against the end of attention Linear module names.")
    parser.add_argument("--adapter_dropout", "--lora_dropout", type=float, default=0.0, help="Adapter dropout.")
    # Text encoder
    parser.add_argument("--train_text_encoder", action="store_true", help=f"Also train adapters on {text_encoders}.")
    parser.add_argument("--text_encoder_lr", type=float, default=None,
                        help="Learning rate of the text encoder adapters (default: --learning_rate).")
    # Schedule
    parser.add_argument("--seed", type=int, default=None, help="A seed for reproducible training.")
    parser.add_argument("--train_batch_size", type=int, default=4, help="Batch size (per device).")
    parser.add_argument("--num_train_epochs", type=int, default=1)
    parser.add_argument("--max_train_steps", type=int, default=None,
                        help="Total number of training steps; overrides --num_train_epochs.")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1,
                        help="Number of batches to accumulate before an optimizer step.")
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="Save memory at the cost of a slower backward pass.")
    parser.add_argument("--learning_rate", type=float, default=5e-4, help="Initial learning rate (after warmup).")
    parser.add_argument("--scale_lr", action="store_true",
                        help="Scale the learning rate by GPUs x gradient accumulation steps x batch size.")
    parser.add_argument("--lr_scheduler", type=str, default="constant",
                        help='One of "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", '
                             '"constant_with_warmup".')
    parser.add_argument("--lr_warmup_steps", type=int, default=500, help="Warmup steps of the lr scheduler.")
    parser.add_argument("--lr_num_cycles", type=int, default=1, help="Hard resets of cosine_with_restarts.")
    parser.add_argument("--lr_power", type=float, default=1.0, help="Power factor of the polynomial scheduler.")
    parser.add_argument("--snr_gamma", type=float, default=None,
                        help="Min-SNR loss weighting gamma (5.0 is recommended); off by default.")
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="Max gradient norm.")
    parser.add_argument("--dataloader_num_workers", type=int, default=0, help="Subprocesses for data loading.")
    # Optimizer
    parser.add_argument("--optimizer", type=str, default="AdamW", choices=["AdamW", "adamw", "prodigy", "Prodigy"],
                        help="AdamW, or Prodigy (pip install prodigyopt; use --learning_rate 1.0).")
    parser.add_argument("--use_8bit_adam", action="store_true", help="Use 8-bit AdamW from bitsandbytes.")
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_beta2", type=float, default=0.999)
    parser.add_argument("--adam_weight_decay", type=float, default=1e-2)
    parser.add_argument("--adam_weight_decay_text_encoder", type=float, default=None,
                        help="Weight decay of the text encoder adapters (default: --adam_weight_decay).")
    parser.add_argument("--adam_epsilon", type=float, default=1e-08)
    parser.add_argument("--prodigy_beta3", type=float, default=None,
                        help="Prodigy's step-size coefficient; default: the square root of beta2.")
    parser.add_argument("--prodigy_decouple", type=_boolean, default=True, help="Prodigy: decoupled weight decay.")
    parser.add_argument("--prodigy_use_bias_correction", type=_boolean, default=True,
                        help="Prodigy: Adam's bias correction.")
    parser.add_argument("--prodigy_safeguard_warmup", type=_boolean, default=True,
                        help="Prodigy: leave the lr out of the denominator of D during warmup.")
    # Checkpointing
    parser.add_argument("--checkpointing_steps", type=int, default=500,
                        help="Save the training state every X optimizer steps, in output_dir/checkpoint-X.")
    parser.add_argument("--checkpoints_total_limit", type=int, default=None, help="Max number of checkpoints kept.")
    parser.add_argument("--resume_from_checkpoint", type=str, default=None,
                        help='Resume from a checkpoint folder (a path, or a name in output_dir), or "latest".')
    # Precision and performance
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                        help="Frozen weights in this precision, adapters in fp32. Default: accelerate's config.")
    parser.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere GPUs.")
    parser.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                        help="Use xformers attention (CUDA only); PyTorch SDPA is used otherwise.")
    # Logging
    parser.add_argument("--output_dir", type=str, default=output_dir,
                        help="Where the adapter weights, checkpoints, validation images and logs are written.")
    parser.add_argument("--logging_dir", type=str, default="logs", help="TensorBoard log folder, in output_dir.")
    parser.add_argument("--report_to", type=str, default="tensorboard",
                        help='"tensorboard" (default), "wandb", "comet_ml", "all" or "none".')
    parser.add_argument("--local_rank", type=int, default=-1, help="Set by some distributed launchers.")


def _boolean(value: str) -> bool:
    """argparse type for diffusers' `--prodigy_* True/False` flags (a plain `bool` would read "False" as True)."""
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _extension(value: str) -> str:
    """argparse type for --caption_extension: 'txt' and '.txt' both mean '.txt'."""
    if not value.strip("."):
        raise argparse.ArgumentTypeError(f"expected a file extension such as .txt, got {value!r}")
    return "." + value.lstrip(".")


def check_args(args):
    """Catch what would otherwise fail after minutes of model loading, with a message that says what to do.

    Returns `args`."""
    if args.with_prior_preservation and (args.class_data_dir is None or args.class_prompt is None):
        raise TrainingError("--with_prior_preservation needs --class_data_dir and --class_prompt.")
    if args.caption_extension and args.caption_column:
        raise TrainingError("--caption_extension and --caption_column are two sources of captions: give one.")
    if args.missing_caption == "error" and not (args.caption_extension or args.caption_column):
        raise TrainingError("--missing_caption error needs captions: --caption_extension or --caption_column.")
    if args.train_text_encoder and args.attn_adapter == "none":
        raise TrainingError("--train_text_encoder needs text encoder adapters: use --attn_adapter lora or lie.")
    if args.enable_xformers_memory_efficient_attention and not (is_xformers_available() and torch.cuda.is_available()):
        raise TrainingError(
            "--enable_xformers_memory_efficient_attention needs xformers (pip install xformers) and a CUDA GPU; "
            "leave the flag out to use PyTorch's scaled-dot-product attention."
        )
    if args.use_8bit_adam:
        if args.optimizer.lower() == "prodigy":
            raise TrainingError("--use_8bit_adam goes with --optimizer AdamW, not prodigy.")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise TrainingError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes.") from None
    if args.optimizer.lower() == "prodigy":
        try:
            import prodigyopt  # noqa: F401
        except ImportError:
            raise TrainingError("--optimizer prodigy needs prodigyopt: pip install 'lie-diffusion[prodigy]'.") from None
    if args.resume_from_checkpoint not in (None, "latest"):
        find_checkpoint(args)  # fails now if the checkpoint does not exist
    return args


def adapter_config(args) -> LieConfig:
    """LieConfig for the UNet; --rank/--alpha apply to both sections, --conv_* override the Lie (conv) one."""
    alpha = args.alpha if args.alpha is not None else args.rank
    conv_rank = args.conv_rank or args.rank
    conv_alpha = next(a for a in (args.conv_alpha, args.alpha, conv_rank) if a is not None)
    targets = {
        name: tuple(t.strip() for t in value.split(",") if t.strip())
        for name, value in (("conv_targets", args.conv_targets), ("attn_targets", args.attn_targets))
        if value is not None
    }
    return LieConfig(
        rank=conv_rank, alpha=conv_alpha, attn_rank=args.rank, attn_alpha=alpha, mode=args.lie_mode,
        balance=args.lie_balance, attn_adapter=args.attn_adapter, dropout=args.adapter_dropout, **targets,
    )


# ----------------------------------------------------------------------------------------------- data


def caption_files(args) -> tuple[str, ...]:
    """How the names of caption files end: they sit among the images and are not worth a warning."""
    if args.caption_extension:
        return (args.caption_extension,)
    return (METADATA,) if args.caption_column else ()


def list_images(directory, role, captions=()):
    """The readable image files of `directory`, sorted; unreadable ones are skipped with a warning, caption
    files (names ending in one of `captions`) silently."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TrainingError(f"{role} directory {directory} does not exist.")
    images = []
    for path in sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")):
        if path.name.endswith(captions):
            continue
        try:
            with Image.open(path) as image:
                image.load()
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            logger.warning(f"Skipping {path}: not a readable image ({error}).")
        else:
            images.append(path)
    return images


@dataclass
class ImageSet:
    """The images of one role (instance or class) and the prompt each trains with: its caption, else the
    role's prompt."""

    images: list[Path]
    prompts: list[str]


def caption_images(args, directory, images, prompt, role) -> ImageSet:
    """Pair each image with its caption (--caption_extension or --caption_column), else with `prompt`.

    Runs at start-up: a caption problem stops the run before any model loads, naming the file (and line).
    Only instance images obey --missing_caption error: class images are often generated, and those have
    no caption.
    """
    if args.caption_extension:
        found = {image: sidecar_caption(image, args.caption_extension) for image in images}
    elif args.caption_column:
        found = metadata_captions(directory, images, args.caption_column, required=role == "Instance")
    else:
        return ImageSet(images, [prompt] * len(images))
    missing = [f"{image} ({why})" for image, (caption, why) in found.items() if not caption]
    if missing and role == "Instance" and args.missing_caption == "error":
        raise TrainingError(f"{len(missing)} instance image(s) without a caption (--missing_caption error): "
                            + "; ".join(missing[:5]) + ("; ..." if len(missing) > 5 else ""))
    logger.info(f"{role} images: {len(images) - len(missing)} with their own caption, "
                f"{len(missing)} with the prompt {prompt!r}.")
    return ImageSet(images, [caption or prompt for caption, _ in found.values()])


def _read_text(path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8-sig")  # a byte-order mark is no part of the caption
    except UnicodeDecodeError as error:
        raise TrainingError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}).") from None


def sidecar_caption(image, extension):
    """(caption or None, why there is none): the first line of the file beside `image`, as kohya reads it."""
    path = image.with_suffix(extension)
    if not path.is_file():
        return None, f"no caption file {path}"
    lines = _read_text(path).splitlines()
    caption = lines[0].strip() if lines else ""
    return caption or None, f"{path} {'starts with an empty line' if lines else 'is empty'}"


def metadata_captions(directory, images, column, required):
    """{image: (caption or None, why there is none)} from `directory`/metadata.jsonl: one JSON object a line,
    with the image's `file_name` and its caption in `column`, as diffusers' image-folder scripts read it.

    A folder without the file gives no captions, unless `required`. A line that is no JSON object, names a
    file that is not there, or repeats one stops the run; so does a `column` that no line has (a typo).
    """
    directory = Path(directory)
    path = directory / METADATA
    if not path.is_file():
        if required:
            raise TrainingError(f"--caption_column {column}: {directory} has no {METADATA}.")
        return {image: (None, f"no {path}") for image in images}
    rows, columns = {}, set()
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise TrainingError(f"{where}: not valid JSON ({error.msg}, column {error.colno}).") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise TrainingError(f"{where}: expected a JSON object with a \"file_name\" string.")
        name = row["file_name"]
        if len(Path(name).parts) != 1:
            raise TrainingError(f"{where}: {name!r} is not a file name in {directory} (subfolders are not read).")
        if not (directory / name).is_file():
            raise TrainingError(f"{where}: {directory / name} does not exist.")
        if name in rows:
            raise TrainingError(f"{where}: {name!r} again (first on line {rows[name][0]}).")
        caption = row.get(column)
        if caption is not None and not isinstance(caption, str):
            raise TrainingError(f"{where}: {column!r} of {name!r} is a {type(caption).__name__}, not a string.")
        rows[name] = (number, (caption or "").strip())
        columns |= row.keys()
    if rows and column not in columns:
        raise TrainingError(f"--caption_column {column}: no line of {path} has it "
                            f"(its columns: {', '.join(sorted(columns))}).")
    found = {}
    for image in images:
        number, caption = rows.get(image.name, (None, ""))
        why = f"no line of {path} names it" if number is None else f"{path}, line {number}: empty {column!r}"
        found[image] = (caption or None, why)
    return found


def load_rgb(path):
    """Open an image upright (EXIF orientation) as RGB; transparency is composited onto white."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            image = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image)
        return image.convert("RGB")


class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance images (and class images for prior preservation) as [-1, 1] tensors of size x size.

    Random crops and flips draw from a generator seeded by (seed, epoch, index), not from the global
    RNG: the data a step sees then depends only on its position, which makes resuming exact. Each
    example also carries the image's original (height, width) and the crop's (top, left) in the
    resized image (SDXL's micro-conditioning), and its prompt from `instance_prompts` / `class_prompts`
    (one per image, in order; without them, None): captions vary per image, so the batch says which.
    """

    def __init__(self, instance_images, class_images, size, center_crop, random_flip, interpolation, repeats, seed,
                 instance_prompts=None, class_prompts=None):
        self.instance_images, self.class_images = instance_images, class_images
        self.instance_prompts = instance_prompts or [None] * len(instance_images)
        self.class_prompts = class_prompts or [None] * len(class_images)
        self.size, self.center_crop, self.random_flip = size, center_crop, random_flip
        self.interpolation, self.seed, self.epoch = INTERPOLATION[interpolation], seed, 0
        self._length = max(len(instance_images) * repeats, len(class_images))

    def __len__(self):
        return self._length

    def transform(self, image, rng):
        original_size = (image.height, image.width)
        width, height = image.size
        scale = self.size / min(width, height)  # shorter side to `size`: small images are upscaled
        width, height = max(self.size, round(width * scale)), max(self.size, round(height * scale))
        image = image.resize((width, height), self.interpolation)
        if self.center_crop:
            left, top = (width - self.size) // 2, (height - self.size) // 2
        else:
            left, top = int(rng.integers(width - self.size + 1)), int(rng.integers(height - self.size + 1))
        image = image.crop((left, top, left + self.size, top + self.size))
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous(), original_size, (top, left)

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, self.epoch, index])
        example = {}
        sources = [("instance", self.instance_images, self.instance_prompts)]
        if self.class_images:
            sources.append(("class", self.class_images, self.class_prompts))
        for role, images, prompts in sources:
            pixels, original_size, crop = self.transform(load_rgb(images[index % len(images)]), rng)
            example[role] = pixels
            example[f"{role}_size_crop"] = original_size + crop
            example[f"{role}_prompt"] = prompts[index % len(images)]
        return example


def collate_fn(examples):
    """Instance images first, then class images: one forward pass serves both losses.

    `size_crops` holds (original height, original width, crop top, crop left) per image, and `prompts` the
    prompt of each image, same order.
    """
    roles = ["instance"] + (["class"] if "class" in examples[0] else [])
    images = [e[role] for role in roles for e in examples]
    size_crops = [e[f"{role}_size_crop"] for role in roles for e in examples]
    prompts = [e[f"{role}_prompt"] for role in roles for e in examples]
    return {"pixel_values": torch.stack(images), "size_crops": torch.tensor(size_crops), "prompts": prompts}


def fast_sampler(pipeline):
    """DPM-Solver++ for validation and class images, unless the model is an EDM one (keeps its own sampler)."""
    if "EDM" not in type(pipeline.scheduler).__name__:
        pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    return pipeline


def generate_class_images(args, accelerator, load_pipeline):
    """Top up `class_data_dir` to `num_class_images` images sampled from the base model.

    Every process samples its share; the main process writes them all (each file atomically).
    """
    class_dir = Path(args.class_data_dir)
    if accelerator.is_main_process:
        class_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    existing = len(list_images(class_dir, "Class", caption_files(args)))
    missing = args.num_class_images - existing
    if missing <= 0:
        return
    dtype = torch.float16 if accelerator.device.type in ("cuda", "xpu") else torch.float32
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(
        args.prior_generation_precision, dtype
    )
    pipeline = fast_sampler(load_pipeline(dtype))
    pipeline.set_progress_bar_config(disable=True)
    pipeline.to(accelerator.device)
    logger.info(f"Generating {missing} class images of {args.class_prompt!r} into {class_dir}.")
    samples = []
    with accelerator.split_between_processes(list(range(existing, args.num_class_images))) as indices:
        batches = [indices[i : i + args.sample_batch_size] for i in range(0, len(indices), args.sample_batch_size)]
        for batch in tqdm(batches, desc="Generating class images", disable=not accelerator.is_local_main_process):
            # One generator per image: the images do not depend on the number of processes.
            generators = None if args.seed is None else [torch.Generator().manual_seed(args.seed + i) for i in batch]
            images = pipeline(
                [args.class_prompt] * len(batch), num_inference_steps=args.num_inference_steps, generator=generators
            ).images
            samples += list(zip(batch, images))
    samples = gather_object(samples) if accelerator.num_processes > 1 else samples
    if accelerator.is_main_process:
        for index, image in samples:
            name = f"{index:05d}-{hashlib.sha1(image.tobytes()).hexdigest()[:12]}.jpg"
            image.save(class_dir / f".{name}.tmp", format="JPEG")
            os.replace(class_dir / f".{name}.tmp", class_dir / name)
    accelerator.wait_for_everyone()
    del pipeline
    free_memory()


# ------------------------------------------------------------------------------------------ run setup


def start_run(args, load_pipeline, find_unused_parameters=False):
    """Accelerator, logging and seed; then the data (instance images, generated class images), checked.

    `load_pipeline(torch_dtype, **components)` loads the base pipeline (for class images and validation).
    `find_unused_parameters`: some trained adapters may get no gradient in a step (DDP must not wait for them).
    Returns (accelerator, instance, class_): the `ImageSet`s (images and their prompts) of each role.
    """
    accelerator = Accelerator(
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=Path(args.output_dir, args.logging_dir)
        ),
        # The data order of epoch e is a function of (seed, e), so a resumed run sees the same batches.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO
    )
    # Data first: a bad folder should fail in a second, not after the models have loaded.
    instance_images = list_images(args.instance_data_dir, "Instance", caption_files(args))
    if not instance_images:
        raise TrainingError(f"Instance directory {args.instance_data_dir} holds no readable images.")
    instance = caption_images(args, args.instance_data_dir, instance_images, args.instance_prompt, "Instance")

    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_warning()
    else:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()

    if args.seed is not None:
        # Different noise on each process; the adapters still start equal (DDP broadcasts rank 0's).
        set_seed(args.seed, device_specific=True)

    class_ = ImageSet([], [])
    if args.with_prior_preservation:
        generate_class_images(args, accelerator, load_pipeline)
        class_images = list_images(args.class_data_dir, "Class", caption_files(args))[: args.num_class_images]
        if not class_images:
            raise TrainingError(f"Class directory {args.class_data_dir} holds no readable images.")
        class_ = caption_images(args, args.class_data_dir, class_images, args.class_prompt, "Class")

    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator, instance, class_


def weight_dtype_of(accelerator) -> torch.dtype:
    """The dtype of the frozen weights: half under mixed precision (the adapters stay fp32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def load_model(args, model_class, subfolder):
    """A pipeline component from `--pretrained_model_name_or_path` at `--revision` / `--variant`."""
    return model_class.from_pretrained(
        args.pretrained_model_name_or_path, subfolder=subfolder, revision=args.revision, variant=args.variant
    )


def load_text_encoder(args, subfolder):
    """The text encoder class its config names (CLIPTextModel, CLIPTextModelWithProjection, ...)."""
    config = AutoConfig.from_pretrained(args.pretrained_model_name_or_path, subfolder=subfolder, revision=args.revision)
    return load_model(args, getattr(transformers, config.architectures[0]), subfolder)


def add_adapters(args, accelerator, unet, text_encoders):
    """Freeze the models, move them to the device in the weight dtype, and add the Lie adapters.

    The text encoders get adapters with `--train_text_encoder`. Adapters stay fp32 whatever the
    weight dtype. Returns the models that train, the UNet first.
    """
    weight_dtype = weight_dtype_of(accelerator)
    for model in (unet, *text_encoders):
        model.requires_grad_(False)
        model.to(accelerator.device, dtype=weight_dtype)
    trained = [unet, *text_encoders] if args.train_text_encoder else [unet]
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for text_encoder in trained[1:]:
            text_encoder.gradient_checkpointing_enable()
    config = adapter_config(args)
    for model in trained:
        add_lie_adapters(model, config)
    cast_training_params(trained, dtype=torch.float32)
    return trained


def build_optimizer(args, accelerator, trained_models):
    """AdamW (or 8-bit AdamW, or Prodigy) over the adapters of the UNet (first) and of the text encoders.

    Returns the optimizer and the list of the parameters it trains.
    """
    unet_params = [p for p in trained_models[0].parameters() if p.requires_grad]
    text_encoder_params = [p for model in trained_models[1:] for p in model.parameters() if p.requires_grad]
    text_encoder_lr = args.text_encoder_lr if args.text_encoder_lr is not None else args.learning_rate
    if args.scale_lr:
        factor = args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
        args.learning_rate, text_encoder_lr = args.learning_rate * factor, text_encoder_lr * factor
    prodigy = args.optimizer.lower() == "prodigy"
    if prodigy and text_encoder_lr != args.learning_rate:
        logger.warning("Prodigy adapts one learning rate: the text encoders use --learning_rate too.")
        text_encoder_lr = args.learning_rate
    param_groups = [{"params": unet_params, "lr": args.learning_rate}]
    if text_encoder_params:
        decay = args.adam_weight_decay_text_encoder
        param_groups.append({"params": text_encoder_params, "lr": text_encoder_lr,
                             "weight_decay": args.adam_weight_decay if decay is None else decay})
    common = dict(betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    if prodigy:
        import prodigyopt

        if args.learning_rate <= 0.1:
            logger.warning("Prodigy works best with --learning_rate around 1.0.")
        optimizer = prodigyopt.Prodigy(
            param_groups, beta3=args.prodigy_beta3, decouple=args.prodigy_decouple,
            use_bias_correction=args.prodigy_use_bias_correction, safeguard_warmup=args.prodigy_safeguard_warmup,
            **common,
        )
    elif args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(param_groups, **common)
    else:
        optimizer = torch.optim.AdamW(param_groups, **common)
    return optimizer, unet_params + text_encoder_params


def build_dataloader(args, accelerator, instance, class_):
    """The DreamBooth data set of the `ImageSet`s and its loader, both keyed by the seed so that resuming is exact."""
    data_seed = args.seed if args.seed is not None else int(torch.randint(2**31, ()).item())
    dataset = DreamBoothDataset(
        instance.images, class_.images, args.resolution, args.center_crop, args.random_flip,
        args.image_interpolation_mode, args.repeats, data_seed, instance.prompts, class_.prompts,
    )
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        collate_fn=collate_fn,
        num_workers=args.dataloader_num_workers,
        # Its own generator: starting an epoch must not draw from the global RNG (resume would diverge).
        generator=torch.Generator().manual_seed(data_seed),
    )
    return dataset, dataloader


def build_lr_scheduler(args, accelerator, optimizer, dataloader):
    # The scheduler is stepped once per process per update (see diffusers PR 8312), hence the factors.
    if args.max_train_steps is None:
        batches_per_process = math.ceil(len(dataloader) / accelerator.num_processes)
        scheduler_steps = args.num_train_epochs * math.ceil(batches_per_process / args.gradient_accumulation_steps)
    else:
        scheduler_steps = args.max_train_steps
    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=scheduler_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )


# --------------------------------------------------------------------------------------------- losses


def denoising_loss(args, noise_scheduler, model_pred, target, timesteps, with_prior, weighting=None):
    """Per-sample MSE, optionally Min-SNR weighted (https://arxiv.org/abs/2303.09556) or weighted per
    sample (`weighting`, EDM); with prior preservation the second half of the batch is the prior loss."""
    squared = (model_pred.float() - target.float()) ** 2
    if weighting is not None:
        squared = weighting.float() * squared
    per_sample = squared.mean(dim=tuple(range(1, squared.ndim)))
    if args.snr_gamma is not None:
        snr = compute_snr(noise_scheduler, timesteps)
        weights = torch.clamp(snr, max=args.snr_gamma)
        weights = weights / (snr + 1 if noise_scheduler.config.prediction_type == "v_prediction" else snr)
        per_sample = per_sample * weights
    if not with_prior:
        return per_sample.mean()
    instance_loss, prior_loss = per_sample.chunk(2)
    return instance_loss.mean() + args.prior_loss_weight * prior_loss.mean()


def noise_target(noise_scheduler, latents, noise, timesteps):
    """What the UNet learns to predict: the noise (epsilon) or the velocity (v-prediction)."""
    if noise_scheduler.config.prediction_type == "epsilon":
        return noise
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise TrainingError(f"Unknown prediction type {noise_scheduler.config.prediction_type}.")


# ------------------------------------------------------------------------------------ checkpoints


def checkpoint_steps(output_dir):
    """Steps of the complete checkpoints in `output_dir`, oldest first (partial ones are dot-folders)."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    return sorted(int(m.group(1)) for m in map(CHECKPOINT_RE.fullmatch, names) if m)


def find_checkpoint(args):
    """The checkpoint folder to resume from, or None when "latest" finds none."""
    output_dir = Path(args.output_dir)
    if args.resume_from_checkpoint == "latest":
        steps = checkpoint_steps(output_dir)
        return output_dir / f"checkpoint-{steps[-1]}" if steps else None
    for path in (Path(args.resume_from_checkpoint), output_dir / args.resume_from_checkpoint):
        if path.is_dir() and CHECKPOINT_RE.fullmatch(path.name):
            return path
    raise TrainingError(
        f"--resume_from_checkpoint {args.resume_from_checkpoint}: no checkpoint-<step> folder there or in {output_dir}."
    )


@torch.no_grad()
def load_adapters_in_place(checkpoint, models):
    """Copy a checkpoint's adapter factors into the adapters being trained.

    In place, because the optimizer and DDP hold these very tensors (load_lie_weights would add new ones).
    """
    saved = {(m.component, m.module): m for m in read_lie_file(checkpoint).modules}
    trained = {
        (component, name): layer
        for component, model in models.items()
        for name, layer in model.named_modules()
        if "default" in getattr(layer, "lora_A", {})
    }
    if saved.keys() != trained.keys() or any(
        saved[k].A.shape != trained[k].lora_A["default"].weight.shape
        or saved[k].B.shape != trained[k].lora_B["default"].weight.shape
        for k in saved
    ):
        raise TrainingError(
            f"the adapters in {checkpoint} do not match the ones this run trains; resume with the flags of the run "
            "that wrote it (--rank, --conv_rank, --conv_targets, --attn_targets, --attn_adapter, --train_text_encoder)."
        )
    for key, entry in saved.items():
        trained[key].lora_A["default"].weight.copy_(entry.A)
        trained[key].lora_B["default"].weight.copy_(entry.B)


# A checkpoint folder: the adapter file (WEIGHT_NAME), TRAINING_STATE (optimizer, lr scheduler, grad scaler,
# accelerate's step counter) and one RANDOM_STATES file per process. All safetensors: accelerate's save_state
# would pickle the states.
TRAINING_STATE = "training_state.safetensors"
RANDOM_STATES = "random_states_{}.safetensors"
_STATE_METADATA = "lie_diffusion.state"


def save_state_file(path, tree) -> None:
    """Write nested dicts / lists / tuples of tensors, numbers, strings and None as one safetensors file: the
    tensors as tensors, the structure (with every other value, exactly) as JSON in the metadata."""
    tensors = {}

    def encode(obj):
        if isinstance(obj, torch.Tensor):
            key = str(len(tensors))
            tensors[key] = obj.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)  # never shared
            return {"tensor": key}
        if isinstance(obj, dict):  # keys of any type (the optimizer's are parameter indices)
            return {"dict": [[encode(k), encode(v)] for k, v in obj.items()]}
        if isinstance(obj, (list, tuple)):
            return {type(obj).__name__: [encode(v) for v in obj]}
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"{path}: a training state cannot hold values of type {type(obj).__name__!r}.")

    structure = json.dumps(encode(tree))
    save_file(tensors, str(path), metadata={_STATE_METADATA: structure})


def load_state_file(path):
    """The nest `save_state_file` wrote, with its tensors on the CPU."""
    with safe_open(str(path), framework="pt") as file:
        structure = (file.metadata() or {}).get(_STATE_METADATA)
    if structure is None:
        raise TrainingError(f"{path} is not a lie-diffusion training state (no {_STATE_METADATA!r} metadata).")
    tensors = load_file(str(path))

    def decode(obj):
        if not isinstance(obj, dict):
            return obj
        (kind, value), = obj.items()
        if kind == "tensor":
            return tensors[value]
        if kind == "dict":
            return {decode(k): decode(v) for k, v in value}
        items = [decode(v) for v in value]
        return tuple(items) if kind == "tuple" else items

    return decode(json.loads(structure))


def random_states() -> dict:
    """This process's Python, NumPy, torch and CUDA generator states."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_random_states(states: dict) -> None:
    random.setstate(states["python"])
    numpy_state = states["numpy"]
    numpy_state["state"]["key"] = numpy_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state(numpy_state)
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_training_state(folder, accelerator, adapted_models, optimizer, lr_scheduler) -> None:
    """What resuming needs, into `folder`: the adapters (main process), the optimizer / scheduler / scaler states
    (main process) and every process's random states."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        save_lie_weights(folder, **adapted_models)
        scaler = accelerator.scaler
        save_state_file(folder / TRAINING_STATE, {
            "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
            "grad_scaler": None if scaler is None else scaler.state_dict(), "step": accelerator.step,
        })
    save_state_file(folder / RANDOM_STATES.format(accelerator.process_index), random_states())


def load_training_state(folder, accelerator, adapted_models, optimizer, lr_scheduler) -> None:
    """Resume from a folder `save_training_state` wrote: adapters in place, then optimizer, scheduler, scaler
    and this process's random states."""
    folder = Path(folder)
    state_file, random_file = folder / TRAINING_STATE, folder / RANDOM_STATES.format(accelerator.process_index)
    if not state_file.is_file():
        older = (" It holds pickle files (optimizer.bin, random_states_*.pkl): an earlier lie-diffusion wrote it with "
                 "accelerate's save_state. Resume it with that version, or start a new run."
                 if (folder / "optimizer.bin").exists() else "")
        raise TrainingError(f"{folder} has no {TRAINING_STATE}.{older}")
    if not random_file.is_file():
        raise TrainingError(f"{folder} has no {random_file.name}: it was saved by a run with fewer processes than "
                            f"this one ({accelerator.num_processes}).")
    load_adapters_in_place(folder, adapted_models)
    state = load_state_file(state_file)
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if accelerator.scaler is not None and state["grad_scaler"] is not None:
        accelerator.scaler.load_state_dict(state["grad_scaler"])
    accelerator.step = state["step"]
    set_random_states(load_state_file(random_file))


def save_checkpoint(args, accelerator, step, params, adapted_models, optimizer, lr_scheduler):
    """The training state into a temporary folder, renamed when complete; then prune old ones."""
    if not all(torch.isfinite(p).all() for p in params):
        raise TrainingError(f"adapter weights are not finite at step {step}; not saving a checkpoint.")
    output_dir = Path(args.output_dir)
    final, partial = output_dir / f"checkpoint-{step}", output_dir / f".checkpoint-{step}.partial"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    save_training_state(partial, accelerator, adapted_models, optimizer, lr_scheduler)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        stale = output_dir / f".checkpoint-{step}.stale"  # written by a run this one resumed from before it
        if final.exists():
            os.replace(final, stale)
        os.replace(partial, final)
        shutil.rmtree(stale, ignore_errors=True)
        logger.info(f"Saved state to {final}")
        for leftover in output_dir.glob(".checkpoint-*.removing"):  # left by a run killed while pruning
            shutil.rmtree(leftover, ignore_errors=True)
        if args.checkpoints_total_limit is not None:
            steps = checkpoint_steps(output_dir)
            for old in steps[: max(0, len(steps) - args.checkpoints_total_limit)]:
                logger.info(f"Removing checkpoint-{old} (--checkpoints_total_limit {args.checkpoints_total_limit})")
                doomed = output_dir / f".checkpoint-{old}.removing"  # never a half-deleted checkpoint-N
                os.replace(output_dir / f"checkpoint-{old}", doomed)
                shutil.rmtree(doomed)


# ---------------------------------------------------------------------------------------- the loop


def train_loop(args, accelerator, family, *, adapted_models, params, optimizer, lr_scheduler, dataset, dataloader,
               compute_loss, validation_pipeline, validation_kwargs=None):
    """Resume if asked, then train to `max_train_steps`: checkpoints, NaN stop, logs, periodic validation.

    `adapted_models`: the models whose adapters train, by component name ("unet", "text_encoder", ...).
    `compute_loss(batch)` gives the loss of one batch; `validation_pipeline()` builds a pipeline around
    the models being trained. Returns the last global step.
    """
    trained_models = list(adapted_models.values())
    num_update_steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)

    if accelerator.is_main_process:
        accelerator.init_trackers(family.tracker, config={k: v for k, v in vars(args).items() if v is not None})

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(f"***** Running training ({family.title}) *****")
    logger.info(f"  Num examples = {len(dataset)}")
    logger.info(f"  Num batches each epoch = {len(dataloader)}")
    logger.info(f"  Num Epochs = {args.num_train_epochs}")
    logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    logger.info(f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {args.max_train_steps}")
    logger.info(f"  Trainable parameters = {sum(p.numel() for p in params):,}")

    global_step = 0
    if args.resume_from_checkpoint:
        checkpoint = find_checkpoint(args)
        if checkpoint is None:
            accelerator.print(f"No checkpoint in {args.output_dir}; starting a new training run.")
        else:
            accelerator.print(f"Resuming from checkpoint {checkpoint}")
            load_training_state(checkpoint, accelerator, adapted_models, optimizer, lr_scheduler)
            global_step = int(CHECKPOINT_RE.fullmatch(checkpoint.name).group(1))
    first_epoch = global_step // num_update_steps_per_epoch
    # Batches of the first epoch that the checkpoint has already trained on.
    resume_batches = (global_step % num_update_steps_per_epoch) * args.gradient_accumulation_steps

    progress_bar = tqdm(
        range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    for epoch in range(first_epoch, args.num_train_epochs):
        if global_step >= args.max_train_steps:
            break  # resumed from the checkpoint of the last step: nothing left to train
        for model in trained_models:
            model.train()
        dataset.epoch = epoch
        dataloader.set_epoch(epoch)
        batches = dataloader
        if epoch == first_epoch and resume_batches:
            batches = accelerator.skip_first_batches(dataloader, resume_batches)
        for batch in batches:
            with accelerator.accumulate(*trained_models):
                loss = compute_loss(batch)
                mean_loss = accelerator.reduce(loss.detach(), reduction="mean")  # the same verdict on every process
                if not torch.isfinite(mean_loss):
                    steps = checkpoint_steps(args.output_dir)
                    last = Path(args.output_dir, f"checkpoint-{steps[-1]}") if steps else None
                    raise TrainingError(
                        f"loss is {mean_loss.item()} at step {global_step + 1}; stopping. "
                        + (f"The last good checkpoint is {last}; " if last else "")
                        + "try a lower --learning_rate or another --mixed_precision."
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            if accelerator.sync_gradients:
                progress_bar.update(1)
                global_step += 1
                if global_step % args.checkpointing_steps == 0:
                    save_checkpoint(args, accelerator, global_step, params, adapted_models, optimizer, lr_scheduler)
                lrs = lr_scheduler.get_last_lr()
                logs = {"loss": mean_loss.item(), "lr": lrs[0]}
                if len(lrs) > 1:
                    logs["lr_text_encoder"] = lrs[1]
                progress_bar.set_postfix(**logs)
                accelerator.log(logs, step=global_step)
            if global_step >= args.max_train_steps:
                break

        # Periodic validation; the final one (finish_training) covers the end of training.
        validate = args.validation_prompt and epoch % args.validation_epochs == 0
        if accelerator.is_main_process and validate and global_step < args.max_train_steps:
            for model in trained_models:
                model.eval()
            pipeline = validation_pipeline()
            log_validation(pipeline, args, accelerator, global_step, **(validation_kwargs or {}))
            del pipeline
            free_memory()
    return global_step


def log_validation(pipeline, args, accelerator, step, phase="validation", **call_kwargs):
    """Generate `num_validation_images` images, save them as one grid PNG and log them to the trackers."""
    logger.info(f"Running {phase}: {args.num_validation_images} images of {args.validation_prompt!r}.")
    pipeline = fast_sampler(pipeline).to(accelerator.device)  # moves only: a cast would turn fp32 adapters to half
    pipeline.set_progress_bar_config(disable=True)
    generator = None if args.seed is None else torch.Generator(accelerator.device).manual_seed(args.seed)
    with accelerator.autocast():
        images = pipeline(
            args.validation_prompt,
            num_images_per_prompt=args.num_validation_images,
            num_inference_steps=args.num_inference_steps,
            generator=generator,
            **call_kwargs,
        ).images

    grid_dir = Path(args.output_dir, "validation")
    grid_dir.mkdir(parents=True, exist_ok=True)
    make_image_grid(images, rows=1, cols=len(images)).save(grid_dir / f"{phase}-step-{step:06d}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(phase, np.stack([np.asarray(i) for i in images]), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            captions = [f"{n}: {args.validation_prompt}" for n in range(len(images))]
            tracker.log({phase: [wandb.Image(i, caption=c) for i, c in zip(images, captions)]})
    return images


def finish_training(args, accelerator, family, adapted_models, load_pipeline, step, validation_kwargs=None):
    """Save the adapters; check the saved file the way a user would load it (test images); write the card."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        path = save_lie_weights(args.output_dir, **adapted_models)
        logger.info(f"Saved the adapters to {path}")
        images = []
        if args.validation_prompt and args.num_validation_images > 0:
            pipeline = load_pipeline(weight_dtype_of(accelerator))
            load_lie_weights(pipeline, args.output_dir)
            images = log_validation(pipeline, args, accelerator, step, phase="test", **(validation_kwargs or {}))
        save_model_card(args, images, family, list(adapted_models))
    accelerator.end_training()


# --------------------------------------------------------------------------------------- model card


def save_model_card(args, images, family, components):
    """Write a diffusers-style README.md model card (and its images) into `output_dir`."""
    output_dir = Path(args.output_dir)
    widget, gallery = [], ""
    for i, image in enumerate(images):
        image.save(output_dir / f"image_{i}.png")
        widget.append(f"- text: {json.dumps(args.validation_prompt)}\n  output:\n    url: image_{i}.png")
        gallery += f"![image_{i}](./image_{i}.png)\n"
    rows = [(k, str(v).replace("|", "\\|")) for k, v in sorted(vars(args).items()) if k != "local_rank"]
    flags = "\n".join(f"| `--{k}` | `{v}` |" for k, v in rows)  # `\|`: a bare `|` would end the cell
    prompt = args.validation_prompt or args.instance_prompt
    tags = "\n".join(f"- {tag}" for tag in ("text-to-image", "diffusers", "diffusers-training", *family.tags,
                                             "lora", "lie-diffusion", "dreambooth"))
    vae = getattr(args, "pretrained_vae_model_name_or_path", None)
    captions = ""
    if args.caption_extension or args.caption_column:
        source = (f"`*{args.caption_extension}` files beside the images" if args.caption_extension
                  else f"the `{args.caption_column}` column of each image folder's `{METADATA}`")
        captions = (f" Each image was trained with its own caption, from {source}; images without one used the "
                    "instance (or class) prompt.")
    card = f"""---
base_model: {args.pretrained_model_name_or_path}
instance_prompt: {json.dumps(args.instance_prompt)}
library_name: diffusers
tags:
{tags}
inference: true
{"widget:" + chr(10) + chr(10).join(widget) if widget else ""}
---

# Lie DreamBooth ({family.title}) - {output_dir.name}

Lie-group adapter (LieRA) weights for `{args.pretrained_model_name_or_path}`, trained with
[DreamBooth](https://dreambooth.github.io/) on the prompt `{args.instance_prompt}`. The UNet's
convolutions carry Lie adapters (`--lie_mode {args.lie_mode}`, W' = W ⊙ exp(Δ)); attention layers carry
`{args.attn_adapter}` adapters. Trained components: {", ".join(components)}.{f" VAE used in training: `{vae}`." if vae else ""}{captions}

{gallery}
## How to use

```python
import torch
from diffusers import {family.pipeline_class}
from lie_diffusion import load_lie_weights, merge_lie_weights

pipe = {family.pipeline_class}.from_pretrained("{args.pretrained_model_name_or_path}", torch_dtype=torch.float16).to("cuda")
load_lie_weights(pipe, "{args.output_dir}")  # the folder holding {WEIGHT_NAME}
image = pipe("{prompt}", num_inference_steps=25).images[0]

# Optional: fold the adapter into the base weights (no overhead at inference, exact up to round-off).
merge_lie_weights(pipe)
pipe.save_pretrained("merged-model")  # a stock {family.title} folder
```

Stock `pipe.load_lora_weights` reads only the LoRA section of this file (attention layers, with
`--attn_adapter lora`) and ignores the Lie section, so use `lie_diffusion.load_lie_weights` to get the
full adapter.

## Training flags

| flag | value |
|---|---|
{flags}
"""
    (output_dir / "README.md").write_text(card)
