"""The diffusers-style README.md model card a run leaves in its output folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..io import WEIGHT_NAME
from .data import METADATA
from .flags import NOT_DREAMBOOTH


@dataclass
class ModelFamily:
    """How a script's base model is named in logs, trackers and the model card."""

    title: str  # "Stable Diffusion"
    pipeline_class: str  # shown in the model card's usage snippet
    tags: tuple[str, ...]
    tracker: str  # accelerate's project name for the trackers
    denoiser: str = "unet"  # the component the adapters train on: "unet" or "transformer"
    dtype: str = "float16"  # the usage snippet's torch dtype (the one the family is run in)


def _adapters(args, family):
    """Which layers carry which adapter, in words."""
    if family.denoiser == "unet":
        mode = f"`--lie_mode {args.lie_mode}`, W' = W ⊙ exp(Δ)"
        return (f"The UNet's\nconvolutions carry Lie adapters ({mode}); attention layers carry\n"
                f"`{args.attn_adapter}` adapters.")
    rule = "W' = W ⊙ exp(Δ)" if args.lie_mode == "exp" else "W' = W + W ⊙ Δ"
    kind = "LoRA adapters" if args.attn_adapter == "lora" else f"Lie adapters (`--lie_mode {args.lie_mode}`, {rule})"
    return f"The transformer's Linear layers\n(target preset: {args.target_preset}) carry {kind}."


def save_model_card(args, images, family, components):
    """Write a diffusers-style README.md model card (and its images) into `output_dir`."""
    output_dir = Path(args.output_dir)
    widget, gallery = [], ""
    for i, image in enumerate(images):
        image.save(output_dir / f"image_{i}.png")
        widget.append(f"- text: {json.dumps(args.validation_prompt)}\n  output:\n    url: image_{i}.png")
        gallery += f"![image_{i}](./image_{i}.png)\n"
    dreambooth = args.task == "dreambooth"
    hidden = {"local_rank", "task", *([] if dreambooth else NOT_DREAMBOOTH)}
    rows = [(k, str(v).replace("|", "\\|")) for k, v in sorted(vars(args).items()) if k not in hidden]
    flags = "\n".join(f"| `--{k}` | `{v}` |" for k, v in rows)  # `\|`: a bare `|` would end the cell
    prompt = args.validation_prompt or args.instance_prompt or "a prompt like the captions"
    tags = "\n".join(f"- {tag}" for tag in ("text-to-image", "diffusers", "diffusers-training", *family.tags,
                                             "lora", "lie-diffusion", *(["dreambooth"] if dreambooth else [])))
    vae = getattr(args, "pretrained_vae_model_name_or_path", None)
    captions = ""
    if dreambooth and (args.caption_extension or args.caption_column):
        source = (f"`*{args.caption_extension}` files beside the images" if args.caption_extension
                  else f"the `{args.caption_column}` column of each image folder's `{METADATA}`")
        captions = (f" Each image was trained with its own caption, from {source}; images without one used the "
                    "instance (or class) prompt.")
    if dreambooth:
        title = "Lie DreamBooth"
        trained = f"with\n[DreamBooth](https://dreambooth.github.io/) on the prompt `{args.instance_prompt}`"
        header = f"\ninstance_prompt: {json.dumps(args.instance_prompt)}"
    else:
        title, header = "Lie text-to-image", ""
        trained = f"on the images and captions of\n`{args.train_data_dir or args.dataset_name}`"
    card = f"""---
base_model: {args.pretrained_model_name_or_path}{header}
library_name: diffusers
tags:
{tags}
inference: true
{"widget:" + chr(10) + chr(10).join(widget) if widget else ""}
---

# {title} ({family.title}) - {output_dir.name}

Lie-group adapter (LieRA) weights for `{args.pretrained_model_name_or_path}`, trained {trained}.
{_adapters(args, family)}
Trained components: {", ".join(components)}.{f" VAE used in training: `{vae}`." if vae else ""}{captions}

{gallery}
## How to use

```python
import torch
from diffusers import {family.pipeline_class}
from lie_diffusion import load_lie_weights, merge_lie_weights

pipe = {family.pipeline_class}.from_pretrained("{args.pretrained_model_name_or_path}", torch_dtype=torch.{family.dtype}).to("cuda")
load_lie_weights(pipe, "{args.output_dir}")  # the folder holding {WEIGHT_NAME}
image = pipe("{prompt}", num_inference_steps=25).images[0]

# Optional: fold the adapter into the base weights (no overhead at inference, exact up to round-off).
merge_lie_weights(pipe)
pipe.save_pretrained("merged-model")  # a stock {family.title} folder
```

Stock `pipe.load_lora_weights` reads only the LoRA section of this file (attention layers, with
`--attn_adapter lora`) and ignores the Lie section, so use `lie_diffusion.load_lie_weights` to get the
full adapter.

## Training flags

| flag | value |
|---|---|
{flags}
"""
    (output_dir / "README.md").write_text(card)
