#!/usr/bin/env python
# Copyright 2025 The lie-diffusion authors. Licensed under the Apache License, Version 2.0.
"""DreamBooth fine-tuning of Stable Diffusion 3 / 3.5 with Lie-group adapters (LieRA).

The flags and the behaviour follow diffusers' `examples/dreambooth/train_dreambooth_lora_sd3.py`:
flow matching with its timestep densities and loss weightings (`--weighting_scheme`), EDM-style
preconditioned outputs (`--precondition_outputs`), two CLIP encoders and a T5 one with prompts up to
`--max_sequence_length` tokens, `--train_text_encoder` for both CLIP encoders (T5 never trains). The
transformer's Linear layers get Lie adapters (W' = W ⊙ exp(Δ)) on the layers `--target_preset` names
(default: diffusers' targets, the joint attention). The result is one `pytorch_lora_weights.safetensors`
that `lie_diffusion.load_lie_weights` puts back into a `StableDiffusion3Pipeline`.

    accelerate launch train_scripts/train_dreambooth_lie_sd3.py \
      --pretrained_model_name_or_path stabilityai/stable-diffusion-3.5-medium --mixed_precision bf16 \
      --instance_data_dir dog --instance_prompt "a photo of sks dog" --output_dir lie-dog-sd3

Data, checkpoints and the loop are shared with the other DreamBooth scripts (`lie_diffusion/training/`);
flow matching is in `training/flow.py`, what is particular to SD3 in `training/sd3.py`.
"""

import argparse
import sys

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import AutoTokenizer

from lie_diffusion import training
from lie_diffusion.training import TrainingError, flow, sd3
from lie_diffusion.training.sd3 import FAMILY, TEXT_ENCODERS


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="DreamBooth training of SD3 / SD3.5 with Lie-group adapters.")
    training.add_shared_arguments(parser, resolution=512, output_dir="lie-dreambooth-sd3-model",
                                  text_encoders="both CLIP text encoders (T5 never trains)")
    training.add_transformer_arguments(parser, "sd3")
    flow.add_flow_arguments(parser, weighting_scheme="logit_normal")
    parser.add_argument("--max_sequence_length", type=int, default=77,
                        help="Maximum length of the T5 prompt, in tokens.")
    parser.add_argument("--precondition_outputs", type=int, default=1, choices=[0, 1],
                        help="1: precondition the outputs as in EDM (Karras et al. 2022, section 5), the model's "
                             "prediction turned into clean latents and compared with them; 0: compare the "
                             "velocity with noise - latents.")
    return flow.check_flow_args(training.check_args(parser.parse_args(input_args)))


def main(args):
    def load_pipeline(torch_dtype, **components):
        """The base pipeline, with any of its models replaced by `components`."""
        return StableDiffusion3Pipeline.from_pretrained(
            args.pretrained_model_name_or_path, torch_dtype=torch_dtype, revision=args.revision,
            variant=args.variant, **components,
        )

    accelerator, instance_data, class_data = training.start_run(args, load_pipeline)

    # Tokenizers, scheduler and models; only the adapters train (fp32, frozen weights in the weight dtype).
    tokenizers = [
        AutoTokenizer.from_pretrained(args.pretrained_model_name_or_path, subfolder=name, revision=args.revision)
        for name in ("tokenizer", "tokenizer_2", "tokenizer_3")
    ]
    noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="scheduler", revision=args.revision
    )
    *clips, t5 = [training.load_text_encoder(args, name) for name in TEXT_ENCODERS]
    vae = training.load_model(args, AutoencoderKL, "vae")
    transformer = training.load_model(args, SD3Transformer2DModel, "transformer")
    weight_dtype = training.weight_dtype_of(accelerator)
    for frozen in (vae, t5):
        frozen.requires_grad_(False).to(accelerator.device, dtype=weight_dtype)
    trained_models = training.add_adapters(args, accelerator, transformer, clips)
    adapted_models = dict(zip(["transformer", *TEXT_ENCODERS], trained_models))
    optimizer = training.build_optimizer(args, accelerator, trained_models)
    encode_prompts = sd3.PromptEncoder(tokenizers, accelerator.device, args.max_sequence_length,
                                       cache=not args.train_text_encoder)

    train_dataset, train_dataloader = training.build_dataloader(args, accelerator, instance_data, class_data)
    lr_scheduler = training.build_lr_scheduler(args, accelerator, optimizer, train_dataloader)
    *trained_models, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        *trained_models, optimizer, train_dataloader, lr_scheduler
    )
    transformer = trained_models[0]
    if args.train_text_encoder:
        clips = trained_models[1:]

    def compute_loss(batch):
        with torch.no_grad():
            latents = flow.latents_of(vae, batch["pixel_values"]).to(weight_dtype)
        noisy_latents, noise, timesteps, sigmas = flow.noisy_latents(args, noise_scheduler, latents)
        with torch.set_grad_enabled(args.train_text_encoder):
            prompt_embeds, pooled = encode_prompts([*clips, t5], batch["prompts"])

        model_pred = transformer(
            hidden_states=noisy_latents, timestep=timesteps, encoder_hidden_states=prompt_embeds,
            pooled_projections=pooled, return_dict=False,
        )[0]
        if args.precondition_outputs:
            model_pred = model_pred * (-sigmas) + noisy_latents  # the clean latents it implies
            target = latents
        else:
            target = noise - latents  # the velocity of the straight path from the latents to the noise
        weighting = flow.loss_weighting(args, sigmas)
        return training.denoising_loss(args, noise_scheduler, model_pred, target, timesteps,
                                       args.with_prior_preservation, weighting)

    def validation_pipeline():
        return load_pipeline(
            None, transformer=accelerator.unwrap_model(transformer), text_encoder=accelerator.unwrap_model(clips[0]),
            text_encoder_2=accelerator.unwrap_model(clips[1]), text_encoder_3=t5, vae=vae, tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1], tokenizer_3=tokenizers[2],
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
