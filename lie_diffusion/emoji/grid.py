"""Labelled image grids: pictures upscaled (nearest neighbour, so pixels stay honest) with text above each."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def labelled_grid(images, labels: list[str], columns: int, scale: int = 4, label_lines: int = 2,
                  row_titles: list[str] | None = None) -> "Image.Image":
    """One PIL image: `images` (uint8 or [0, 1] float (H, W, 3) arrays) in rows of `columns`, each under its label."""
    from PIL import Image, ImageDraw, ImageFont

    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    font = ImageFont.load_default()
    arrays = [np.asarray(i) if np.asarray(i).dtype == np.uint8 else (np.asarray(i) * 255).round().clip(0, 255)
              .astype(np.uint8) for i in images]
    height, width = arrays[0].shape[:2]
    cell_w, text_h = max(width * scale, 150), 12 * label_lines + 4
    cell_h = height * scale + text_h
    title_w = 0 if not row_titles else 110
    rows = -(-len(arrays) // columns)
    canvas = Image.new("RGB", (title_w + columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for n, (array, label) in enumerate(zip(arrays, labels)):
        row, col = divmod(n, columns)
        x, y = title_w + col * cell_w, row * cell_h
        lines, line = [], ""
        for word in label.split():
            if line and draw.textlength(f"{line} {word}", font=font) > cell_w - 4:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        for k, text in enumerate((lines + [line])[:label_lines]):
            draw.text((x + 2, y + 2 + 12 * k), text, fill="black", font=font)
        picture = Image.fromarray(array).resize((width * scale, height * scale), Image.NEAREST)
        canvas.paste(picture, (x + (cell_w - width * scale) // 2, y + text_h))
    for row, title in enumerate(row_titles or []):
        draw.text((4, row * cell_h + cell_h // 2), title, fill="black", font=font)
    return canvas


def save_grid(path: str | Path, *args, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labelled_grid(*args, **kwargs).save(path)
    return path
