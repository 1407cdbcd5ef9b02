"""Render the emoji data set from Noto Color Emoji into one safetensors file (needs the font; run once).

    python -m lie_diffusion.emoji.render [--font /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf]

Every single-codepoint emoji that the font draws and Python's `unicodedata` names becomes one
RGBA render, cropped to its alpha box, centred on a square and downscaled to `RENDER_SIZE` pixels
(premultiplied alpha, so edges do not fringe). Users and tests read the file; nobody needs the font.
"""

from __future__ import annotations

import argparse
import json
import unicodedata
from pathlib import Path

import numpy as np
import torch

from lie_diffusion.emoji.data import DATA_FILE, HELD_OUT, RENDER_SIZE, save_renders

DEFAULT_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
FONT_SIZE = 109  # the only size a CBDT colour bitmap font offers
# Blocks that hold emoji; the font and unicodedata decide which code points in them are kept.
BLOCKS = [(0x00A9, 0x00AE), (0x203C, 0x3299), (0x1F000, 0x1FAFF)]
SKIP = [
    (0x1F1E6, 0x1F1FF),  # regional indicators: halves of flags
    (0x1F3FB, 0x1F3FF),  # skin-tone modifiers: colour swatches
]


def candidate_codepoints() -> list[int]:
    skip = {c for low, high in SKIP for c in range(low, high + 1)}
    return [c for low, high in BLOCKS for c in range(low, high + 1) if c not in skip]


def render_one(font, char: str, size: int) -> np.ndarray | None:
    """The glyph as (size, size, 4) uint8 RGBA, or None where the font has no colour glyph for it."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((12, 12), char, font=font, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    if box is None:
        return None
    glyph = canvas.crop(box)
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    small = square.convert("RGBa").resize((size, size), Image.LANCZOS).convert("RGBA")
    array = np.asarray(small)
    if (array[..., 3] > 0).sum() < size:
        return None  # a sliver (combining marks): nothing to recognise at this size
    return array


def render_all(font_path: str, size: int = RENDER_SIZE) -> tuple[np.ndarray, list[int], list[str]]:
    from PIL import ImageFont

    font = ImageFont.truetype(font_path, FONT_SIZE)
    renders, codepoints, names = [], [], []
    for codepoint in candidate_codepoints():
        name = unicodedata.name(chr(codepoint), "")
        if not name or name.startswith("COMBINING"):
            continue
        array = render_one(font, chr(codepoint), size)
        if array is not None:
            renders.append(array)
            codepoints.append(codepoint)
            names.append(name.lower())
    return np.stack(renders), codepoints, names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--font", default=DEFAULT_FONT)
    parser.add_argument("--output", type=Path, default=DATA_FILE)
    args = parser.parse_args()
    renders, codepoints, names = render_all(args.font)
    missing = sorted(set(HELD_OUT) - set(names))
    if missing:
        raise SystemExit(f"held-out emoji not rendered by {args.font}: {missing}")
    save_renders(args.output, torch.from_numpy(renders), codepoints, names,
                 {"font": Path(args.font).name, "font_size": FONT_SIZE, "unicode": unicodedata.unidata_version})
    print(f"{len(names)} emoji, {renders.shape[1]} px, held out {len(HELD_OUT)} -> {args.output}")
    print(json.dumps(names[:10]))


if __name__ == "__main__":
    main()
