"""Training data: the images of a folder, their captions, the DreamBooth data set and generated class images."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate.logging import get_logger
from accelerate.utils import gather_object
from diffusers import DPMSolverMultistepScheduler
from diffusers.training_utils import free_memory
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from .errors import TrainingError

logger = get_logger(__name__)

METADATA = "metadata.jsonl"  # per-image captions, the layout diffusers' image-folder data sets use
# torchvision's InterpolationMode names (what diffusers' flag accepts), mapped onto PIL filters.
INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "nearest_exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


def caption_files(args) -> tuple[str, ...]:
    """How the names of caption files end: they sit among the images and are not worth a warning."""
    if args.caption_extension:
        return (args.caption_extension,)
    return (METADATA,) if args.caption_column else ()


def list_images(directory, role, captions=()):
    """The readable image files of `directory`, sorted; unreadable ones are skipped with a warning, caption
    files (names ending in one of `captions`) silently."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TrainingError(f"{role} directory {directory} does not exist.")
    images = []
    for path in sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")):
        if path.name.endswith(captions):
            continue
        try:
            with Image.open(path) as image:
                image.load()
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            logger.warning(f"Skipping {path}: not a readable image ({error}).")
        else:
            images.append(path)
    return images


@dataclass
class ImageSet:
    """The images of one role (instance or class) and the prompt each trains with: its caption, else the
    role's prompt."""

    images: Sequence  # paths, or a data set's `DatasetImages`
    prompts: list  # a string per image, or a list of strings (its captions)


def caption_images(args, directory, images, prompt, role) -> ImageSet:
    """Pair each image with its caption (--caption_extension or --caption_column), else with `prompt`.

    Runs at start-up: a caption problem stops the run before any model loads, naming the file (and line).
    Only instance images obey --missing_caption error: class images are often generated, and those have
    no caption.
    """
    if args.caption_extension:
        found = {image: sidecar_caption(image, args.caption_extension) for image in images}
    elif args.caption_column:
        found = metadata_captions(directory, images, args.caption_column, required=role == "Instance")
    else:
        return ImageSet(images, [prompt] * len(images))
    missing = [f"{image} ({why})" for image, (caption, why) in found.items() if not caption]
    if missing and role == "Instance" and args.missing_caption == "error":
        raise TrainingError(f"{len(missing)} instance image(s) without a caption (--missing_caption error): "
                            + "; ".join(missing[:5]) + ("; ..." if len(missing) > 5 else ""))
    logger.info(f"{role} images: {len(images) - len(missing)} with their own caption, "
                f"{len(missing)} with the prompt {prompt!r}.")
    return ImageSet(images, [caption or prompt for caption, _ in found.values()])


def _read_text(path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8-sig")  # a byte-order mark is no part of the caption
    except UnicodeDecodeError as error:
        raise TrainingError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}).") from None


def sidecar_caption(image, extension):
    """(caption or None, why there is none): the first line of the file beside `image`, as kohya reads it."""
    path = image.with_suffix(extension)
    if not path.is_file():
        return None, f"no caption file {path}"
    lines = _read_text(path).splitlines()
    caption = lines[0].strip() if lines else ""
    return caption or None, f"{path} {'starts with an empty line' if lines else 'is empty'}"


def metadata_captions(directory, images, column, required):
    """{image: (caption or None, why there is none)} from `directory`/metadata.jsonl: one JSON object a line,
    with the image's `file_name` and its caption in `column`, as diffusers' image-folder scripts read it.

    A folder without the file gives no captions, unless `required`. A line that is no JSON object, names a
    file that is not there, or repeats one stops the run; so does a `column` that no line has (a typo).
    """
    directory = Path(directory)
    path = directory / METADATA
    if not path.is_file():
        if required:
            raise TrainingError(f"--caption_column {column}: {directory} has no {METADATA}.")
        return {image: (None, f"no {path}") for image in images}
    rows, columns = {}, set()
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise TrainingError(f"{where}: not valid JSON ({error.msg}, column {error.colno}).") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise TrainingError(f"{where}: expected a JSON object with a \"file_name\" string.")
        name = row["file_name"]
        if len(Path(name).parts) != 1:
            raise TrainingError(f"{where}: {name!r} is not a file name in {directory} (subfolders are not read).")
        if not (directory / name).is_file():
            raise TrainingError(f"{where}: {directory / name} does not exist.")
        if name in rows:
            raise TrainingError(f"{where}: {name!r} again (first on line {rows[name][0]}).")
        caption = row.get(column)
        if caption is not None and not isinstance(caption, str):
            raise TrainingError(f"{where}: {column!r} of {name!r} is a {type(caption).__name__}, not a string.")
        rows[name] = (number, (caption or "").strip())
        columns |= row.keys()
    if rows and column not in columns:
        raise TrainingError(f"--caption_column {column}: no line of {path} has it "
                            f"(its columns: {', '.join(sorted(columns))}).")
    found = {}
    for image in images:
        number, caption = rows.get(image.name, (None, ""))
        why = f"no line of {path} names it" if number is None else f"{path}, line {number}: empty {column!r}"
        found[image] = (caption or None, why)
    return found


