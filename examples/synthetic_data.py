"""Procedural instance images for offline runs: a made-up subject ("sks toy") that needs no download.

The subject is the same in every image (a red ball with a yellow band and a blue dot), the way a
DreamBooth instance set shows one object; position, size and background vary between images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def draw_toy(size: int, rng: np.random.Generator) -> Image.Image:
    """One picture of the toy on a random two-colour gradient background."""
    top, bottom = rng.integers(40, 215, size=(2, 3))
    ramp = np.linspace(0.0, 1.0, size)[:, None, None]
    background = (top * (1 - ramp) + bottom * ramp).repeat(size, axis=1).astype(np.uint8)
    image = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(image)
    radius = size * rng.uniform(0.22, 0.34)
    cx, cy = rng.uniform(radius, size - radius, size=2)
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=(200, 30, 40), outline=(90, 10, 15))
    band = radius * 0.3
    draw.rectangle((cx - radius * 0.95, cy - band / 2, cx + radius * 0.95, cy + band / 2), fill=(245, 200, 30))
    dot = radius * 0.22
    draw.ellipse((cx - dot, cy - radius * 0.6 - dot, cx + dot, cy - radius * 0.6 + dot), fill=(30, 60, 200))
    return image


def make_instance_images(directory: str | Path, count: int = 4, size: int = 64, seed: int = 0) -> list[Path]:
    """Write `count` JPEG pictures of the toy into `directory`; return their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = directory / f"toy_{i:02d}.jpg"
        draw_toy(size, rng).save(path, quality=95)
        paths.append(path)
    return paths
