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
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from transformers import AutoTokenizer

from lie_diffusion import training
# Also reached through this module by the tests and by code that imports the script.
from lie_diffusion.training import DreamBoothDataset, TrainingError, adapter_config, load_rgb  # noqa: F401
from lie_diffusion.training.sd import FAMILY, PromptEncoder


def parse_args(input_args=None, task="dreambooth"):
    """The flags; `task` "text-to-image" gives those of train_text_to_image_lie.py (a captioned data set)."""
    what = {"dreambooth": "DreamBooth", "text-to-image": "Text-to-image"}[task]
    parser = argparse.ArgumentParser(description=f"{what} training of Stable Diffusion with Lie-group adapters.")
    training.add_shared_arguments(parser, resolution=512, output_dir=f"lie-{task}-model",
                                  text_encoders="the text encoder", task=task)
    parser.add_argument("--tokenizer_name", type=str, default=None,
                        help="Tokenizer name or path, if not the model's own.")
    return training.check_args(parser.parse_args(input_args))


def main(args):
    def load_pipeline(torch_dtype, **components):
        """The base pipeline, with any of its models replaced by `components`."""
        return DiffusionPipeline.from_pretrained(
            args.pretrained_model_name_or_path, torch_dtype=torch_dtype, safety_checker=None,
            revision=args.revision, variant=args.variant, **components,
        )

    accelerator, instance_data, class_data = training.start_run(args, load_pipeline)

    # Load the tokenizer, scheduler and models; only the adapters train (fp32, frozen weights in the weight dtype).
    if args.tokenizer_name:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name, revision=args.revision)
    else:
        tokenizer = AutoTokenizer.from_pretrained(
            args.pretrained_model_name_or_path, subfolder="tokenizer", revision=args.revision
        )
    noise_scheduler = DDPMScheduler.from_pretrained(args.pretrained_model_name_or_path, subfolder="scheduler")
    text_encoder = training.load_text_encoder(args, "text_encoder")
    vae = training.load_model(args, AutoencoderKL, "vae")
    unet = training.load_model(args, UNet2DConditionModel, "unet")
    weight_dtype = training.weight_dtype_of(accelerator)
    vae.requires_grad_(False).to(accelerator.device, dtype=weight_dtype)
    trained_models = training.add_adapters(args, accelerator, unet, [text_encoder])
    adapted_models = dict(zip(["unet", "text_encoder"], trained_models))
    optimizer = training.build_optimizer(args, accelerator, trained_models)

    encode_prompts = PromptEncoder(tokenizer, accelerator.device)  # each image's caption, or the prompt of its role

    train_dataset, train_dataloader = training.build_dataloader(args, accelerator, instance_data, class_data)
    lr_scheduler = training.build_lr_scheduler(args, accelerator, optimizer, train_dataloader)
    *trained_models, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        *trained_models, optimizer, train_dataloader, lr_scheduler
    )
    unet = trained_models[0]
    if args.train_text_encoder:
        text_encoder = trained_models[1]

    def compute_loss(batch):
        with torch.no_grad():
            pixel_values = batch["pixel_values"].to(dtype=weight_dtype)
            latents = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
        noise = training.training_noise(args, latents)
        bsz = latents.shape[0]
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device).long()
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)

        with torch.set_grad_enabled(args.train_text_encoder):
            encoder_hidden_states = encode_prompts(text_encoder, batch["prompts"])

        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        target = training.noise_target(noise_scheduler, latents, noise, timesteps)
        return training.denoising_loss(args, noise_scheduler, model_pred, target, timesteps, args.with_prior_preservation)

    def validation_pipeline():
        return load_pipeline(
            None, unet=accelerator.unwrap_model(unet), text_encoder=accelerator.unwrap_model(text_encoder),
            vae=vae, tokenizer=tokenizer,
        )

    global_step = training.train_loop(
        args, accelerator, FAMILY, adapted_models=adapted_models, optimizer=optimizer,
        lr_scheduler=lr_scheduler, dataset=train_dataset, dataloader=train_dataloader, compute_loss=compute_loss,
        validation_pipeline=validation_pipeline,
    )
    # Save the adapters; then check the saved file the way a user would load it.
    training.finish_training(args, accelerator, FAMILY, adapted_models, load_pipeline, global_step)


if __name__ == "__main__":
    try:
        main(parse_args())
    except TrainingError as error:
        sys.exit(f"error: {error}")
