"""Stable Diffusion XL: two CLIP text encoders (penultimate hidden states side by side, the second one's pooled
embedding), micro-conditioning on sizes and crops, and EDM-style training for EDM models."""

from __future__ import annotations

import functools

import torch
from diffusers import DDPMScheduler, EDMEulerScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline

from .errors import TrainingError
from .model_card import ModelFamily

FAMILY = ModelFamily(
    "Stable Diffusion XL", "StableDiffusionXLPipeline", ("stable-diffusion-xl", "stable-diffusion-xl-diffusers"),
    "dreambooth-lie-sdxl",
)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def check_sdxl_model(args):
    """An SD 1.x/2.x folder would fail deep inside model loading: say so in one line, first."""
    try:
        index = StableDiffusionXLPipeline.load_config(args.pretrained_model_name_or_path, revision=args.revision)
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split())
        raise TrainingError(f"cannot read the pipeline {args.pretrained_model_name_or_path}: {reason}") from None
    if not {"text_encoder_2", "tokenizer_2"} <= index.keys():
        raise TrainingError(
            f"{args.pretrained_model_name_or_path} is not an SDXL pipeline (no text_encoder_2 / tokenizer_2); "
            "train SD 1.x/2.x models with train_dreambooth_lie.py."
        )


class PromptEncoder:
    """(hidden states, pooled embedding) of a batch's prompts. Each distinct prompt of a batch is encoded once;
    without text encoder training (`cache`), once for the whole run."""

    def __init__(self, tokenizers, device, cache):
        self.tokenizers, self.device, self.cache, self.cached = tokenizers, device, cache, {}

    @functools.cache
    def ids(self, prompt):
        return [
            tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)
            for tokenizer in self.tokenizers
        ]

    @staticmethod
    def encode(text_encoders, ids_pair):
        """Both encoders' penultimate hidden states side by side, and the second one's projected pooled embedding."""
        hidden = []
        for text_encoder, ids in zip(text_encoders, ids_pair):
            output = text_encoder(ids, output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
        return torch.cat(hidden, dim=-1), output.text_embeds

    def __call__(self, text_encoders, prompts):
        encoded = {}
        for prompt in dict.fromkeys(prompts):  # distinct, in batch order
            encoded[prompt] = self.cached[prompt] if prompt in self.cached else self.encode(text_encoders, self.ids(prompt))
        if self.cache:
            self.cached.update(encoded)
        hidden = torch.cat([encoded[prompt][0] for prompt in prompts])
        pooled = torch.cat([encoded[prompt][1] for prompt in prompts])
        return hidden, pooled


def time_ids(args, size_crops, device, dtype):
    """SDXL's micro-conditioning per image: original (h, w), crop (top, left), target (h, w)."""
    ids = size_crops.clone()
    if args.crops_coords_top_left_h is not None:
        ids[:, 2:] = torch.tensor([args.crops_coords_top_left_h, args.crops_coords_top_left_w])
    target = torch.tensor([args.resolution, args.resolution]).expand(len(ids), 2)
    return torch.cat([ids, target], dim=1).to(device, dtype=dtype)


def noise_scheduler(args):
    """The training scheduler, and whether the model is an EDM one (e.g. Playground v2.5: always EDM-style).
    Sets `args.do_edm_style_training` for EDM models."""
    config = DDPMScheduler.load_config(args.pretrained_model_name_or_path, subfolder="scheduler", revision=args.revision)
    edm_model = "EDM" in config["_class_name"]
    scheduler_class = EDMEulerScheduler if edm_model else DDPMScheduler
    if args.do_edm_style_training and not edm_model:
        scheduler_class = EulerDiscreteScheduler
    args.do_edm_style_training = args.do_edm_style_training or edm_model
    if edm_model and args.snr_gamma is not None:
        raise TrainingError(f"{args.pretrained_model_name_or_path} is an EDM model: --snr_gamma does not apply.")
    return scheduler_class.from_pretrained(args.pretrained_model_name_or_path, subfolder="scheduler"), edm_model


def edm_inputs(scheduler, edm_model, noisy_latents, sigmas):
    """EDM's preconditioned model input (Karras et al. 2022, section 5)."""
    if edm_model:
        return scheduler.precondition_inputs(noisy_latents, sigmas)
    return noisy_latents / (sigmas**2 + 1) ** 0.5


def edm_clean_estimate(scheduler, edm_model, noisy_latents, model_pred, sigmas):
    """(the prediction turned into an estimate of the clean latents, its loss weighting or None)."""
    if edm_model:
        return scheduler.precondition_outputs(noisy_latents, model_pred, sigmas), None
    if scheduler.config.prediction_type == "epsilon":
        model_pred = model_pred * (-sigmas) + noisy_latents
    else:  # v_prediction
        model_pred = model_pred * (-sigmas / (sigmas**2 + 1) ** 0.5) + noisy_latents / (sigmas**2 + 1)
    return model_pred, sigmas**-2.0
