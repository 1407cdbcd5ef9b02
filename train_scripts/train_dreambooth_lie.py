#!/usr/bin/env python
# Copyright 2025 The lie-diffusion authors. Licensed under the Apache License, Version 2.0.
"""DreamBooth fine-tuning of Stable Diffusion with Lie-group adapters (LieRA).

The flags and the behaviour follow diffusers' `examples/dreambooth/train_dreambooth_lora.py`, so a
command line written for that script works here with the same meaning. What changes is the adapter:
the UNet's convolutions get Lie adapters (W' = W ⊙ exp(Δ)) and its attention projections get LoRA
(or Lie, or nothing: `--attn_adapter`). The result is one `pytorch_lora_weights.safetensors` that
`lie_diffusion.load_lie_weights` puts back into a `DiffusionPipeline`.

    accelerate launch train_scripts/train_dreambooth_lie.py \
      --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
      --instance_data_dir dog --instance_prompt "a photo of sks dog" --output_dir lie-dog
"""

import argparse
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
from pathlib import Path

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, gather_object, set_seed
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params, compute_snr, free_memory
from diffusers.utils import make_image_grid
from diffusers.utils.import_utils import is_xformers_available
from PIL import Image, ImageOps
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer

from lie_diffusion import LieConfig, add_lie_adapters, load_lie_weights, read_lie_file, save_lie_weights
from lie_diffusion.io import WEIGHT_NAME

logger = get_logger(__name__)

CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
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


