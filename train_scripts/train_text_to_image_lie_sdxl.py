#!/usr/bin/env python
# Copyright 2025 The lie-diffusion authors. Licensed under the Apache License, Version 2.0.
"""Text-to-image fine-tuning of Stable Diffusion XL on a captioned data set, with Lie-group adapters (LieRA).

The flags and the behaviour follow diffusers' `examples/text_to_image/train_text_to_image_lora_sdxl.py`:
the data flags of `train_text_to_image_lie.py` (`--train_data_dir` with a `metadata.jsonl`, or
`--dataset_name`), and SDXL's: two text encoders (`--train_text_encoder` adapts both), micro-conditioning
on each image's original size and crop, an optional fp16-safe VAE, EDM-style training.

    accelerate launch train_scripts/train_text_to_image_lie_sdxl.py \\
      --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
      --pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix \\
      --train_data_dir my-images --caption_column text --output_dir lie-style-sdxl

Everything but the data is the SDXL DreamBooth script's: its `parse_args` and `main` run here, for the
text-to-image task.
"""

import functools
import sys
from pathlib import Path

from lie_diffusion import training
from lie_diffusion.training import TrainingError

DREAMBOOTH = training.load_script(Path(__file__).resolve().with_name("train_dreambooth_lie_sdxl.py"))


parse_args = functools.partial(DREAMBOOTH.parse_args, task="text-to-image")
main = DREAMBOOTH.main

if __name__ == "__main__":
    try:
        main(parse_args())
    except TrainingError as error:
        sys.exit(f"error: {error}")
