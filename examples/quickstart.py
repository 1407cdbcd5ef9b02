#!/usr/bin/env python
"""Quickstart: teach the pretrained tiny emoji model a new subject with a Lie adapter (DreamBooth), offline.

1. loads the tiny Stable Diffusion pipeline shipped with lie-diffusion (pretrained on 32 px emoji);
2. makes 4 pictures of an emoji it never saw (a held-out subject) as the instance images, each
   twice: captioned with its background colour ("a sks emoji on a yellow background", kohya's .txt
   files), and without a caption, so it also trains with the plain instance prompt "a sks emoji";
3. has the base model draw the class images from class prompts with colours ("an emoji on a blue
   background", .txt captions too), so prior preservation keeps the colour words anchored, then runs
   the real training script through `accelerate launch` with `--caption_extension .txt`;
4. generates "a sks emoji", "a sks emoji on a blue background" and the class prompt with the base,
   the adapted and the merged model (4 seeds each), and saves one labelled comparison grid;
5. measures: the emoji classifier's embedding similarity to the subject and how often it names it,
   how often the blue prompts come out blue, base vs adapted, and the largest difference between
   merged and adapted images (round-off).

    python examples/quickstart.py [--subject rocket] [--max_train_steps 1000] [--output_dir quickstart-output]
    python examples/quickstart.py --model flux   # the same on the tiny emoji Flux model, once it is trained

`--model flux` runs the same flow on the tiny Flux-shaped emoji model (`lie_diffusion.emoji.flux`) through
`train_scripts/train_dreambooth_lie_flux.py` (Lie adapters on its default targets); until that model is trained and
shipped it stops with the command that trains it.
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

from lie_diffusion import load_lie_weights, merge_lie_weights  # noqa: E402
from lie_diffusion.emoji.classifier import load_classifier, reference_embedding, subject_similarity  # noqa: E402
from lie_diffusion.emoji.data import (IMAGE_SIZE, HELD_OUT, PALETTE, background_color, caption,  # noqa: E402
                                      load_renders, random_example)
from lie_diffusion.emoji.grid import save_grid  # noqa: E402
from lie_diffusion.emoji.pipeline import (GUIDANCE_SCALE, MAX_LENGTH, NUM_INFERENCE_STEPS,  # noqa: E402
                                          pretrained_emoji_path, pretrained_emoji_pipeline, sampling_kwargs)

TOKEN = "sks"
INSTANCE_PROMPT = caption(TOKEN)  # "a sks emoji": the fallback for an image without a caption
CLASS_PROMPT = caption(None)  # "an emoji"
PROMPTS = [INSTANCE_PROMPT, caption(TOKEN, "blue"), caption(None, "blue")]
INSTANCE_COLORS = ("white", "yellow", "green", "purple")  # blue stays unseen: the prompt must compose it
SEEDS = (0, 1, 2, 3)
# --model -> (its DreamBooth script, the flags it needs besides the shared ones)
SCRIPTS = {
    "sd": ("train_dreambooth_lie.py", []),
    # prompts padded as the pipeline samples them (the script's default, 512 T5 tokens, is FLUX.1's)
    "flux": ("train_dreambooth_lie_flux.py", ["--max_sequence_length", str(MAX_LENGTH)]),
}


def save_captioned(directory: Path, name: str, image: np.ndarray, text: str) -> None:
    """image + its caption beside it (name.png, name.txt): kohya's convention, read with --caption_extension."""
    Image.fromarray(image).save(directory / f"{name}.png")
    (directory / f"{name}.txt").write_text(text + "\n")


def make_instance_images(subject: str, directory: Path) -> list[np.ndarray]:
    """4 pictures of the subject with different size, place and background, as a person's photos would vary.
    Each is written twice: with its caption ("a sks emoji on a <colour> background"), which keeps the colour
    words tied to colours, and without one, which trains the plain instance prompt (the caption fallback)."""
    renders = load_renders()
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    images = [random_example(renders, renders.index(subject), rng, color)[0] for color in INSTANCE_COLORS]
    for n, (image, color) in enumerate(zip(images, INSTANCE_COLORS)):
        save_captioned(directory, str(n), image, caption(TOKEN, color))
        Image.fromarray(image).save(directory / f"{n}-plain.png")
    return images