def save_model_card(args, images):
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
    card = f"""---
base_model: {args.pretrained_model_name_or_path}
instance_prompt: {json.dumps(args.instance_prompt)}
library_name: diffusers
tags:
- text-to-image
- diffusers
- diffusers-training
- stable-diffusion
- stable-diffusion-diffusers
- lora
- lie-diffusion
- dreambooth
inference: true
{"widget:" + chr(10) + chr(10).join(widget) if widget else ""}
---

# Lie DreamBooth - {output_dir.name}

Lie-group adapter (LieRA) weights for `{args.pretrained_model_name_or_path}`, trained with
[DreamBooth](https://dreambooth.github.io/) on the prompt `{args.instance_prompt}`. The UNet's
convolutions carry Lie adapters (`--lie_mode {args.lie_mode}`, W' = W ⊙ exp(Δ)); attention layers carry
`{args.attn_adapter}` adapters. Text encoder adapters trained: {args.train_text_encoder}.

{gallery}
## How to use

```python
import torch
from diffusers import DiffusionPipeline
from lie_diffusion import load_lie_weights, merge_lie_weights

pipe = DiffusionPipeline.from_pretrained("{args.pretrained_model_name_or_path}", torch_dtype=torch.float16).to("cuda")
load_lie_weights(pipe, "{args.output_dir}")  # the folder holding {WEIGHT_NAME}
image = pipe("{prompt}", num_inference_steps=25).images[0]

# Optional: fold the adapter into the base weights (no overhead at inference, exact up to round-off).
merge_lie_weights(pipe)
pipe.save_pretrained("merged-model")  # a stock Stable Diffusion folder
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


def log_validation(pipeline, args, accelerator, step, phase="validation"):
    """Generate `num_validation_images` images, save them as one grid PNG and log them to the trackers."""
    logger.info(f"Running {phase}: {args.num_validation_images} images of {args.validation_prompt!r}.")
    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    pipeline = pipeline.to(accelerator.device)  # moves only: a dtype cast would turn fp32 adapters to half
    pipeline.set_progress_bar_config(disable=True)
    generator = None if args.seed is None else torch.Generator(accelerator.device).manual_seed(args.seed)
    with accelerator.autocast():
        images = pipeline(
            args.validation_prompt,
            num_images_per_prompt=args.num_validation_images,
            num_inference_steps=args.num_inference_steps,
            generator=generator,
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


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="DreamBooth training of Stable Diffusion with Lie-group adapters.")
    # Model
    parser.add_argument("--pretrained_model_name_or_path", type=str, required=True,
                        help="Path to a Stable Diffusion pipeline folder or a model id on huggingface.co.")
    parser.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model.")
    parser.add_argument("--variant", type=str, default=None, help="Variant of the model files, e.g. fp16.")
    parser.add_argument("--tokenizer_name", type=str, default=None,
                        help="Tokenizer name or path, if not the model's own.")
    # Data
    parser.add_argument("--instance_data_dir", type=str, required=True,
                        help="A folder with the instance images.")
    parser.add_argument("--instance_prompt", type=str, required=True,
                        help="The prompt with the identifier of the instance, e.g. 'a photo of sks dog'.")
    parser.add_argument("--resolution", type=int, default=512,
                        help="Training images are resized (shorter side) and cropped to this size.")
    parser.add_argument("--center_crop", action="store_true",
                        help="Center-crop the images; by default they are randomly cropped.")
    parser.add_argument("--random_flip", action="store_true", help="Randomly flip the images horizontally.")
    parser.add_argument("--image_interpolation_mode", type=str, default="lanczos", choices=sorted(INTERPOLATION),
                        help="The filter used to resize images.")
    parser.add_argument("--repeats", type=int, default=1, help="How many times to repeat the instance images.")
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
                        help="Adapter on the attention projections (and on the text encoder).")
    parser.add_argument("--conv_rank", type=int, default=None, help="Rank of the conv Lie adapters (default: --rank).")
    parser.add_argument("--conv_alpha", type=float, default=None,
                        help="Alpha of the conv Lie adapters (default: --alpha, else the conv rank).")
    parser.add_argument("--conv_targets", type=str, default=None,
                        help="Comma-separated regexes matched against the end of Conv2d module names.")
    parser.add_argument("--attn_targets", type=str, default=None,
                        help="Comma-separated regexes matched against the end of attention Linear module names.")
    parser.add_argument("--adapter_dropout", "--lora_dropout", type=float, default=0.0, help="Adapter dropout.")
    # Text encoder
    parser.add_argument("--train_text_encoder", action="store_true", help="Also train adapters on the text encoder.")
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
    parser.add_argument("--use_8bit_adam", action="store_true", help="Use 8-bit AdamW from bitsandbytes.")
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_beta2", type=float, default=0.999)
    parser.add_argument("--adam_weight_decay", type=float, default=1e-2)
    parser.add_argument("--adam_epsilon", type=float, default=1e-08)
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
    parser.add_argument("--output_dir", type=str, default="lie-dreambooth-model",
                        help="Where the adapter weights, checkpoints, validation images and logs are written.")
    parser.add_argument("--logging_dir", type=str, default="logs", help="TensorBoard log folder, in output_dir.")
    parser.add_argument("--report_to", type=str, default="tensorboard",
                        help='"tensorboard" (default), "wandb", "comet_ml", "all" or "none".')
    parser.add_argument("--local_rank", type=int, default=-1, help="Set by some distributed launchers.")
    args = parser.parse_args(input_args)
    check_args(args)
    return args


def check_args(args):
    """Catch what would otherwise fail after minutes of model loading, with a message that says what to do."""
    if args.with_prior_preservation and (args.class_data_dir is None or args.class_prompt is None):
        raise TrainingError("--with_prior_preservation needs --class_data_dir and --class_prompt.")
    if args.train_text_encoder and args.attn_adapter == "none":
        raise TrainingError("--train_text_encoder needs text encoder adapters: use --attn_adapter lora or lie.")
    if args.enable_xformers_memory_efficient_attention and not (is_xformers_available() and torch.cuda.is_available()):
        raise TrainingError(
            "--enable_xformers_memory_efficient_attention needs xformers (pip install xformers) and a CUDA GPU; "
            "leave the flag out to use PyTorch's scaled-dot-product attention."
        )
    if args.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise TrainingError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes.") from None
    if args.resume_from_checkpoint not in (None, "latest"):
        find_checkpoint(args)  # fails now if the checkpoint does not exist


def list_images(directory, role):
    """The readable image files of `directory`, sorted; unreadable ones are skipped with a warning."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TrainingError(f"{role} directory {directory} does not exist.")
    images = []
    for path in sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            with Image.open(path) as image:
                image.load()
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            logger.warning(f"Skipping {path}: not a readable image ({error}).")
        else:
            images.append(path)
    return images


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
    RNG: the data a step sees then depends only on its position, which makes resuming exact.
    """

    def __init__(self, instance_images, class_images, size, center_crop, random_flip, interpolation, repeats, seed):
        self.instance_images, self.class_images = instance_images, class_images
        self.size, self.center_crop, self.random_flip = size, center_crop, random_flip
        self.interpolation, self.seed, self.epoch = INTERPOLATION[interpolation], seed, 0
        self._length = max(len(instance_images) * repeats, len(class_images))

    def __len__(self):
        return self._length

    def transform(self, image, rng):
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
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, self.epoch, index])
        example = {"instance": self.transform(load_rgb(self.instance_images[index % len(self.instance_images)]), rng)}
        if self.class_images:
            example["class"] = self.transform(load_rgb(self.class_images[index % len(self.class_images)]), rng)
        return example


def collate_fn(examples):
    """Instance images first, then class images: one forward pass serves both losses."""
    images = [e["instance"] for e in examples] + [e["class"] for e in examples if "class" in e]
    return {"pixel_values": torch.stack(images)}


def generate_class_images(args, accelerator):
    """Top up `class_data_dir` to `num_class_images` images sampled from the base model.

    Every process samples its share; the main process writes them all (each file atomically).
    """
    class_dir = Path(args.class_data_dir)
    if accelerator.is_main_process:
        class_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    existing = len(list_images(class_dir, "Class"))
    missing = args.num_class_images - existing
    if missing <= 0:
        return
    dtype = torch.float16 if accelerator.device.type in ("cuda", "xpu") else torch.float32
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(
        args.prior_generation_precision, dtype
    )
    pipeline = DiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path, torch_dtype=dtype, safety_checker=None,
        revision=args.revision, variant=args.variant,
    )
    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
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


def adapter_config(args):
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
        attn_adapter=args.attn_adapter, dropout=args.adapter_dropout, **targets,
    )


def main(args):
    logging_dir = Path(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
        # The data order of epoch e is a function of (seed, e), so a resumed run sees the same batches.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO
    )
    # Data first: a bad folder should fail in a second, not after the models have loaded.
    instance_images = list_images(args.instance_data_dir, "Instance")
    if not instance_images:
        raise TrainingError(f"Instance directory {args.instance_data_dir} holds no readable images.")

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

    class_images = []
    if args.with_prior_preservation:
        generate_class_images(args, accelerator)
        class_images = list_images(args.class_data_dir, "Class")[: args.num_class_images]
        if not class_images:
            raise TrainingError(f"Class directory {args.class_data_dir} holds no readable images.")

    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    # Load the tokenizer, scheduler and models.
    if args.tokenizer_name:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name, revision=args.revision)
    else:
        tokenizer = AutoTokenizer.from_pretrained(
            args.pretrained_model_name_or_path, subfolder="tokenizer", revision=args.revision
        )
    text_encoder_config = AutoConfig.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="text_encoder", revision=args.revision
    )
    text_encoder_cls = getattr(transformers, text_encoder_config.architectures[0])
    noise_scheduler = DDPMScheduler.from_pretrained(args.pretrained_model_name_or_path, subfolder="scheduler")
    text_encoder = text_encoder_cls.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="text_encoder", revision=args.revision, variant=args.variant
    )
    vae = AutoencoderKL.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="vae", revision=args.revision, variant=args.variant
    )
    unet = UNet2DConditionModel.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="unet", revision=args.revision, variant=args.variant
    )

    # Only the adapters train. Frozen weights go to half precision under mixed precision; adapters stay fp32.
    for model in (vae, text_encoder, unet):
        model.requires_grad_(False)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for model in (vae, text_encoder, unet):
        model.to(accelerator.device, dtype=weight_dtype)

    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()

    config = adapter_config(args)
    add_lie_adapters(unet, config)
    if args.train_text_encoder:
        add_lie_adapters(text_encoder, config)
    trained_models = [unet, text_encoder] if args.train_text_encoder else [unet]
    cast_training_params(trained_models, dtype=torch.float32)

    def adapted_models():
        """The models carrying trained adapters, unwrapped from DDP, by component name."""
        models = {"unet": accelerator.unwrap_model(unet)}
        if args.train_text_encoder:
            models["text_encoder"] = accelerator.unwrap_model(text_encoder)
        return models

    # accelerator.save_state / load_state: our adapter file replaces accelerate's full-model dump.
    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            save_lie_weights(output_dir, **adapted_models())
        weights.clear()

    def load_model_hook(models, input_dir):
        models.clear()
        load_adapters_in_place(input_dir, adapted_models())

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    text_encoder_lr = args.text_encoder_lr if args.text_encoder_lr is not None else args.learning_rate
    if args.scale_lr:
        factor = args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
        args.learning_rate, text_encoder_lr = args.learning_rate * factor, text_encoder_lr * factor

    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    param_groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": args.learning_rate}]
    if args.train_text_encoder:
        text_encoder_params = [p for p in text_encoder.parameters() if p.requires_grad]
        param_groups.append({"params": text_encoder_params, "lr": text_encoder_lr})
    params_to_optimize = [p for group in param_groups for p in group["params"]]
    optimizer = optimizer_class(
        param_groups,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )

    # Prompts are fixed: tokenize them once.
    def tokenize(prompt):
        return tokenizer(
            prompt, truncation=True, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
        ).input_ids.to(accelerator.device)

    instance_ids = tokenize(args.instance_prompt)
    class_ids = tokenize(args.class_prompt) if args.with_prior_preservation else None

    data_seed = args.seed if args.seed is not None else int(torch.randint(2**31, ()).item())
    train_dataset = DreamBoothDataset(
        instance_images, class_images, args.resolution, args.center_crop, args.random_flip,
        args.image_interpolation_mode, args.repeats, data_seed,
    )
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        collate_fn=collate_fn,
        num_workers=args.dataloader_num_workers,
        # Its own generator: starting an epoch must not draw from the global RNG (resume would diverge).
        generator=torch.Generator().manual_seed(data_seed),
    )

    # The scheduler is stepped once per process per update (see diffusers PR 8312), hence the factors.
    if args.max_train_steps is None:
        batches_per_process = math.ceil(len(train_dataloader) / accelerator.num_processes)
        scheduler_steps = args.num_train_epochs * math.ceil(batches_per_process / args.gradient_accumulation_steps)
    else:
        scheduler_steps = args.max_train_steps
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=scheduler_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )

    if args.train_text_encoder:
        unet, text_encoder, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
            unet, text_encoder, optimizer, train_dataloader, lr_scheduler
        )
    else:
        unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
            unet, optimizer, train_dataloader, lr_scheduler
        )
    trained_models = [unet, text_encoder] if args.train_text_encoder else [unet]

    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)

    if accelerator.is_main_process:
        accelerator.init_trackers("dreambooth-lie", config={k: v for k, v in vars(args).items() if v is not None})

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {len(train_dataset)}")
    logger.info(f"  Num batches each epoch = {len(train_dataloader)}")
    logger.info(f"  Num Epochs = {args.num_train_epochs}")
    logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    logger.info(f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {args.max_train_steps}")
    logger.info(f"  Trainable parameters = {sum(p.numel() for p in params_to_optimize):,}")

    global_step = 0
    if args.resume_from_checkpoint:
        checkpoint = find_checkpoint(args)
        if checkpoint is None:
            accelerator.print(f"No checkpoint in {args.output_dir}; starting a new training run.")
        else:
            accelerator.print(f"Resuming from checkpoint {checkpoint}")
            accelerator.load_state(str(checkpoint))
            global_step = int(CHECKPOINT_RE.fullmatch(checkpoint.name).group(1))
    first_epoch = global_step // num_update_steps_per_epoch
    # Batches of the first epoch that the checkpoint has already trained on.
    resume_batches = (global_step % num_update_steps_per_epoch) * args.gradient_accumulation_steps

    def save_checkpoint(step):
        """accelerator.save_state into a temporary folder, renamed when complete; then prune old ones."""
        if not all(torch.isfinite(p).all() for p in params_to_optimize):
            raise TrainingError(f"adapter weights are not finite at step {step}; not saving a checkpoint.")
        output_dir = Path(args.output_dir)
        final, partial = output_dir / f"checkpoint-{step}", output_dir / f".checkpoint-{step}.partial"
        if accelerator.is_main_process and partial.exists():
            shutil.rmtree(partial)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))  # every process writes its own RNG state
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            stale = output_dir / f".checkpoint-{step}.stale"  # written by a run this one resumed from before it
            if final.exists():
                os.replace(final, stale)
            os.replace(partial, final)
            shutil.rmtree(stale, ignore_errors=True)
            logger.info(f"Saved state to {final}")
            if args.checkpoints_total_limit is not None:
                steps = checkpoint_steps(output_dir)
                for old in steps[: max(0, len(steps) - args.checkpoints_total_limit)]:
                    logger.info(f"Removing checkpoint-{old} (--checkpoints_total_limit {args.checkpoints_total_limit})")
                    shutil.rmtree(output_dir / f"checkpoint-{old}")

    def compute_loss(batch):
        with torch.no_grad():
            pixel_values = batch["pixel_values"].to(dtype=weight_dtype)
            latents = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        bsz = latents.shape[0]
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device).long()
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)

        num_instances = bsz if class_ids is None else bsz // 2
        input_ids = instance_ids.expand(num_instances, -1)
        if class_ids is not None:
            input_ids = torch.cat([input_ids, class_ids.expand(bsz - num_instances, -1)])
        with torch.set_grad_enabled(args.train_text_encoder):
            encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]

        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        if noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        elif noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise TrainingError(f"Unknown prediction type {noise_scheduler.config.prediction_type}.")

        # Per-sample MSE, optionally Min-SNR weighted (https://arxiv.org/abs/2303.09556).
        per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if args.snr_gamma is not None:
            snr = compute_snr(noise_scheduler, timesteps)
            weights = torch.clamp(snr, max=args.snr_gamma)
            weights = weights / (snr + 1 if noise_scheduler.config.prediction_type == "v_prediction" else snr)
            per_sample = per_sample * weights
        if class_ids is None:
            return per_sample.mean()
        instance_loss, prior_loss = per_sample.chunk(2)
        return instance_loss.mean() + args.prior_loss_weight * prior_loss.mean()

    progress_bar = tqdm(
        range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    for epoch in range(first_epoch, args.num_train_epochs):
        for model in trained_models:
            model.train()
        train_dataset.epoch = epoch
        train_dataloader.set_epoch(epoch)
        batches = train_dataloader
        if epoch == first_epoch and resume_batches:
            batches = accelerator.skip_first_batches(train_dataloader, resume_batches)
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
                    accelerator.clip_grad_norm_(params_to_optimize, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            if accelerator.sync_gradients:
                progress_bar.update(1)
                global_step += 1
                if global_step % args.checkpointing_steps == 0:
                    save_checkpoint(global_step)
                logs = {"loss": mean_loss.item(), "lr": lr_scheduler.get_last_lr()[0]}
                if args.train_text_encoder:
                    logs["lr_text_encoder"] = lr_scheduler.get_last_lr()[1]
                progress_bar.set_postfix(**logs)
                accelerator.log(logs, step=global_step)
            if global_step >= args.max_train_steps:
                break

        # Periodic validation; the final one (below) covers the end of training.
        validate = args.validation_prompt and epoch % args.validation_epochs == 0
        if accelerator.is_main_process and validate and global_step < args.max_train_steps:
            for model in trained_models:
                model.eval()
            pipeline = DiffusionPipeline.from_pretrained(
                args.pretrained_model_name_or_path,
                unet=accelerator.unwrap_model(unet),
                text_encoder=accelerator.unwrap_model(text_encoder),
                vae=vae,
                tokenizer=tokenizer,
                safety_checker=None,
                revision=args.revision,
                variant=args.variant,
            )
            log_validation(pipeline, args, accelerator, global_step)
            del pipeline
            free_memory()

    # Save the adapters; then check the saved file the way a user would load it.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        path = save_lie_weights(args.output_dir, **adapted_models())
        logger.info(f"Saved the adapters to {path}")
        images = []
        if args.validation_prompt and args.num_validation_images > 0:
            pipeline = DiffusionPipeline.from_pretrained(
                args.pretrained_model_name_or_path, torch_dtype=weight_dtype, safety_checker=None,
                revision=args.revision, variant=args.variant,
            )
            load_lie_weights(pipeline, args.output_dir)
            images = log_validation(pipeline, args, accelerator, global_step, phase="test")
        save_model_card(args, images)
    accelerator.end_training()


if __name__ == "__main__":
    try:
        main(parse_args())
    except TrainingError as error:
        sys.exit(f"error: {error}")
