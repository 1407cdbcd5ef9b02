"""The training loop (resume, steps, checkpoints, the NaN stop, logs), validation images and the final save."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from accelerate.logging import get_logger
from diffusers.training_utils import free_memory
from diffusers.utils import make_image_grid
from tqdm.auto import tqdm

from ..io import load_lie_weights, save_lie_weights
from .checkpoints import CHECKPOINT_RE, checkpoint_steps, find_checkpoint, load_training_state, save_checkpoint
from .data import fast_sampler
from .errors import DivergedError
from .model_card import save_model_card
from .run import weight_dtype_of
from .sharding import gathered, is_sharded

logger = get_logger(__name__)


def train_loop(args, accelerator, family, *, adapted_models, optimizer, lr_scheduler, dataset, dataloader,
               compute_loss, validation_pipeline, validation_kwargs=None):
    """Resume if asked, then train to `max_train_steps`: checkpoints, NaN stop, logs, periodic validation.

    `adapted_models`: the models whose adapters train, by component name ("unet", "text_encoder", ...).
    Under FSDP the periodic validation is skipped: the sharded models run only with every process taking part.
    `compute_loss(batch)` gives the loss of one batch; `validation_pipeline()` builds a pipeline around
    the models being trained. Returns the last global step.
    """
    trained_models = list(adapted_models.values())
    params = [p for group in optimizer.param_groups for p in group["params"]]  # as prepared (sharded under FSDP)
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

    sharded = is_sharded(accelerator)
    if sharded and args.validation_prompt:
        logger.warning("FSDP: no validation during training; the test images after training are made on the "
                       "main process from the saved file.")
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
                    raise DivergedError(
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
        if accelerator.is_main_process and validate and global_step < args.max_train_steps and not sharded:
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
    with gathered(adapted_models.values()):
        if accelerator.is_main_process:
            path = save_lie_weights(args.output_dir, **adapted_models)
            logger.info(f"Saved the adapters to {path}")
    if accelerator.is_main_process:
        images = []
        if args.validation_prompt and args.num_validation_images > 0:
            pipeline = load_pipeline(weight_dtype_of(accelerator))
            load_lie_weights(pipeline, args.output_dir)
            images = log_validation(pipeline, args, accelerator, step, phase="test", **(validation_kwargs or {}))
        save_model_card(args, images, family, list(adapted_models))
    accelerator.end_training()