class DatasetImages(Sequence):
    """The images of a `datasets` data set's image column, decoded when read (a data set need not fit in memory)."""

    def __init__(self, dataset, column, indices):
        self.dataset, self.column, self.indices = dataset.select_columns([column]), column, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        return self.dataset[self.indices[index]][self.column]


def text_image_data(args) -> ImageSet:
    """The images and captions a text-to-image run trains on, checked at start-up.

    `--train_data_dir`: a folder of images with a metadata.jsonl (diffusers' image-folder layout), read
    here, so a bad line is named by file and line. `--dataset_name`: a `datasets` data set, a folder
    saved with `save_to_disk`, else anything `load_dataset` reads (its "train" split). Every image needs a
    caption: a string, or a list of strings (one is drawn each time the image is seen). `--max_train_samples`
    keeps that many, drawn with the seed.
    """
    if args.train_data_dir is not None:
        images, prompts = _folder_data(args)
    else:
        images, prompts = _dataset_data(args)
    if not images:
        raise TrainingError(f"{args.train_data_dir or args.dataset_name} holds no training images.")
    if args.max_train_samples is not None and args.max_train_samples < len(images):
        keep = sorted(np.random.default_rng(args.seed).permutation(len(images))[: args.max_train_samples])
        images = [images[i] for i in keep] if isinstance(images, list) else DatasetImages(
            images.dataset, images.column, [images.indices[i] for i in keep])
        prompts = [prompts[i] for i in keep]
    logger.info(f"Training data: {len(images)} images with their captions.")
    return ImageSet(images, prompts)


def _folder_data(args):
    directory = Path(args.train_data_dir)
    images = list_images(directory, "Training data", (METADATA,))
    found = metadata_captions(directory, images, args.caption_column, required=True)
    missing = [f"{image} ({why})" for image, (caption, why) in found.items() if not caption]
    if missing:
        raise TrainingError(f"{len(missing)} image(s) of {directory} without a caption: "
                            + "; ".join(missing[:5]) + ("; ..." if len(missing) > 5 else ""))
    return images, [caption for caption, _ in found.values()]


def _dataset_data(args):
    name = args.dataset_name
    try:
        import datasets
    except ImportError:
        raise TrainingError("--dataset_name needs the datasets library: pip install 'lie-diffusion[train]'.") from None
    path = Path(name)
    saved = path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json"))
    try:
        if saved:
            data = datasets.load_from_disk(str(path))
        else:
            data = datasets.load_dataset(name, args.dataset_config_name, cache_dir=args.cache_dir)
    except Exception as error:  # datasets raises many kinds; the message is what the user needs
        raise TrainingError(f"--dataset_name {name}: cannot load it ({type(error).__name__}: {error}).") from None
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise TrainingError(f"--dataset_name {name}: no 'train' split (its splits: {', '.join(data)}).")
        data = data["train"]
    for flag, column in (("--image_column", args.image_column), ("--caption_column", args.caption_column)):
        if column not in data.column_names:
            raise TrainingError(f"{flag} {column}: {name} has no such column "
                                f"(its columns: {', '.join(data.column_names)}).")
    prompts = []
    for row, caption in enumerate(data[args.caption_column]):
        where = f"{name}, row {row}"
        if isinstance(caption, str) and caption.strip():
            prompts.append(caption.strip())
        elif isinstance(caption, list) and caption and all(isinstance(c, str) and c.strip() for c in caption):
            prompts.append([c.strip() for c in caption])
        else:
            raise TrainingError(f"{where}: {args.caption_column!r} is {caption!r}; expected a caption "
                                "(a non-empty string, or a list of them).")
    images = DatasetImages(data, args.image_column, range(len(data)))
    for row in range(len(images)):  # decode each once now: a bad image stops the run before the models load
        try:
            image = images[row]
        except Exception as error:
            raise TrainingError(f"{name}, row {row}: {args.image_column!r} cannot be read "
                                f"({type(error).__name__}: {error}).") from None
        if not isinstance(image, Image.Image):
            raise TrainingError(f"{name}, row {row}: {args.image_column!r} is a {type(image).__name__}, not an image "
                                "(the column needs the datasets Image feature).")
    return images, prompts


def load_rgb(source):
    """Open an image upright (EXIF orientation) as RGB; transparency is composited onto white.

    `source`: a path, or a PIL image (what a `datasets` image column holds)."""
    with source if isinstance(source, Image.Image) else Image.open(source) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            image = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image)
        return image.convert("RGB")


