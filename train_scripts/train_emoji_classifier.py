#!/usr/bin/env python
"""Train the emoji classifier (the judge) on augmented renders of every emoji in the data set.

    python train_scripts/train_emoji_classifier.py [--output lie_diffusion/emoji/data/emoji_classifier.safetensors]

Augmentation makes it judge generated pictures, not only clean renders: random size (16-30 px) and
position, a palette or random background colour, brightness/contrast/saturation jitter, blur and
pixel noise. It reports top-1 on a fixed set of clean validation pictures (palette backgrounds).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lie_diffusion.emoji.classifier import CLASSIFIER_FILE, EmojiClassifier, save_classifier
from lie_diffusion.emoji.data import IMAGE_SIZE, PALETTE, compose, load_renders, random_example

logger = logging.getLogger("train_emoji_classifier")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=CLASSIFIER_FILE)
    parser.add_argument("--data_file", type=Path, default=None, help="Emoji renders (default: the shipped file).")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_threads", type=int, default=1)
    parser.add_argument("--log_every", type=int, default=250)
    return parser.parse_args(argv)


def augmented_example(renders, index: int, rng: np.random.Generator) -> np.ndarray:
    """One picture of emoji `index` as a generator might draw it; float32 (H, W, 3) in [0, 1]."""
    if rng.random() < 0.5:
        background = tuple(int(v) for v in rng.integers(0, 256, size=3))
    else:
        background = PALETTE[list(PALETTE)[rng.integers(len(PALETTE))]]
    size = int(rng.integers(16, 31))
    x, y = (int(v) for v in rng.integers(0, IMAGE_SIZE - size + 1, size=2))
    image = compose(renders.rgba[index].numpy(), background, size, (x, y), margin=0).astype(np.float32) / 255
    image = (image - 0.5) * rng.uniform(0.7, 1.3) + 0.5 + rng.uniform(-0.15, 0.15)  # contrast, brightness
    gray = image.mean(-1, keepdims=True)
    image = gray + (image - gray) * rng.uniform(0.6, 1.4)  # saturation
    if rng.random() < 0.5:  # blur: a 3x3 box filter mixed in
        padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
        box = sum(padded[dy:dy + IMAGE_SIZE, dx:dx + IMAGE_SIZE] for dy in range(3) for dx in range(3)) / 9
        image = image + (box - image) * rng.uniform(0.3, 1.0)
    image = image + rng.normal(0, rng.uniform(0, 0.06), image.shape)
    return np.clip(image, 0, 1).astype(np.float32)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    renders = load_renders(args.data_file) if args.data_file else load_renders()
    count = len(renders.names)
    val_rng = np.random.default_rng(args.seed + 1)
    val_labels = np.arange(count)
    val_images = np.stack([random_example(renders, int(i), val_rng)[0] for i in val_labels])

    model = EmojiClassifier(renders.names, width=args.width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.learning_rate, total_steps=args.steps,
                                                    pct_start=0.1)
    start, running = time.time(), []
    for step in range(args.steps):
        model.train()
        labels = rng.integers(0, count, size=args.batch_size)
        images = np.stack([augmented_example(renders, int(i), rng) for i in labels])
        loss = F.cross_entropy(model(images), torch.from_numpy(labels), label_smoothing=0.1)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        running.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            model.eval()
            with torch.no_grad():
                accuracy = float((model(val_images).argmax(-1).numpy() == val_labels).mean())
            logger.info(f"step {step + 1:5d}  loss {np.mean(running):.3f}  clean top-1 {accuracy:.3f}  "
                        f"{time.time() - start:6.0f}s")
            running = []
    info = {"clean_top1": accuracy, "steps": args.steps, "seed": args.seed, "minutes": round((time.time() - start) / 60, 1)}
    save_classifier(model, args.output, info)
    logger.info(f"saved {args.output}: {info}")


if __name__ == "__main__":
    main()
