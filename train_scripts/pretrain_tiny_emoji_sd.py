#!/usr/bin/env python
"""Pretrain the tiny emoji Stable Diffusion pipeline from scratch (VAE, then text encoder + UNet jointly).

    accelerate launch train_scripts/pretrain_tiny_emoji_sd.py --output_dir lie_diffusion/emoji/pretrained/tiny-emoji-sd

With the defaults and `--seed 0` this reproduces the shipped pipeline (on the same hardware class;
CPU and GPU kernels differ in round-off). Stage 1 trains the AutoencoderKL on reconstruction (plus
SD's tiny KL term) and sets its `scaling_factor` to 1/std of the latents. Stage 2 trains the
CLIPTextModel and the UNet together on the plain DDPM v-prediction loss, keeping an
exponential moving average (EMA) of both; the EMA weights are what gets saved. Training images are
drawn fresh each step: a render at a random size and position on a random palette background,
captioned "a <name> emoji on a <colour> background" (sometimes without the colour, sometimes the
generic "an emoji ...", sometimes empty for classifier-free guidance).
"""

from __future__ import annotations

import argparse
import logging
import math
import time

import torch
import torch.nn.functional as F

from lie_diffusion.emoji import pretraining
from lie_diffusion.emoji.pipeline import build_components, save_pipeline, write_tokenizer
from lie_diffusion.emoji.pretraining import make_batch, lr_lambda

logger = logging.getLogger("pretrain_tiny_emoji_sd")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    pretraining.add_pretraining_arguments(parser)
    parser.add_argument("--vae_steps", type=int, default=500)
    parser.add_argument("--vae_batch_size", type=int, default=32)
    parser.add_argument("--vae_learning_rate", type=float, default=2e-3)
    parser.add_argument("--snr_gamma", type=float, default=0.0,
                        help="min-SNR-gamma loss weighting; 0 = off. Off by default: with v-prediction it nearly "
                             "zeroes the high-noise steps, where the text must decide colour and layout.")
    return parser.parse_args(argv)


def train_vae(accelerator, vae, renders, classes, rng, args):
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(50, args.vae_steps))
    vae, optimizer = accelerator.prepare(vae, optimizer)
    start = time.time()
    for step in range(args.vae_steps):
        pixels, _ = make_batch(renders, classes, args.vae_batch_size, rng, args)
        pixels = pixels.to(accelerator.device)
        posterior = accelerator.unwrap_model(vae).encode(pixels).latent_dist
        reconstruction = accelerator.unwrap_model(vae).decode(posterior.sample()).sample
        rec = F.mse_loss(reconstruction, pixels) + 0.5 * F.l1_loss(reconstruction, pixels)
        loss = rec + 1e-6 * posterior.kl().mean()
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if step % args.log_every == 0 or step == args.vae_steps - 1:
            logger.info(f"vae step {step:5d}  recon {rec.item():.4f}  {time.time() - start:7.1f}s")
    vae = accelerator.unwrap_model(vae).eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(make_batch(renders, classes, 64, rng, args)[0].to(accelerator.device))
                             .latent_dist.sample() for _ in range(4)])
        pixels = make_batch(renders, classes, 64, rng, args)[0].to(accelerator.device)
        error = F.mse_loss(vae.decode(vae.encode(pixels).latent_dist.mode()).sample.clamp(-1, 1), pixels)
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    logger.info(f"vae scaling_factor {vae.config.scaling_factor:.4f}, reconstruction PSNR "
                f"{10 * math.log10(4 / error.item()):.1f} dB")
    return vae


def train_diffusion(accelerator, vae, text_encoder, tokenizer, unet, noise_scheduler, renders, classes, rng, args,
                    save):
    """Text encoder and UNet together on the DDPM loss (v-prediction by default), optionally min-SNR weighted."""
    params = list(unet.parameters()) + list(text_encoder.parameters())
    unet, text_encoder = accelerator.prepare(unet, text_encoder)
    unet.train()
    text_encoder.train()
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(accelerator.device)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    v_prediction = noise_scheduler.config.prediction_type == "v_prediction"

    def step_loss(step):
        pixels, captions = make_batch(renders, classes, args.train_batch_size, rng, args)
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(accelerator.device)
        with torch.no_grad():
            latents = vae.encode(pixels.to(accelerator.device)).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  device=latents.device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, text_encoder(ids)[0]).sample
        target = noise_scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
        per_sample = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
        if args.snr_gamma:  # min-SNR-gamma weighting, written for the target in use
            s = snr[timesteps]
            per_sample = per_sample * torch.clamp(s, max=args.snr_gamma) / (s + 1 if v_prediction else s)
        return per_sample.mean()

    pretraining.train(accelerator, params, step_loss, args, save)


def main(argv=None):
    args = parse_args(argv)
    accelerator, rng, renders, classes = pretraining.setup(args)
    parts = build_components(args.seed)
    tokenizer = write_tokenizer(args.output_dir / "tokenizer")
    started = args.started = time.time()
    vae = train_vae(accelerator, parts["vae"], renders, classes, rng, args)
    vae.to(accelerator.device)
    unet, text_encoder = parts["unet"], parts["text_encoder"]
    class_names = [renders.names[i] for i in classes]

    def save(ema, label):
        if not accelerator.is_main_process:
            return
        unet_, text_encoder_ = accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder)
        with pretraining.ema_weights(list(unet_.parameters()) + list(text_encoder_.parameters()), ema):
            save_pipeline(args.output_dir, vae, text_encoder_, tokenizer, unet_, class_names,
                          record=pretraining.record(args, label))
        logger.info(f"saved EMA pipeline at {label} to {args.output_dir}")

    train_diffusion(accelerator, vae, text_encoder, tokenizer, unet, parts["noise_scheduler"], renders, classes,
                    rng, args, save)
    logger.info(f"done in {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
