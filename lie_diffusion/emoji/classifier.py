"""The emoji classifier: the judge of the pretrained pipeline and of DreamBooth fidelity.

A small CNN over 32 px RGB pictures of emoji on plain backgrounds. It knows every emoji in the data
set, the held-out DreamBooth subjects included (the generator never saw those; the judge must
recognise them). `logits` name the emoji; `embed` gives an L2-normalised feature vector, so the
cosine similarity between a generated picture and a subject's renders measures likeness.
Trained by `train_scripts/train_emoji_classifier.py`; shipped as one safetensors file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

CLASSIFIER_FILE = Path(__file__).resolve().parent / "data" / "emoji_classifier.safetensors"


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class EmojiClassifier(nn.Module):
    def __init__(self, names: list[str], width: int = 16, embed_dim: int = 256):
        super().__init__()
        self.names = list(names)
        self.config = {"width": width, "embed_dim": embed_dim}
        self.features = nn.Sequential(
            _block(3, width), nn.MaxPool2d(2),              # 16 px
            _block(width, 2 * width), nn.MaxPool2d(2),      # 8 px
            _block(2 * width, 4 * width), nn.MaxPool2d(2),  # 4 px
            _block(4 * width, 8 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(8 * width, embed_dim), nn.BatchNorm1d(embed_dim), nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(embed_dim, len(self.names))

    @staticmethod
    def prepare(images) -> torch.Tensor:
        """uint8 (B, H, W, 3) / float [0, 1] (B, H, W, 3) arrays, PIL images, or float (B, 3, H, W) tensors."""
        if isinstance(images, (list, tuple)):
            images = np.stack([np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
                               for image in images])
        if isinstance(images, np.ndarray):
            array = images.astype(np.float32) / 255 if images.dtype == np.uint8 else images.astype(np.float32)
            if array.ndim != 4 or array.shape[-1] != 3:
                raise ValueError(f"expected images as (B, H, W, 3); got shape {array.shape}")
            images = torch.from_numpy(array).permute(0, 3, 1, 2)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected an image tensor (B, 3, H, W); got shape {tuple(images.shape)}")
        return (images.float() - 0.5) / 0.25

    def embed_raw(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, images) -> torch.Tensor:
        """Logits over `self.names`."""
        return self.head(self.features(self.prepare(images).to(self.head.weight.device)))

    @torch.no_grad()
    def embed(self, images) -> torch.Tensor:
        """L2-normalised embeddings (B, embed_dim): cosine similarity is a dot product."""
        features = self.features(self.prepare(images).to(self.head.weight.device))
        return torch.nn.functional.normalize(features, dim=-1)

    @torch.no_grad()
    def predict(self, images) -> list[str]:
        return [self.names[i] for i in self(images).argmax(-1).tolist()]


def save_classifier(model: EmojiClassifier, path: str | Path = CLASSIFIER_FILE, extra: dict | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    metadata = {"names": json.dumps(model.names), "config": json.dumps(model.config), "info": json.dumps(extra or {})}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def load_classifier(path: str | Path = CLASSIFIER_FILE, device: str | torch.device = "cpu") -> EmojiClassifier:
    """The shipped classifier (or another file written by `save_classifier`), in eval mode."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"emoji classifier {path} is missing; train it with "
                                "train_scripts/train_emoji_classifier.py")
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
        if "names" not in meta or "config" not in meta:
            raise ValueError(f"{path} has no 'names'/'config' metadata: not an emoji classifier file")
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    model = EmojiClassifier(json.loads(meta["names"]), **json.loads(meta["config"]))
    model.load_state_dict(state)
    model.info = json.loads(meta.get("info", "{}"))
    return model.to(device).eval()


def reference_embedding(classifier: EmojiClassifier, renders, name: str, count: int = 16, seed: int = 0) -> torch.Tensor:
    """The normalised mean embedding of `count` pictures of emoji `name` (random size, place, palette colour)."""
    from lie_diffusion.emoji.data import random_example

    rng = np.random.default_rng(seed)
    index = renders.index(name)
    images = np.stack([random_example(renders, index, rng)[0] for _ in range(count)])
    return torch.nn.functional.normalize(classifier.embed(images).mean(0), dim=0)


def subject_similarity(classifier: EmojiClassifier, images, reference: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each image's embedding to a `reference_embedding`, shape (B,)."""
    return classifier.embed(images) @ reference.to(classifier.head.weight.device)
