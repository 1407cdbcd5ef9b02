"""The emoji data set: one safetensors file of RGBA renders, and the captioned 32 px images made from it.

The file (`data/emoji_renders.safetensors`, written by `python -m lie_diffusion.emoji.render`) holds
`rgba`: uint8 (N, 32, 32, 4) and `codepoints`: int32 (N), with JSON metadata `names` (lower-case
`unicodedata.name`), `held_out` (names never shown to the pretrained model: the DreamBooth subjects)
and where the renders came from. A training image is a render scaled to a random size, placed at a
random position on a plain background from `PALETTE`; its caption names the emoji and the colour.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

DATA_FILE = Path(__file__).resolve().parent / "data" / "emoji_renders.safetensors"
RENDER_SIZE = 32
IMAGE_SIZE = 32
MARGIN = 2  # pixels of pure background around every placed emoji: the border measures the colour
SIZE_RANGE = (20, 28)  # emoji side length in a training image, pixels

PALETTE = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "red": (220, 30, 30),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (250, 220, 40),
    "purple": (140, 50, 180),
    "orange": (250, 140, 20),
}

# DreamBooth subjects, never seen in pretraining: spread over animals, food, plants, travel, objects,
# activities, faces and nature.
HELD_OUT = (
    "dog face", "frog face", "penguin", "octopus",
    "red apple", "slice of pizza", "hamburger", "birthday cake",
    "sunflower", "cactus", "rocket", "bicycle",
    "house building", "alarm clock", "crown", "guitar",
    "soccer ball", "trophy", "ghost", "smiling face with sunglasses",
    "robot face", "rainbow", "fire", "electric light bulb",
)


def caption(name: str | None, color: str | None = None) -> str:
    """'a cat face emoji on a blue background'; name None gives the class prompt 'an emoji ...'."""
    text = f"a {name} emoji" if name else "an emoji"
    return f"{text} on a {color} background" if color else text


@dataclass
class EmojiRenders:
    rgba: torch.Tensor  # uint8 (N, RENDER_SIZE, RENDER_SIZE, 4)
    codepoints: list[int]
    names: list[str]
    held_out: list[str]
    info: dict = field(default_factory=dict)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"no emoji named {name!r} in the data set ({len(self.names)} names)") from None

    @property
    def pretrain_indices(self) -> list[int]:
        held = set(self.held_out)
        return [i for i, name in enumerate(self.names) if name not in held]

    @property
    def held_out_indices(self) -> list[int]:
        return [self.index(name) for name in self.held_out]


def save_renders(path: str | Path, rgba: torch.Tensor, codepoints, names, info: dict | None = None) -> Path:
    from safetensors.torch import save_file

    if rgba.dtype != torch.uint8 or rgba.ndim != 4 or rgba.shape[-1] != 4 or len(names) != rgba.shape[0]:
        raise ValueError(f"renders must be uint8 (N, H, W, 4) with one name each; got {tuple(rgba.shape)} "
                         f"{rgba.dtype} and {len(names)} names")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"names": json.dumps(list(names)), "held_out": json.dumps(list(HELD_OUT)),
                "info": json.dumps(info or {})}
    tmp = path.with_name(path.name + ".tmp")
    save_file({"rgba": rgba.contiguous(), "codepoints": torch.tensor(codepoints, dtype=torch.int32)},
              str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def load_renders(path: str | Path = DATA_FILE) -> EmojiRenders:
    """Read the shipped renders (or another file written by `save_renders`)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"emoji data file {path} is missing; build it with `python -m lie_diffusion.emoji.render`")
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
        if "names" not in meta or "held_out" not in meta:
            raise ValueError(f"{path} has no 'names'/'held_out' metadata: not an emoji renders file")
        rgba = handle.get_tensor("rgba")
        codepoints = handle.get_tensor("codepoints").tolist()
    return EmojiRenders(rgba, codepoints, json.loads(meta["names"]), json.loads(meta["held_out"]),
                        json.loads(meta.get("info", "{}")))


def compose(render: np.ndarray | torch.Tensor, background: tuple[int, int, int], size: int = 24,
            offset: tuple[int, int] | None = None, image_size: int = IMAGE_SIZE, margin: int = MARGIN) -> np.ndarray:
    """Alpha-blend one RGBA render, scaled to `size` px, onto a plain background; uint8 (H, W, 3).

    `offset` is the (x, y) of the emoji's top-left corner; None centres it.
    """
    from PIL import Image

    render = np.asarray(render)
    if size + 2 * margin > image_size:
        raise ValueError(f"emoji size {size} + 2*{margin} margin does not fit a {image_size} px image")
    if size != render.shape[0]:
        render = np.asarray(Image.fromarray(render, "RGBA").convert("RGBa").resize((size, size), Image.LANCZOS)
                            .convert("RGBA"))
    if offset is None:
        offset = ((image_size - size) // 2,) * 2
    x, y = offset
    image = np.empty((image_size, image_size, 3), np.float32)
    image[:] = background
    alpha = render[..., 3:].astype(np.float32) / 255
    patch = image[y:y + size, x:x + size]
    patch[:] = patch * (1 - alpha) + render[..., :3].astype(np.float32) * alpha
    return image.round().clip(0, 255).astype(np.uint8)


def random_example(renders: EmojiRenders, index: int, rng: np.random.Generator, color: str | None = None,
                   image_size: int = IMAGE_SIZE) -> tuple[np.ndarray, str]:
    """One training picture of emoji `index`: random size, position and (unless given) background colour."""
    color = color or list(PALETTE)[rng.integers(len(PALETTE))]
    size = int(rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1))
    x, y = (int(v) for v in rng.integers(MARGIN, image_size - MARGIN - size + 1, size=2))
    return compose(renders.rgba[index].numpy(), PALETTE[color], size, (x, y), image_size), color


def background_color(image: np.ndarray, border: int = MARGIN) -> str:
    """The palette colour nearest to the mean of an image's border pixels (uint8 or [0, 1] float (H, W, 3))."""
    image = np.asarray(image, dtype=np.float32)
    if image.max() <= 1.0:
        image = image * 255
    ring = np.concatenate([image[:border].reshape(-1, 3), image[-border:].reshape(-1, 3),
                           image[:, :border].reshape(-1, 3), image[:, -border:].reshape(-1, 3)])
    mean = ring.mean(0)
    names = list(PALETTE)
    return names[int(np.argmin([((mean - np.array(PALETTE[n])) ** 2).sum() for n in names]))]
