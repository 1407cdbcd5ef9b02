"""Flow matching, as diffusers' Flux and SD3 DreamBooth scripts train it (SD3 paper, arXiv 2403.03206):
x_t = (1 - σ) x_0 + σ ε, the model predicts the velocity ε - x_0; timesteps drawn from a density
(`--weighting_scheme`) or the loss weighted per σ."""

from __future__ import annotations

import argparse

import torch

from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from .errors import TrainingError

WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")


def add_flow_arguments(parser: argparse.ArgumentParser, weighting_scheme: str) -> None:
    """diffusers' flow-matching flags, with the default weighting of the script being read."""
    parser.add_argument("--weighting_scheme", type=str, default=weighting_scheme, choices=WEIGHTING_SCHEMES,
                        help="How timesteps are drawn ('logit_normal', 'mode': from that density) or the loss is "
                             "weighted ('sigma_sqrt', 'cosmap'); 'none': uniform, unweighted.")
    parser.add_argument("--logit_mean", type=float, default=0.0, help="Mean of the 'logit_normal' scheme.")
    parser.add_argument("--logit_std", type=float, default=1.0, help="Standard deviation of the 'logit_normal' scheme.")
    parser.add_argument("--mode_scale", type=float, default=1.29, help="Scale of the 'mode' scheme.")


def check_flow_args(args):
    """What the UNet scripts take and flow matching has no use for."""
    if args.snr_gamma is not None:
        raise TrainingError("--snr_gamma weights DDPM losses; flow matching weights by --weighting_scheme.")
    return args


def latents_of(vae, pixel_values):
    """The VAE's latents, shifted and scaled as the flow-matching VAEs ask (`shift_factor`, `scaling_factor`)."""
    latents = vae.encode(pixel_values.to(vae.dtype)).latent_dist.sample()
    return (latents - vae.config.shift_factor) * vae.config.scaling_factor


def noisy_latents(args, scheduler, latents):
    """(x_t, ε, timesteps, σ as a broadcastable column): one timestep per sample, drawn by the weighting scheme
    from the training scheduler's (shifted) schedule."""
    noise = torch.randn_like(latents)
    u = compute_density_for_timestep_sampling(
        weighting_scheme=args.weighting_scheme, batch_size=latents.shape[0], logit_mean=args.logit_mean,
        logit_std=args.logit_std, mode_scale=args.mode_scale,
    )
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices].to(latents.device)
    sigmas = scheduler.sigmas[indices].to(latents.device, latents.dtype).view(-1, *[1] * (latents.ndim - 1))
    return (1.0 - sigmas) * latents + sigmas * noise, noise, timesteps, sigmas


def loss_weighting(args, sigmas):
    """The per-sample loss weight of the schemes that draw timesteps uniformly ('sigma_sqrt', 'cosmap'); else 1."""
    return compute_loss_weighting_for_sd3(weighting_scheme=args.weighting_scheme, sigmas=sigmas)
