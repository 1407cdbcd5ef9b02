#!/usr/bin/env python
# Copyright 2025 The lie-diffusion authors. Licensed under the Apache License, Version 2.0.
"""DreamBooth fine-tuning of Stable Diffusion XL with Lie-group adapters (LieRA).

The flags and the behaviour follow diffusers' `examples/dreambooth/train_dreambooth_lora_sdxl.py`:
two tokenizers and text encoders (the second gives the pooled embedding), SDXL's micro-conditioning
(original size, crop top-left, target size), an optional fp16-safe VAE, EDM-style training, Prodigy.
The UNet's convolutions get Lie adapters (W' = W ⊙ exp(Δ)), its attention projections LoRA (or Lie,
or nothing: `--attn_adapter`); `--train_text_encoder` adapts both text encoders. The result is one
`pytorch_lora_weights.safetensors` with `unet`, `text_encoder`, `text_encoder_2` and `lie.` sections.

    accelerate launch train_scripts/train_dreambooth_lie_sdxl.py \
      --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
      --pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix \
      --instance_data_dir dog --instance_prompt "a photo of sks dog" --output_dir lie-dog-sdxl

What the DreamBooth scripts share (data, checkpoints, the loop) is in `lie_diffusion/training/`, what is particular
to SDXL in `lie_diffusion/training/sdxl.py`.
"""

import argparse
import sys

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import AutoTokenizer

from lie_diffusion import training
from lie_diffusion.training import TrainingError
from lie_diffusion.training import sdxl
from lie_diffusion.training.sdxl import FAMILY, TEXT_ENCODERS, check_sdxl_model


def parse_args(input_args=None, task="dreambooth"):
    """The flags; `task` "text-to-image" gives those of train_text_to_image_lie_sdxl.py (a captioned data set)."""
    what = {"dreambooth": "DreamBooth", "text-to-image": "Text-to-image"}[task]
    parser = argparse.ArgumentParser(description=f"{what} training of SDXL with Lie-group adapters.")
    training.add_shared_arguments(parser, resolution=1024, output_dir=f"lie-{task}-sdxl-model",
                                  text_encoders="both text encoders (saved as text_encoder and text_encoder_2)",
                                  task=task)
    parser.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None,
                        help="A VAE to use instead of the model's own, e.g. madebyollin/sdxl-vae-fp16-fix "
                             "(SDXL's VAE overflows in fp16). With it, the VAE runs in the weight dtype; "
                             "without it, in fp32.")
    parser.add_argument("--crops_coords_top_left_h", type=int, default=None,
                        help="Condition on this crop top (pixels) instead of each image's real crop; SDXL's "
                             "authors use 0 to ask for centred subjects. Also used for validation images.")
    parser.add_argument("--crops_coords_top_left_w", type=int, default=None,
                        help="Condition on this crop left (pixels); see --crops_coords_top_left_h.")
    parser.add_argument("--do_edm_style_training", action="store_true",
                        help="EDM-style training (Karras et al. 2022, section 5): preconditioned inputs and "
                             "outputs, x0 target. On automatically for models with an EDM scheduler.")
    args = training.check_args(parser.parse_args(input_args))
    if (args.crops_coords_top_left_h is None) != (args.crops_coords_top_left_w is None):
        raise TrainingError("--crops_coords_top_left_h and --crops_coords_top_left_w go together: give both.")
    if args.do_edm_style_training and args.snr_gamma is not None:
        raise TrainingError("--snr_gamma does not apply to --do_edm_style_training (EDM weights by sigma).")
    return args


