"""What a model learns to predict, and the loss on it."""

from __future__ import annotations

import torch
from diffusers.training_utils import compute_snr

from .errors import TrainingError


def denoising_loss(args, noise_scheduler, model_pred, target, timesteps, with_prior, weighting=None):
    """Per-sample MSE, optionally Min-SNR weighted (https://arxiv.org/abs/2303.09556) or weighted per
    sample (`weighting`, EDM); with prior preservation the second half of the batch is the prior loss."""
    squared = (model_pred.float() - target.float()) ** 2
    if weighting is not None:
        squared = weighting.float() * squared
    per_sample = squared.mean(dim=tuple(range(1, squared.ndim)))
    if args.snr_gamma is not None:
        snr = compute_snr(noise_scheduler, timesteps)
        weights = torch.clamp(snr, max=args.snr_gamma)
        weights = weights / (snr + 1 if noise_scheduler.config.prediction_type == "v_prediction" else snr)
        per_sample = per_sample * weights
    if not with_prior:
        return per_sample.mean()
    instance_loss, prior_loss = per_sample.chunk(2)
    return instance_loss.mean() + args.prior_loss_weight * prior_loss.mean()


def training_noise(args, latents):
    """The noise added to `latents`: Gaussian, plus `--noise_offset` times a per-(image, channel) constant, which
    lets the model shift an image's mean brightness (https://www.crosslabs.org/blog/diffusion-with-offset-noise)."""
    noise = torch.randn_like(latents)
    if args.noise_offset:
        noise = noise + args.noise_offset * torch.randn(*latents.shape[:2], 1, 1, device=latents.device,
                                                        dtype=latents.dtype)
    return noise


def noise_target(noise_scheduler, latents, noise, timesteps):
    """What the UNet learns to predict: the noise (epsilon) or the velocity (v-prediction)."""
    if noise_scheduler.config.prediction_type == "epsilon":
        return noise
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise TrainingError(f"Unknown prediction type {noise_scheduler.config.prediction_type}.")
