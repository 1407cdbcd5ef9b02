"""The command-line flags every DreamBooth script shares, with diffusers' meanings, and their checks."""

from __future__ import annotations

import argparse

import torch
from diffusers.utils.import_utils import is_xformers_available

from ..inject import DEFAULT_PRESETS, PRESETS, LieConfig
from .checkpoints import find_checkpoint
from .data import INTERPOLATION, METADATA
from .errors import TrainingError


# What the shared code reads of the DreamBooth-only flags, in a run without them: every image has its caption.
NOT_DREAMBOOTH = dict(instance_prompt=None, repeats=1, caption_extension=None, missing_caption="error",
                      with_prior_preservation=False)


def add_shared_arguments(parser: argparse.ArgumentParser, resolution: int, output_dir: str, text_encoders: str,
                         task: str = "dreambooth") -> None:
    """The flags every training script takes, with diffusers' LoRA meanings, plus the adapter flags.

    The defaults that differ by model are arguments: `resolution`, `output_dir`, and `text_encoders`
    (what `--train_text_encoder` adapts, for its help). `task` "dreambooth" adds the instance, caption and
    prior-preservation flags; "text-to-image" leaves them to the script (its data set brings the captions).
    It is kept in `args.task`.
    """
    parser.set_defaults(task=task)
    if task != "dreambooth":
        parser.set_defaults(**NOT_DREAMBOOTH)
    # Model
    parser.add_argument("--pretrained_model_name_or_path", type=str, required=True,
                        help="Path to a pipeline folder or a model id on huggingface.co.")
    parser.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model.")
    parser.add_argument("--variant", type=str, default=None, help="Variant of the model files, e.g. fp16.")
    # Data
    if task == "dreambooth":
        parser.add_argument("--instance_data_dir", type=str, required=True,
                            help="A folder with the instance images.")
        parser.add_argument("--instance_prompt", type=str, required=True,
                            help="The prompt with the identifier of the instance, e.g. 'a photo of sks dog'.")
    else:
        parser.add_argument("--train_data_dir", type=str, default=None,
                            help=f"A folder of images with a {METADATA}: one JSON object a line, with the image's "
                                 "'file_name' and its caption (in --caption_column).")
        parser.add_argument("--dataset_name", type=str, default=None,
                            help="A datasets data set: a folder saved with save_to_disk, or a name load_dataset "
                                 "reads (its 'train' split). Needs the datasets library.")
        parser.add_argument("--dataset_config_name", type=str, default=None,
                            help="The data set's config, if it has several (load_dataset only).")
        parser.add_argument("--cache_dir", type=str, default=None, help="Where load_dataset caches downloads.")
        parser.add_argument("--image_column", type=str, default="image",
                            help="The data set's column of images (--dataset_name).")
        parser.add_argument("--caption_column", type=str, default="text",
                            help="The column of captions: a string, or a list of strings of which one is drawn "
                                 "each time the image is seen.")
        parser.add_argument("--max_train_samples", type=int, default=None,
                            help="Train on this many images, drawn with --seed (for debugging or a quicker run).")
    parser.add_argument("--resolution", type=int, default=resolution,
                        help="Training images are resized (shorter side) and cropped to this size.")
    parser.add_argument("--center_crop", action="store_true",
                        help="Center-crop the images; by default they are randomly cropped.")
    parser.add_argument("--random_flip", action="store_true", help="Randomly flip the images horizontally.")
    parser.add_argument("--image_interpolation_mode", type=str, default="lanczos", choices=sorted(INTERPOLATION),
                        help="The filter used to resize images.")
    if task == "dreambooth":
        parser.add_argument("--repeats", type=int, default=1, help="How many times to repeat the instance images.")
        # Captions (instance and class images alike); the prompts above are the fallback
        parser.add_argument("--caption_extension", type=_extension, default=None,
                            help="Per-image captions in sidecar files, kohya's convention: the first line of "
                                 "image.txt captions image.png for '.txt'.")
        parser.add_argument("--caption_column", type=str, default=None,
                            help=f"Per-image captions from a {METADATA} in the image folder: one JSON object a line "
                                 "with 'file_name' and this column (usually 'text').")
        parser.add_argument("--missing_caption", type=str, default="fallback", choices=["fallback", "error"],
                            help="An instance image without a caption (no caption file, an empty one, no metadata "
                                 "line) trains with --instance_prompt ('fallback'), or stops the run at start-up "
                                 "('error'). Class images without one always take --class_prompt.")
        # Prior preservation
        parser.add_argument("--with_prior_preservation", action="store_true", help="Add the prior preservation loss.")
        parser.add_argument("--class_data_dir", type=str, default=None, help="A folder with the class images.")
        parser.add_argument("--class_prompt", type=str, default=None, help="The class prompt, e.g. 'a photo of dog'.")
        parser.add_argument("--num_class_images", type=int, default=100,
                            help="Minimal number of class images; missing ones are generated with the base model.")
        parser.add_argument("--prior_loss_weight", type=float, default=1.0, help="The weight of the prior loss.")
        parser.add_argument("--prior_generation_precision", type=str, default=None,
                            choices=["no", "fp32", "fp16", "bf16"],
                            help="Precision of class image generation; default fp16 on a GPU, else fp32.")
        parser.add_argument("--sample_batch_size", type=int, default=4, help="Batch size for class image generation.")
    # Validation
    parser.add_argument("--validation_prompt", type=str, default=None,
                        help="A prompt used during and after training to check that the model is learning.")
    parser.add_argument("--num_validation_images", type=int, default=4, help="Images generated per validation.")
    parser.add_argument("--validation_epochs", type=int, default=50, help="Run validation every X epochs.")
    parser.add_argument("--num_inference_steps", type=int, default=25,
                        help="Denoising steps for validation images and generated class images (DPM-Solver++, or the "
                             "model's own sampler on EDM and flow-matching models).")
    # Adapters
    parser.add_argument("--rank", type=int, default=4, help="Rank of the adapters (Lie and attention).")
    parser.add_argument("--alpha", "--lora_alpha", type=float, default=None,
                        help="Adapter alpha; the update is scaled by alpha / rank. Default: the rank.")
    parser.add_argument("--lie_mode", type=str, default="exp", choices=["exp", "taylor"],
                        help="Lie update: 'exp' (W ⊙ exp Δ, the group update) or 'taylor' (W + W ⊙ Δ).")
    parser.add_argument("--attn_adapter", type=str, default="lora", choices=["lora", "lie", "none"],
                        help="Adapter on a UNet's attention projections or a transformer's targeted Linear layers, "
                             "and on the text encoders. Default: lora on a UNet, the --target_preset's (lie) on a "
                             "transformer.")
    parser.add_argument("--lie_balance", type=str, default="rms", choices=["rms", "none"],
                        help="Scale of each Lie adapter: 'rms' divides its alpha by the RMS of its kernel, so one "
                             "learning rate moves Lie and LoRA weights alike; 'none': alpha / rank, as in LoRA.")
    parser.add_argument("--conv_rank", type=int, default=None, help="Rank of the conv Lie adapters (default: --rank).")
    parser.add_argument("--conv_alpha", type=float, default=None,
                        help="Alpha of the conv Lie adapters (default: --alpha, else the conv rank).")
    parser.add_argument("--conv_targets", type=str, default=None,
                        help="Comma-separated regexes matched against the end of Conv2d module names.")
    parser.add_argument("--attn_targets", type=str, default=None,
                        help="Comma-separated regexes matched against the end of attention (UNet) or any Linear "
                             "(transformer) module names.")
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
    parser.add_argument("--noise_offset", type=float, default=0.0,
                        help="Scale of the noise offset (https://www.crosslabs.org/blog/diffusion-with-offset-noise): "
                             "per-channel constant noise added to the training noise, for darker and brighter images.")
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