def main(args):
    check_sdxl_model(args)

    def load_pipeline(torch_dtype, **components):
        """The base pipeline (with --pretrained_vae_model_name_or_path's VAE), models replaced by `components`."""
        if args.pretrained_vae_model_name_or_path and "vae" not in components:
            components["vae"] = AutoencoderKL.from_pretrained(
                args.pretrained_vae_model_name_or_path, torch_dtype=torch_dtype
            )
        return StableDiffusionXLPipeline.from_pretrained(
            args.pretrained_model_name_or_path, torch_dtype=torch_dtype, revision=args.revision,
            variant=args.variant, **components,
        )

    # The first text encoder's last layer feeds nothing (SDXL reads its penultimate hidden states):
    # with --train_text_encoder its adapters get no gradient, which DDP must be told about.
    accelerator, instance_data, class_data = training.start_run(args, load_pipeline, find_unused_parameters=True)

    # Tokenizers, scheduler and models. EDM models (e.g. Playground v2.5) always train EDM-style.
    tokenizers = [
        AutoTokenizer.from_pretrained(args.pretrained_model_name_or_path, subfolder=name, revision=args.revision)
        for name in ("tokenizer", "tokenizer_2")
    ]
    noise_scheduler, edm_model = sdxl.noise_scheduler(args)
    text_encoders = [training.load_text_encoder(args, name) for name in TEXT_ENCODERS]
    if args.pretrained_vae_model_name_or_path:
        vae = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path)
    else:
        vae = training.load_model(args, AutoencoderKL, "vae")
    unet = training.load_model(args, UNet2DConditionModel, "unet")

    # Only the adapters train (fp32); frozen weights in the weight dtype, except SDXL's own VAE: fp32.
    weight_dtype = training.weight_dtype_of(accelerator)
    vae_dtype = weight_dtype if args.pretrained_vae_model_name_or_path else torch.float32
    vae.requires_grad_(False).to(accelerator.device, dtype=vae_dtype)
    trained_models = training.add_adapters(args, accelerator, unet, text_encoders)
    adapted_models = dict(zip(["unet", *TEXT_ENCODERS], trained_models))
    optimizer = training.build_optimizer(args, accelerator, trained_models)

    latents_mean = latents_std = None
    if getattr(vae.config, "latents_mean", None) is not None:
        latents_mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1).to(accelerator.device)
        latents_std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1).to(accelerator.device)

    # Each image's prompt (its caption, or the instance / class prompt) comes with the batch.
    encode_prompts = sdxl.PromptEncoder(tokenizers, accelerator.device, cache=not args.train_text_encoder)

    train_dataset, train_dataloader = training.build_dataloader(args, accelerator, instance_data, class_data)
    lr_scheduler = training.build_lr_scheduler(args, accelerator, optimizer, train_dataloader)
    *trained_models, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        *trained_models, optimizer, train_dataloader, lr_scheduler
    )
    unet = trained_models[0]
    if args.train_text_encoder:
        text_encoders = trained_models[1:]

    def compute_loss(batch):
        with torch.no_grad():
            latents = vae.encode(batch["pixel_values"].to(dtype=vae_dtype)).latent_dist.sample()
            if latents_mean is None:
                latents = latents * vae.config.scaling_factor
            else:
                latents = (latents - latents_mean) * vae.config.scaling_factor / latents_std
            latents = latents.to(weight_dtype)
        noise = training.training_noise(args, latents)
        bsz, with_prior = latents.shape[0], args.with_prior_preservation
        if args.do_edm_style_training:
            # EDM conditions on noise levels: draw indices into the scheduler's (sigma-derived) timesteps.
            indices = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,))
            timesteps = noise_scheduler.timesteps[indices].to(latents.device)
            sigmas = noise_scheduler.sigmas[indices].to(latents.device, latents.dtype).view(-1, 1, 1, 1)
        else:
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device)
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        model_input = noisy_latents
        if args.do_edm_style_training:
            model_input = sdxl.edm_inputs(noise_scheduler, edm_model, noisy_latents, sigmas)

        with torch.set_grad_enabled(args.train_text_encoder):
            prompt_embeds, pooled = encode_prompts(text_encoders, batch["prompts"])
        size_crops = sdxl.time_ids(args, batch["size_crops"], accelerator.device, weight_dtype)
        conditions = {"text_embeds": pooled, "time_ids": size_crops}
        model_pred = unet(model_input, timesteps, prompt_embeds, added_cond_kwargs=conditions, return_dict=False)[0]

        if not args.do_edm_style_training:
            target = training.noise_target(noise_scheduler, latents, noise, timesteps)
            return training.denoising_loss(args, noise_scheduler, model_pred, target, timesteps, with_prior)
        # EDM: turn the prediction into an estimate of the clean latents, the target.
        model_pred, weighting = sdxl.edm_clean_estimate(noise_scheduler, edm_model, noisy_latents, model_pred, sigmas)
        return training.denoising_loss(args, noise_scheduler, model_pred, latents, timesteps, with_prior, weighting)

    validation_kwargs = {}
    if args.crops_coords_top_left_h is not None:
        validation_kwargs["crops_coords_top_left"] = (args.crops_coords_top_left_h, args.crops_coords_top_left_w)

    def validation_pipeline():
        return load_pipeline(
            None, unet=accelerator.unwrap_model(unet), text_encoder=accelerator.unwrap_model(text_encoders[0]),
            text_encoder_2=accelerator.unwrap_model(text_encoders[1]), vae=vae, tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1],
        )

    global_step = training.train_loop(
        args, accelerator, FAMILY, adapted_models=adapted_models, optimizer=optimizer,
        lr_scheduler=lr_scheduler, dataset=train_dataset, dataloader=train_dataloader, compute_loss=compute_loss,
        validation_pipeline=validation_pipeline, validation_kwargs=validation_kwargs,
    )
    # Save the adapters; then check the saved file the way a user would load it.
    training.finish_training(args, accelerator, FAMILY, adapted_models, load_pipeline, global_step, validation_kwargs)


if __name__ == "__main__":
    try:
        main(parse_args())
    except TrainingError as error:
        sys.exit(f"error: {error}")
