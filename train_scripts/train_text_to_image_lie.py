#!/usr/bin/env python
# Copyright 2025 The lie-diffusion authors. Licensed under the Apache License, Version 2.0.
"""Text-to-image fine-tuning of Stable Diffusion on a captioned data set, with Lie-group adapters (LieRA).

The flags and the behaviour follow diffusers' `examples/text_to_image/train_text_to_image_lora.py`: a
data set of images and captions (a style, many characters, hundreds of images) trains the UNet's
convolutions with Lie adapters (W' = W ⊙ exp(Δ)) and its attention projections with LoRA (or Lie, or
nothing: `--attn_adapter`); `--train_text_encoder` adapts the text encoder too. The result is one
`pytorch_lora_weights.safetensors` that `lie_diffusion.load_lie_weights` puts back into a pipeline.

    accelerate launch train_scripts/train_text_to_image_lie.py \\
      --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --train_data_dir my-images --caption_column text --output_dir lie-style

The data: `--train_data_dir`, a folder of images with a `metadata.jsonl` (one JSON object a line:
`{"file_name": "0001.png", "text": "a caption"}`), read without the `datasets` library so that a bad
line is named by file and line; or `--dataset_name`, a `datasets` data set (a `save_to_disk` folder, or a
name `load_dataset` reads). Everything else (the loss, checkpoints, exact resume, validation, the save) is
the DreamBooth script's: its `parse_args` and `main` run here, for the text-to-image task.
"""

import functools
import sys
from pathlib import Path

from lie_diffusion import training
from lie_diffusion.training import TrainingError

DREAMBOOTH = training.load_script(Path(__file__).resolve().with_name("train_dreambooth_lie.py"))


parse_args = functools.partial(DREAMBOOTH.parse_args, task="text-to-image")
main = DREAMBOOTH.main

if __name__ == "__main__":
    try:
        main(parse_args())
    except TrainingError as error:
        sys.exit(f"error: {error}")