def add_transformer_arguments(parser: argparse.ArgumentParser, family: str) -> None:
    """What a diffusion-transformer script (Flux, SD3) adds to the shared flags, and the defaults of its diffusers
    original that differ from the UNet scripts'. `family`: "flux" or "sd3"."""
    presets = [name for name, preset in PRESETS.items() if preset.family == family]
    default = next(name for name in DEFAULT_PRESETS.values() if name in presets)
    described = "; ".join(f"{name}: {PRESETS[name].description}" for name in presets)
    parser.add_argument("--target_preset", type=str, default=default, choices=presets,
                        help=f"Which layers get adapters: {described}. "
                             f"Default {default!r} (diffusers' targets; provisional until measured). "
                             "--attn_targets / --conv_targets replace its choice.")
    parser.set_defaults(
        attn_adapter=None,  # the preset's: Lie on the transformer's Linear layers
        learning_rate=1e-4, text_encoder_lr=5e-6, adam_weight_decay=1e-4, num_inference_steps=28,
    )


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
    if args.task != "dreambooth" and (args.train_data_dir is None) == (args.dataset_name is None):
        raise TrainingError("Give the training data: --train_data_dir (an image folder) or --dataset_name, "
                            "one of them.")
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
    """LieConfig for the denoiser; --rank/--alpha apply to both groups, --conv_* override the conv one."""
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
        balance=args.lie_balance, attn_adapter=args.attn_adapter, dropout=args.adapter_dropout,
        preset=getattr(args, "target_preset", None), **targets,
    )
