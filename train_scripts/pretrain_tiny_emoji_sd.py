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
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed

from lie_diffusion.emoji.data import PALETTE, caption, load_renders, random_example
from lie_diffusion.emoji.pipeline import build_components, save_pipeline, write_tokenizer

logger = logging.getLogger("pretrain_tiny_emoji_sd")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=Path, required=True, help="Where the pipeline folder is written.")
    parser.add_argument("--data_file", type=Path, default=None, help="Emoji renders (default: the shipped file).")
    parser.add_argument("--num_classes", type=int, default=32,
                        help="Pretrain on this many emoji (a seeded choice among the non-held-out ones); 0 = all.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae_steps", type=int, default=500)
    parser.add_argument("--vae_batch_size", type=int, default=32)
    parser.add_argument("--vae_learning_rate", type=float, default=2e-3)
    parser.add_argument("--train_steps", type=int, default=11000)
    parser.add_argument("--train_batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1.5e-3)
    parser.add_argument("--warmup_steps", type=int, default=100)
    parser.add_argument("--ema_decay", type=float, default=0.998)
    parser.add_argument("--snr_gamma", type=float, default=0.0,
                        help="min-SNR-gamma loss weighting; 0 = off. Off by default: with v-prediction it nearly "
                             "zeroes the high-noise steps, where the text must decide colour and layout.")
    parser.add_argument("--uncond_prob", type=float, default=0.1, help="Empty captions, for guidance.")
    parser.add_argument("--no_color_prob", type=float, default=0.1, help="Captions without the colour.")
    parser.add_argument("--generic_prob", type=float, default=0.05, help="'an emoji on a ... background' captions.")
    parser.add_argument("--save_every", type=int, default=250, help="Also save the EMA pipeline every N steps.")
    parser.add_argument("--log_every", type=int, default=50)
    parser.add_argument("--max_minutes", type=float, default=0,
                        help="Safety stop: end stage 2 early (and say so) after this many minutes in all; 0 = never.")
    parser.add_argument("--num_threads", type=int, default=0,
                        help="torch CPU threads; 0 = torch's default (all cores). On a 2-core CPU that is busy "
                             "with other work, 1 is faster (no spinning OpenMP barriers against other processes).")
    return parser.parse_args(argv)


def choose_classes(names: list[str], held_out: list[str], count: int, seed: int) -> list[int]:
    """Indices of the pretraining emoji: all non-held-out ones, or a seeded subset of `count`."""
    pool = [i for i, name in enumerate(names) if name not in set(held_out)]
    if count and count < len(pool):
        pool = sorted(np.random.default_rng(seed).choice(pool, size=count, replace=False).tolist())
    return pool


def make_batch(renders, classes, batch_size, rng, args):
    """Images in [-1, 1] (B, 3, 32, 32) and their captions."""
    images, captions = [], []
    for index in rng.choice(classes, size=batch_size):
        image, color = random_example(renders, int(index), rng)
        roll = rng.random()
        if roll < args.uncond_prob:
            text = ""
        elif roll < args.uncond_prob + args.no_color_prob:
            text = caption(renders.names[index])
        elif roll < args.uncond_prob + args.no_color_prob + args.generic_prob:
            text = caption(None, color)
        else:
            text = caption(renders.names[index], color)
        images.append(image)
        captions.append(text)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return pixels, captions


def lr_lambda(warmup: int, total: int):
    """Linear warmup, then cosine decay to 10%."""
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


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
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup_steps, args.train_steps))
    unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
    unet.train()
    text_encoder.train()
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(accelerator.device)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    start, running = time.time(), []
    for step in range(args.train_steps):
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
        v_prediction = noise_scheduler.config.prediction_type == "v_prediction"
        target = noise_scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
        per_sample = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
        if args.snr_gamma:  # min-SNR-gamma weighting, written for the target in use
            s = snr[timesteps]
            per_sample = per_sample * torch.clamp(s, max=args.snr_gamma) / (s + 1 if v_prediction else s)
        loss = per_sample.mean()
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        running.append(loss.item())
        if step % args.log_every == 0 or step == args.train_steps - 1:
            elapsed = time.time() - start
            logger.info(f"step {step:6d}  loss {np.mean(running):.4f}  lr {scheduler.get_last_lr()[0]:.2e}  "
                        f"{elapsed:7.1f}s  ({elapsed / (step + 1):.3f} s/step)")
            running = []
        if args.max_minutes and time.time() - args.started > 60 * args.max_minutes and step + 1 < args.train_steps:
            logger.info(f"--max_minutes {args.max_minutes} reached: stopping after {step + 1} of {args.train_steps} steps")
            save(ema, f"step {step + 1} of {args.train_steps} (stopped by --max_minutes)")
            return
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.train_steps:
            save(ema, f"step {step + 1}")
    save(ema, f"step {args.train_steps} (final)")


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    accelerator = Accelerator()
    set_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    renders = load_renders(args.data_file) if args.data_file else load_renders()
    classes = choose_classes(renders.names, renders.held_out, args.num_classes, args.seed)
    logger.info(f"{len(classes)} pretraining emoji of {len(renders.names)} ({len(renders.held_out)} held out); "
                f"palette {list(PALETTE)}; device {accelerator.device}")
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
        targets = list(accelerator.unwrap_model(unet).parameters()) + \
            list(accelerator.unwrap_model(text_encoder).parameters())
        kept = [p.detach().clone() for p in targets]
        with torch.no_grad():
            torch._foreach_copy_(targets, ema)
        save_pipeline(args.output_dir, vae, accelerator.unwrap_model(text_encoder), tokenizer,
                      accelerator.unwrap_model(unet), class_names)
        with torch.no_grad():
            torch._foreach_copy_(targets, kept)
        (args.output_dir / "pretrain_args.json").write_text(json.dumps(
            {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "started"},
             "saved_at": label, "minutes": round((time.time() - started) / 60, 1)}, indent=1))
        logger.info(f"saved EMA pipeline at {label} to {args.output_dir}")

    train_diffusion(accelerator, vae, text_encoder, tokenizer, unet, parts["noise_scheduler"], renders, classes,
                    rng, args, save)
    logger.info(f"done in {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
