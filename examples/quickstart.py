#!/usr/bin/env python
"""Quickstart: DreamBooth with Lie adapters end to end, offline, in a few minutes on a CPU.

1. builds a tiny Stable Diffusion pipeline from configs (random weights, 32 px; no download);
2. draws a few instance images of a made-up subject ("sks toy");
3. runs the real training script through `accelerate launch` for a few steps;
4. loads the trained adapter into a `DiffusionPipeline` and generates an image;
5. merges the adapter into the base weights and checks that the merged pipeline gives the same image.

    python examples/quickstart.py [--output_dir quickstart-output] [--max_train_steps 40]

The tiny model only shows that the pieces fit; for a real run, swap in a real model and photos
(see the README for SD 1.5 / SD 2.1 command lines).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without `pip install -e .`

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from examples.synthetic_data import make_instance_images  # noqa: E402
from lie_diffusion import load_lie_weights, merge_lie_weights  # noqa: E402
from lie_diffusion.tiny import TINY_RESOLUTION, build_tiny_pipeline  # noqa: E402

PROMPT = "a photo of sks toy"
VALIDATION_PROMPT = "a photo of sks toy on the grass"


def train(base: Path, instances: Path, output: Path, steps: int) -> None:
    """The same command a user types, with a tiny model; `accelerate launch` flags given so it never prompts."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO / "train_scripts" / "train_dreambooth_lie.py"),
        "--pretrained_model_name_or_path", str(base),
        "--instance_data_dir", str(instances),
        "--instance_prompt", PROMPT,
        "--resolution", str(TINY_RESOLUTION),
        "--train_batch_size", "2",
        "--learning_rate", "1e-3",
        "--lr_warmup_steps", "0",
        "--max_train_steps", str(steps),
        "--checkpointing_steps", str(max(1, steps // 2)),
        "--validation_prompt", VALIDATION_PROMPT,
        "--num_validation_images", "2",
        "--num_inference_steps", "10",
        "--seed", "0",
        "--output_dir", str(output),
    ]
    print("$ accelerate launch " + shlex.join(command[3:]), flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.setdefault("OMP_NUM_THREADS", "1")  # as in main(): the tiny model runs best on one thread
    subprocess.run(command, check=True, env=env)


def generate(pipeline, seed: int = 0) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return pipeline(VALIDATION_PROMPT, num_inference_steps=10, generator=generator, output_type="np").images[0]


def save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray((array * 255).round().astype(np.uint8)).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=Path, default=Path("quickstart-output"))
    parser.add_argument("--max_train_steps", type=int, default=40)
    args = parser.parse_args()
    root = args.output_dir.resolve()
    torch.set_num_threads(1)  # tiny tensors: more threads only add overhead (10x on a busy CPU)

    print(f"[1/5] Building a tiny Stable Diffusion pipeline in {root / 'tiny-sd'}", flush=True)
    base = build_tiny_pipeline(root / "tiny-sd")
    print(f"[2/5] Drawing instance images in {root / 'instance-images'}", flush=True)
    instances = root / "instance-images"
    make_instance_images(instances, count=4, size=48)

    print(f"[3/5] Training ({args.max_train_steps} steps)", flush=True)
    output = root / "lie-dreambooth"
    train(base, instances, output, args.max_train_steps)

    print("[4/5] Loading the adapter into a DiffusionPipeline and generating", flush=True)
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(str(base), safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)
    before = generate(pipeline)
    load_lie_weights(pipeline, output)
    adapted = generate(pipeline)
    print(f"      max |adapted - base|   = {np.abs(adapted - before).max():.4f}  (the adapter changes the model)")

    print("[5/5] Merging the adapter into the base weights", flush=True)
    merge_lie_weights(pipeline)
    merged = generate(pipeline)
    print(f"      max |merged - adapted| = {np.abs(merged - adapted).max():.2e}  (merging is exact up to round-off)")
    for name, image in (("base", before), ("adapted", adapted), ("merged", merged)):
        save_png(image, root / f"sample_{name}.png")

    print("\nOutputs:")
    print(f"  adapter weights   {output / 'pytorch_lora_weights.safetensors'}")
    print(f"  model card        {output / 'README.md'}")
    print(f"  checkpoints       {output}/checkpoint-*")
    print(f"  validation grids  {output / 'validation'}")
    print(f"  TensorBoard logs  {output / 'logs'}   (tensorboard --logdir {output / 'logs'})")
    print(f"  samples           {root}/sample_{{base,adapted,merged}}.png")


if __name__ == "__main__":
    main()