class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance images (and class images for prior preservation) as [-1, 1] tensors of size x size.

    Random crops and flips draw from a generator seeded by (seed, epoch, index), not from the global
    RNG: the data a step sees then depends only on its position, which makes resuming exact. Each
    example also carries the image's original (height, width) and the crop's (top, left) in the
    resized image (SDXL's micro-conditioning), and its prompt from `instance_prompts` / `class_prompts`
    (one per image, in order; without them, None): captions vary per image, so the batch says which.
    A prompt that is a list of captions gives one of them, drawn from the same generator.
    """

    def __init__(self, instance_images, class_images, size, center_crop, random_flip, interpolation, repeats, seed,
                 instance_prompts=None, class_prompts=None):
        self.instance_images, self.class_images = instance_images, class_images
        self.instance_prompts = instance_prompts or [None] * len(instance_images)
        self.class_prompts = class_prompts or [None] * len(class_images)
        self.size, self.center_crop, self.random_flip = size, center_crop, random_flip
        self.interpolation, self.seed, self.epoch = INTERPOLATION[interpolation], seed, 0
        self._length = max(len(instance_images) * repeats, len(class_images))

    def __len__(self):
        return self._length

    def transform(self, image, rng):
        original_size = (image.height, image.width)
        width, height = image.size
        scale = self.size / min(width, height)  # shorter side to `size`: small images are upscaled
        width, height = max(self.size, round(width * scale)), max(self.size, round(height * scale))
        image = image.resize((width, height), self.interpolation)
        if self.center_crop:
            left, top = (width - self.size) // 2, (height - self.size) // 2
        else:
            left, top = int(rng.integers(width - self.size + 1)), int(rng.integers(height - self.size + 1))
        image = image.crop((left, top, left + self.size, top + self.size))
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous(), original_size, (top, left)

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, self.epoch, index])
        example = {}
        sources = [("instance", self.instance_images, self.instance_prompts)]
        if self.class_images:
            sources.append(("class", self.class_images, self.class_prompts))
        for role, images, prompts in sources:
            pixels, original_size, crop = self.transform(load_rgb(images[index % len(images)]), rng)
            example[role] = pixels
            example[f"{role}_size_crop"] = original_size + crop
            prompt = prompts[index % len(images)]
            if isinstance(prompt, list):  # several captions of one image: one of them, as diffusers picks
                prompt = prompt[int(rng.integers(len(prompt)))]
            example[f"{role}_prompt"] = prompt
        return example


def collate_fn(examples):
    """Instance images first, then class images: one forward pass serves both losses.

    `size_crops` holds (original height, original width, crop top, crop left) per image, and `prompts` the
    prompt of each image, same order.
    """
    roles = ["instance"] + (["class"] if "class" in examples[0] else [])
    images = [e[role] for role in roles for e in examples]
    size_crops = [e[f"{role}_size_crop"] for role in roles for e in examples]
    prompts = [e[f"{role}_prompt"] for role in roles for e in examples]
    return {"pixel_values": torch.stack(images), "size_crops": torch.tensor(size_crops), "prompts": prompts}


def fast_sampler(pipeline):
    """DPM-Solver++ for validation and class images, unless the model is an EDM or a flow-matching one (keeps its
    own sampler)."""
    if not any(kind in type(pipeline.scheduler).__name__ for kind in ("EDM", "FlowMatch")):
        pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    return pipeline


def generate_class_images(args, accelerator, load_pipeline):
    """Top up `class_data_dir` to `num_class_images` images sampled from the base model.

    Every process samples its share; the main process writes them all (each file atomically).
    """
    class_dir = Path(args.class_data_dir)
    if accelerator.is_main_process:
        class_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    existing = len(list_images(class_dir, "Class", caption_files(args)))
    missing = args.num_class_images - existing
    if missing <= 0:
        return
    dtype = torch.float16 if accelerator.device.type in ("cuda", "xpu") else torch.float32
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(
        args.prior_generation_precision, dtype
    )
    pipeline = fast_sampler(load_pipeline(dtype))
    pipeline.set_progress_bar_config(disable=True)
    pipeline.to(accelerator.device)
    logger.info(f"Generating {missing} class images of {args.class_prompt!r} into {class_dir}.")
    samples = []
    with accelerator.split_between_processes(list(range(existing, args.num_class_images))) as indices:
        batches = [indices[i : i + args.sample_batch_size] for i in range(0, len(indices), args.sample_batch_size)]
        for batch in tqdm(batches, desc="Generating class images", disable=not accelerator.is_local_main_process):
            # One generator per image: the images do not depend on the number of processes.
            generators = None if args.seed is None else [torch.Generator().manual_seed(args.seed + i) for i in batch]
            images = pipeline(
                [args.class_prompt] * len(batch), num_inference_steps=args.num_inference_steps, generator=generators
            ).images
            samples += list(zip(batch, images))
    samples = gather_object(samples) if accelerator.num_processes > 1 else samples
    if accelerator.is_main_process:
        for index, image in samples:
            name = f"{index:05d}-{hashlib.sha1(image.tobytes()).hexdigest()[:12]}.jpg"
            image.save(class_dir / f".{name}.tmp", format="JPEG")
            os.replace(class_dir / f".{name}.tmp", class_dir / name)
    accelerator.wait_for_everyone()
    del pipeline
    free_memory()
