"""Setting a run up: the accelerator and the data, the models with their adapters, optimizer, loader, scheduler."""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from pathlib import Path

import diffusers
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from transformers import AutoConfig

from ..inject import add_lie_adapters
from .data import (DreamBoothDataset, ImageSet, caption_files, caption_images, collate_fn, generate_class_images,
                   list_images, text_image_data)
from .errors import TrainingError
from .flags import adapter_config
from .sharding import broadcast_adapters, check_sharding

logger = get_logger(__name__)


def start_run(args, load_pipeline, find_unused_parameters=False):
    """Accelerator, logging and seed; then the data (instance images, generated class images), checked.

    `load_pipeline(torch_dtype, **components)` loads the base pipeline (for class images and validation).
    `find_unused_parameters`: some trained adapters may get no gradient in a step (DDP must not wait for them).
    Returns (accelerator, instance, class_): the `ImageSet`s (images and their prompts) of each role; a
    text-to-image run (`args.task`) has its data set as the instance images and no class images.
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
    check_sharding(args, accelerator)
    # Data first: a bad folder should fail in a second, not after the models have loaded.
    if args.task == "dreambooth":
        instance_images = list_images(args.instance_data_dir, "Instance", caption_files(args))
        if not instance_images:
            raise TrainingError(f"Instance directory {args.instance_data_dir} holds no readable images.")
        instance = caption_images(args, args.instance_data_dir, instance_images, args.instance_prompt, "Instance")
    else:  # a text-to-image data set: every image with its caption
        instance = text_image_data(args)

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


def load_script(path):
    """A training script file as a module (scripts are no package): the text-to-image scripts run the
    `parse_args` and `main` of their DreamBooth sibling."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    broadcast_adapters(accelerator, trained)
    return trained


def build_optimizer(args, accelerator, trained_models):
    """AdamW (or 8-bit AdamW, or Prodigy) over the adapters of the UNet (first) and of the text encoders.

    Returns the optimizer (its param groups: the UNet's adapters, then the text encoders').
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
    return optimizer


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