def make_class_images(pipeline, count: int, directory: Path, steps: int) -> None:
    """Prior-preservation images from class prompts with every palette colour ("an emoji on a blue background"),
    captioned: the prior loss then keeps each colour word meaning its colour while the subject is learned."""
    directory.mkdir(parents=True, exist_ok=True)
    colors = [list(PALETTE)[n % len(PALETTE)] for n in range(count)]
    prompts = [caption(None, color) for color in colors]
    generators = [torch.Generator().manual_seed(10_000 + n) for n in range(count)]
    images = pipeline(prompts, num_inference_steps=steps, generator=generators, output_type="np",
                      **sampling_kwargs(pipeline, GUIDANCE_SCALE, count)).images
    for n, (image, prompt) in enumerate(zip(images, prompts)):
        save_captioned(directory, f"{n:03d}", (image * 255).round().astype(np.uint8), prompt)


def train(base: Path, instances: Path, classes: Path, output: Path, args) -> None:
    """The command a user types; `accelerate launch` flags given so it never prompts."""
    script, model_flags = SCRIPTS[args.model]
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO / "train_scripts" / script), *model_flags,
        "--pretrained_model_name_or_path", str(base),
        "--instance_data_dir", str(instances),
        "--instance_prompt", INSTANCE_PROMPT, "--caption_extension", ".txt",
        "--with_prior_preservation", "--class_data_dir", str(classes), "--class_prompt", CLASS_PROMPT,
        "--num_class_images", str(args.num_class_images), "--sample_batch_size", str(args.num_class_images),
        "--resolution", str(IMAGE_SIZE),
        "--train_batch_size", "4",
        "--rank", "4",
        "--learning_rate", str(args.learning_rate),
        "--lr_warmup_steps", "0",
        "--max_train_steps", str(args.max_train_steps),
        "--checkpointing_steps", str(max(1, args.max_train_steps // 2)),
        "--validation_prompt", PROMPTS[1],
        "--num_validation_images", str(len(SEEDS)),
        "--validation_epochs", str(max(1, args.max_train_steps)),
        "--num_inference_steps", str(args.num_inference_steps),
        "--seed", "0",
        "--output_dir", str(output),
    ]
    print("$ accelerate launch " + shlex.join(command[3:]), flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.setdefault("OMP_NUM_THREADS", "1")  # as in main(): the tiny model runs best on one thread
    subprocess.run(command, check=True, env=env)


def generate(pipeline, steps: int) -> list[np.ndarray]:
    """Every prompt at every seed, in that order; float (32, 32, 3) images in [0, 1]."""
    images = []
    for prompt in PROMPTS:
        generators = [torch.Generator().manual_seed(seed) for seed in SEEDS]
        images += list(pipeline([prompt] * len(SEEDS), num_inference_steps=steps, generator=generators, output_type="np",
                                 **sampling_kwargs(pipeline, GUIDANCE_SCALE, len(SEEDS))).images)
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SCRIPTS), default="sd",
                        help="The tiny emoji model: Stable Diffusion (UNet), or Flux (a diffusion transformer).")
    parser.add_argument("--output_dir", type=Path, default=Path("quickstart-output"))
    parser.add_argument("--subject", default="rocket", choices=HELD_OUT, help="A held-out emoji to learn.")
    parser.add_argument("--max_train_steps", type=int, default=1000)
    parser.add_argument("--num_class_images", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--num_inference_steps", type=int, default=NUM_INFERENCE_STEPS)
    parser.add_argument("--pretrained", type=Path, default=None,
                        help="Another tiny emoji pipeline folder, of the --model kind.")
    args = parser.parse_args()
    root = args.output_dir.resolve()
    torch.set_num_threads(1)  # tiny tensors: more threads only add overhead (10x on a busy CPU)

    try:
        base = (args.pretrained or pretrained_emoji_path(args.model)).resolve()
    except FileNotFoundError as error:  # the Flux model until it is trained and shipped
        sys.exit(f"error: {error}")
    print(f"[1/5] Loading the pretrained tiny emoji {args.model} pipeline from {base}", flush=True)
    pipeline = pretrained_emoji_pipeline(base)
    if (type(pipeline).__name__ == "FluxPipeline") != (args.model == "flux"):
        sys.exit(f"error: {base} holds a {type(pipeline).__name__}, not a tiny emoji {args.model} pipeline: "
                 f"give --model {'sd' if args.model == 'flux' else 'flux'}")
    print(f"[2/5] Instance images of the held-out emoji {args.subject!r} in {root / 'instance-images'}", flush=True)
    instance_images = make_instance_images(args.subject, root / "instance-images")

    print(f"[3/5] DreamBooth with a Lie adapter ({args.max_train_steps} steps, prior preservation on "
          f"{args.num_class_images} base-model images of {caption(None, 'COLOUR')!r})", flush=True)
    make_class_images(pipeline, args.num_class_images, root / "class-images", args.num_inference_steps)
    output = root / "lie-dreambooth"
    train(base, root / "instance-images", root / "class-images", output, args)

    print("[4/5] Generating with the base, the adapted and the merged model", flush=True)
    base_images = generate(pipeline, args.num_inference_steps)
    load_lie_weights(pipeline, output)
    adapted_images = generate(pipeline, args.num_inference_steps)
    merge_lie_weights(pipeline)
    merged_images = generate(pipeline, args.num_inference_steps)
    difference = max(float(np.abs(a - m).max()) for a, m in zip(adapted_images, merged_images))

    print("[5/5] Measuring with the emoji classifier", flush=True)
    classifier = load_classifier()
    reference = reference_embedding(classifier, load_renders(), args.subject)
    n = len(SEEDS)
    sks, plain, blue = slice(0, 2 * n), slice(0, n), slice(n, 3 * n)  # images by prompt, in PROMPTS order
    similarity, named, blues = {}, {}, {}
    for name, images in (("base", base_images), ("adapted", adapted_images)):
        similarity[name] = float(subject_similarity(classifier, np.stack(images[sks]), reference).mean())
        named[name] = sum(p == args.subject for p in classifier.predict(np.stack(images[plain])))
        blues[name] = [background_color(image) == "blue" for image in images[blue]]
    columns = len(PROMPTS) * len(SEEDS)
    labels = [f"instance: {caption(TOKEN, c)}" for c in INSTANCE_COLORS] + [""] * (columns - len(instance_images))
    blank = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 255, np.uint8)
    cells = instance_images + [blank] * (columns - len(instance_images))  # grid takes uint8 or [0, 1] floats
    for images in (base_images, adapted_images, merged_images):
        cells += images
        labels += [f"{prompt} (seed {seed})" for prompt in PROMPTS for seed in SEEDS]
    grid = save_grid(root / "comparison.png", cells, labels, columns=columns, scale=4, label_lines=3,
                     row_titles=[f"subject: {args.subject}", "base", "adapted (Lie)", "merged"])

    print(f"      subject similarity (classifier embedding cosine, 'sks' prompts): "
          f"base {similarity['base']:.3f} -> adapted {similarity['adapted']:.3f}")
    print(f"      classifier names the subject in {INSTANCE_PROMPT!r}: base {named['base']}/{n}, "
          f"adapted {named['adapted']}/{n}")
    for k, prompt in enumerate(PROMPTS[1:]):
        print(f"      {prompt!r} comes out blue: base {sum(blues['base'][k * n:(k + 1) * n])}/{n}, "
              f"adapted {sum(blues['adapted'][k * n:(k + 1) * n])}/{n}")
    print(f"      max |merged - adapted| = {difference:.2e}  (pixels in [0, 1]; merging is exact up to round-off)")
    print("\nOutputs:")
    print(f"  comparison grid   {grid}")
    print(f"  adapter weights   {output / 'pytorch_lora_weights.safetensors'}")
    print(f"  model card        {output / 'README.md'}")
    print(f"  checkpoints       {output}/checkpoint-*")
    print(f"  validation grids  {output / 'validation'}")
    print(f"  TensorBoard logs  {output / 'logs'}   (tensorboard --logdir {output / 'logs'})")
    print(f"  instance / class  {root / 'instance-images'}  {root / 'class-images'}")


if __name__ == "__main__":
    main()
