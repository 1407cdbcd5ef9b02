#!/usr/bin/env python
"""Pretrain the tiny emoji Flux pipeline from scratch (transformer + CLIP + T5 jointly, on the SD model's VAE).

    accelerate launch train_scripts/pretrain_tiny_emoji_flux.py \
        --output_dir lie_diffusion/emoji/pretrained/tiny-emoji-flux --num_threads 1 --max_minutes 90 \
        --log_file benchmarks/results/pretrain_tiny_emoji_flux.log

The model is `lie_diffusion.emoji.flux`: FLUX.1's layout at toy width (2 double- and 2 single-stream blocks,
width 96), 7.3 MB of safetensors. It trains on the same data as `pretrain_tiny_emoji_sd.py`, drawn the same way
(the same 32 emoji for `--num_classes 32 --seed 0`, the same held-out subjects, captions and empty-caption rate),
with the same steps, batch, optimiser, schedule and EMA (`lie_diffusion.emoji.pretraining`). The VAE is the
shipped SD emoji model's (`--vae`), frozen; its latents' mean and 1/std become the Flux VAE's `shift_factor` and
`scaling_factor`. The loss is flow matching as FLUX.1 trains: x_t = (1 - σ) x_0 + σ ε, the transformer predicts
the velocity ε - x_0 from 2x2-packed latents, σ drawn logit-normally (`--weighting_scheme`) and shifted as
FluxPipeline shifts its sampling schedule for 8x8-token images. The CLIP and T5 encoders train with the
transformer (from scratch there is nothing to freeze); the EMA of all three is what gets saved.

Measured on the shared 2-core CPU, batch 32, `--num_threads 1`: a step costs what the SD script's does (0.48
against 0.47 s, 40 steps each, back to back). The first 350 steps of the default run took 4.5 minutes with other
jobs running (0.55-0.73 s/step), the loss (mean per 50 steps) falling 1.53, 0.80, 0.69, 0.67, 0.61, 0.59.
Planned full run: the defaults (11,000 steps, the SD model's budget) with `--max_minutes 90`: about 66 minutes
at the SD run's 0.35 s/step, 88 at 0.48; when the CPU is busier than that, `--train_steps` = 5,100 / (s/step)
keeps the cosine schedule whole within 85 minutes, and `--max_minutes` saves and says so otherwise.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lie_diffusion.emoji import pretraining
from lie_diffusion.emoji.data import IMAGE_SIZE
from lie_diffusion.emoji.flux import TRANSFORMER_CONFIG, build_components, encode_prompts, training_shift
from lie_diffusion.emoji.pipeline import pretrained_emoji_path, write_pipeline_folder, write_tokenizer
from lie_diffusion.emoji.pretraining import make_batch
from lie_diffusion.training import flow, flux

logger = logging.getLogger("pretrain_tiny_emoji_flux")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    pretraining.add_pretraining_arguments(parser)
    parser.add_argument("--vae", type=Path, default=None,
                        help="An AutoencoderKL folder with 4 latent channels at /2 (default: the shipped SD emoji "
                             "model's vae).")
    flow.add_flow_arguments(parser, weighting_scheme="logit_normal")
    return parser.parse_args(argv)


def load_vae(args, accelerator, renders, classes, rng):
    """The frozen VAE with `shift_factor`/`scaling_factor` set to its latents' mean and 1/std on the emoji data."""
    from diffusers import AutoencoderKL

    path = args.vae or pretrained_emoji_path("sd") / "vae"
    vae = AutoencoderKL.from_pretrained(str(path)).to(accelerator.device).eval().requires_grad_(False)
    if vae.config.latent_channels * 4 != TRANSFORMER_CONFIG["in_channels"]:
        raise ValueError(f"--vae {path}: {vae.config.latent_channels} latent channels; the tiny Flux transformer "
                         f"takes 2x2 patches of {TRANSFORMER_CONFIG['in_channels'] // 4}.")
    with torch.no_grad():
        latents = torch.cat([vae.encode(make_batch(renders, classes, 64, rng, args)[0].to(accelerator.device))
                             .latent_dist.sample() for _ in range(4)])
    vae.register_to_config(shift_factor=float(latents.mean()), scaling_factor=float(1 / latents.std()))
    logger.info(f"vae shift_factor {vae.config.shift_factor:.4f}, scaling_factor {vae.config.scaling_factor:.4f}")
    return vae


def train_flow(accelerator, parts, tokenizer, renders, classes, rng, args, save):
    """Transformer, CLIP and T5 together on FLUX.1's flow-matching loss."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    vae = parts["vae"]
    transformer, clip, t5 = accelerator.prepare(parts["transformer"], parts["text_encoder"], parts["text_encoder_2"])
    params = [p for model in (transformer, clip, t5) for p in model.parameters()]
    for model in (transformer, clip, t5):
        model.train()
    tokens = (IMAGE_SIZE // 2 ** len(vae.config.block_out_channels)) ** 2  # 2x2 patches of the latents
    noise_scheduler = FlowMatchEulerDiscreteScheduler(shift=training_shift(parts["scheduler"], tokens))
    logger.info(f"training sigmas shifted by {noise_scheduler.config.shift:.3f} (FluxPipeline's at {IMAGE_SIZE} px)")

    def step_loss(step):
        pixels, captions = make_batch(renders, classes, args.train_batch_size, rng, args)
        with torch.no_grad():
            latents = flow.latents_of(vae, pixels.to(accelerator.device))
        noisy, noise, timesteps, _ = flow.noisy_latents(args, noise_scheduler, latents)
        packed, image_ids = flux.pack(noisy)
        text, pooled = encode_prompts(tokenizer, clip, parts["tokenizer_2"], t5, captions, accelerator.device)
        prediction = transformer(
            hidden_states=packed, timestep=timesteps / 1000, guidance=None, pooled_projections=pooled,
            encoder_hidden_states=text, txt_ids=torch.zeros(text.shape[1], 3, device=accelerator.device),
            img_ids=image_ids, return_dict=False,
        )[0]
        return F.mse_loss(flux.unpack(prediction, latents), noise - latents)

    pretraining.train(accelerator, params, step_loss, args, save)


def main(argv=None):
    from diffusers import FluxPipeline

    args = parse_args(argv)
    accelerator, rng, renders, classes = pretraining.setup(args)
    started = args.started = time.time()
    vae = load_vae(args, accelerator, renders, classes, rng)
    parts = build_components(vae, args.seed)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = write_tokenizer(folder)
    class_names = [renders.names[i] for i in classes]
    trained = ("transformer", "text_encoder", "text_encoder_2")

    def save(ema, label):
        if not accelerator.is_main_process:
            return
        models = {name: accelerator.unwrap_model(parts[name]) for name in trained}
        with pretraining.ema_weights([p for model in models.values() for p in model.parameters()], ema):
            pipeline = FluxPipeline(**{**parts, **models, "tokenizer": tokenizer})
            write_pipeline_folder(args.output_dir, pipeline, class_names, pretraining.record(args, label))
        logger.info(f"saved EMA pipeline at {label} to {args.output_dir}")

    train_flow(accelerator, parts, tokenizer, renders, classes, rng, args, save)
    logger.info(f"done in {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
