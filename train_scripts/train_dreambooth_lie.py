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
import sys

import torch
import transformers
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import cast_training_params
from transformers import AutoConfig, AutoTokenizer

from lie_diffusion import add_lie_adapters
from lie_diffusion.training import (
    DreamBoothDataset,  # noqa: F401 - part of the script's namespace (tests, users importing it)
    ModelFamily,
    TrainingError,
    adapter_config,
    add_shared_arguments,
    build_dataloader,
    build_lr_scheduler,
    build_optimizer,
    check_args,
    denoising_loss,
    finish_training,
    load_rgb,  # noqa: F401
    noise_target,
    register_adapter_hooks,
    start_run,
    train_loop,
    weight_dtype_of,
)

FAMILY = ModelFamily(
    title="Stable Diffusion",
    pipeline_class="DiffusionPipeline",
    tags=("stable-diffusion", "stable-diffusion-diffusers"),
    tracker="dreambooth-lie",
)


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="DreamBooth training of Stable Diffusion with Lie-group adapters.")
    add_shared_arguments(parser)
    parser.add_argument("--tokenizer_name", type=str, default=None,
                        help="Tokenizer name or path, if not the model's own.")
    parser.add_argument("--resolution", type=int, default=512,
                        help="Training images are resized (shorter side) and cropped to this size.")
    parser.add_argument("--train_text_encoder", action="store_true", help="Also train adapters on the text encoder.")
    parser.add_argument("--output_dir", type=str, default="lie-dreambooth-model",
                        help="Where the adapter weights, checkpoints, validation images and logs are written.")
    args = parser.parse_args(input_args)
    check_args(args)
    return args


def main(args):
    def load_pipeline(torch_dtype, **components):
        """The base pipeline, with any of its models replaced by `components`."""
        return DiffusionPipeline.from_pretrained(
            args.pretrained_model_name_or_path, torch_dtype=torch_dtype, safety_checker=None,
            revision=args.revision, variant=args.variant, **components,
        )

    accelerator, instance_images, class_images = start_run(args, load_pipeline)

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
    weight_dtype = weight_dtype_of(accelerator)
    for model in (vae, text_encoder, unet):
        model.requires_grad_(False)
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

    register_adapter_hooks(accelerator, adapted_models)

    unet_params = [p for p in unet.parameters() if p.requires_grad]
    text_encoder_params = [p for p in text_encoder.parameters() if p.requires_grad] if args.train_text_encoder else []
    params_to_optimize = unet_params + text_encoder_params
    optimizer = build_optimizer(args, accelerator, unet_params, text_encoder_params)

    # Prompts are fixed: tokenize them once.
    def tokenize(prompt):
        return tokenizer(
            prompt, truncation=True, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
        ).input_ids.to(accelerator.device)

    instance_ids = tokenize(args.instance_prompt)
    class_ids = tokenize(args.class_prompt) if args.with_prior_preservation else None

    train_dataset, train_dataloader = build_dataloader(args, accelerator, instance_images, class_images)
    lr_scheduler = build_lr_scheduler(args, accelerator, optimizer, train_dataloader)
    unet, optimizer, train_dataloader, lr_scheduler, *trained_text_encoders = accelerator.prepare(
        unet, optimizer, train_dataloader, lr_scheduler, *trained_models[1:]
    )
    if trained_text_encoders:
        text_encoder = trained_text_encoders[0]
    trained_models = [unet, *trained_text_encoders]

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
        target = noise_target(noise_scheduler, latents, noise, timesteps)
        return denoising_loss(args, noise_scheduler, model_pred, target, timesteps, class_ids is not None)

    def validation_pipeline():
        return load_pipeline(
            None, unet=accelerator.unwrap_model(unet), text_encoder=accelerator.unwrap_model(text_encoder),
            vae=vae, tokenizer=tokenizer,
        )

    global_step = train_loop(
        args, accelerator, FAMILY, trained_models=trained_models, params=params_to_optimize, optimizer=optimizer,
        lr_scheduler=lr_scheduler, dataset=train_dataset, dataloader=train_dataloader, compute_loss=compute_loss,
        validation_pipeline=validation_pipeline,
    )
    # Save the adapters; then check the saved file the way a user would load it.
    finish_training(args, accelerator, FAMILY, adapted_models, load_pipeline, global_step)


if __name__ == "__main__":
    try:
        main(parse_args())
    except TrainingError as error:
        sys.exit(f"error: {error}")
