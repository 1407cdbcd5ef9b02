#!/usr/bin/env python
# Copyright 2025 The lie-diffusion authors. Licensed under the Apache License, Version 2.0.
"""DreamBooth fine-tuning of Flux.1 with Lie-group adapters (LieRA).

The flags and the behaviour follow diffusers' `examples/dreambooth/train_dreambooth_lora_flux.py`:
flow matching with its timestep densities and loss weightings (`--weighting_scheme`), latents packed
into 2x2 patches, FLUX.1-dev's guidance embedding (`--guidance_scale`), T5 prompts up to
`--max_sequence_length` tokens, `--train_text_encoder` for the CLIP encoder (T5 never trains). The
transformer's Linear layers get Lie adapters (W' = W ⊙ exp(Δ)) on the layers `--target_preset` names
(default: diffusers' targets, attention and feed-forwards). The result is one
`pytorch_lora_weights.safetensors` that `lie_diffusion.load_lie_weights` puts back into a `FluxPipeline`.

    accelerate launch train_scripts/train_dreambooth_lie_flux.py \
      --pretrained_model_name_or_path black-forest-labs/FLUX.1-dev --mixed_precision bf16 \
      --instance_data_dir dog --instance_prompt "a photo of sks dog" --output_dir lie-dog-flux

Data, checkpoints and the loop are shared with the other DreamBooth scripts (`lie_diffusion/training/`);
flow matching is in `training/flow.py`, what is particular to Flux in `training/flux.py`.
"""

import argparse
import sys

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import AutoTokenizer

from lie_diffusion import training
from lie_diffusion.training import TrainingError, flow, flux
from lie_diffusion.training.flux import FAMILY


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="DreamBooth training of Flux.1 with Lie-group adapters.")
    training.add_shared_arguments(parser, resolution=512, output_dir="lie-dreambooth-flux-model",
                                  text_encoders="the CLIP text encoder (T5 never trains)")
    training.add_transformer_arguments(parser, "flux")
    flow.add_flow_arguments(parser, weighting_scheme="none")
    parser.add_argument("--max_sequence_length", type=int, default=512,
                        help="Maximum length of the T5 prompt, in tokens.")
    parser.add_argument("--guidance_scale", type=float, default=3.5,
                        help="The guidance scale FLUX.1-dev is conditioned on (models without a guidance "
                             "embedding ignore it).")
    return flow.check_flow_args(training.check_args(parser.parse_args(input_args)))


def main(args):
    def load_pipeline(torch_dtype, **components):
        """The base pipeline, with any of its models replaced by `components`."""
        return FluxPipeline.from_pretrained(
            args.pretrained_model_name_or_path, torch_dtype=torch_dtype, revision=args.revision,
            variant=args.variant, **components,
        )

    accelerator, instance_data, class_data = training.start_run(args, load_pipeline)

    # Tokenizers, scheduler and models; only the adapters train (fp32, frozen weights in the weight dtype).
    tokenizers = [
        AutoTokenizer.from_pretrained(args.pretrained_model_name_or_path, subfolder=name, revision=args.revision)
        for name in ("tokenizer", "tokenizer_2")
    ]
    noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="scheduler", revision=args.revision
    )
    clip = training.load_text_encoder(args, "text_encoder")
    t5 = training.load_text_encoder(args, "text_encoder_2")
    vae = training.load_model(args, AutoencoderKL, "vae")
    transformer = training.load_model(args, FluxTransformer2DModel, "transformer")
    weight_dtype = training.weight_dtype_of(accelerator)
    for frozen in (vae, t5):
        frozen.requires_grad_(False).to(accelerator.device, dtype=weight_dtype)
    trained_models = training.add_adapters(args, accelerator, transformer, [clip])
    adapted_models = dict(zip(["transformer", "text_encoder"], trained_models))
    optimizer = training.build_optimizer(args, accelerator, trained_models)
    encode_prompts = flux.PromptEncoder(tokenizers, accelerator.device, args.max_sequence_length,
                                        cache=not args.train_text_encoder)

    train_dataset, train_dataloader = training.build_dataloader(args, accelerator, instance_data, class_data)
    lr_scheduler = training.build_lr_scheduler(args, accelerator, optimizer, train_dataloader)
    *trained_models, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        *trained_models, optimizer, train_dataloader, lr_scheduler
    )
    transformer = trained_models[0]
    if args.train_text_encoder:
        clip = trained_models[1]

    def compute_loss(batch):
        with torch.no_grad():
            latents = flow.latents_of(vae, batch["pixel_values"]).to(weight_dtype)
        noisy_latents, noise, timesteps, sigmas = flow.noisy_latents(args, noise_scheduler, latents)
        packed_latents, image_ids = flux.pack(noisy_latents)
        with torch.set_grad_enabled(args.train_text_encoder):
            prompt_embeds, pooled, text_ids = encode_prompts([clip, t5], batch["prompts"], weight_dtype)

        model_pred = transformer(
            hidden_states=packed_latents,
            timestep=timesteps / 1000,  # the transformer scales by 1000 again
            guidance=flux.guidance(accelerator.unwrap_model(transformer), args, len(latents), accelerator.device),
            pooled_projections=pooled,
            encoder_hidden_states=prompt_embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        model_pred = flux.unpack(model_pred, latents)
        target = noise - latents  # the velocity of the straight path from the latents to the noise
        weighting = flow.loss_weighting(args, sigmas)
        return training.denoising_loss(args, noise_scheduler, model_pred, target, timesteps,
                                       args.with_prior_preservation, weighting)

    def validation_pipeline():
        return load_pipeline(
            None, transformer=accelerator.unwrap_model(transformer), text_encoder=accelerator.unwrap_model(clip),
            text_encoder_2=t5, vae=vae, tokenizer=tokenizers[0], tokenizer_2=tokenizers[1],
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
