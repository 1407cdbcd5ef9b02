"""Per-image captions in both DreamBooth scripts: kohya's sidecar files (`--caption_extension`), a
`metadata.jsonl` column (`--caption_column`), the prompt fallback and `--missing_caption error`.

The runs are in-process (`main(parse_args([...]))`) and a few steps long; each image is one solid colour,
so a batch's pixels say which images it holds, and so which caption each must have been trained with.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from accelerate import PartialState
from PIL import Image
from test_train import _common, checkpoints, load_weights, train
from test_train_sdxl import train_sdxl
from transformers import AutoTokenizer, CLIPTextModel

from lie_diffusion import training

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255), "black": (0, 0, 0)}


def _images(directory, names):
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (40, 40), COLOURS[name]).save(directory / f"{name}.png")
    return directory


def _colour_of(pixels):
    """The name of a solid image's colour, from its [-1, 1] tensor."""
    rgb = tuple(int(v) for v in ((pixels.mean(dim=(1, 2)) + 1) * 127.5).round())
    return next(name for name, colour in COLOURS.items() if colour == rgb)


def _args(parse_args, directory, *flags, class_dir=None):
    base = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", str(directory),
            "--instance_prompt", "a sks toy"]
    if class_dir is not None:
        base += ["--with_prior_preservation", "--class_data_dir", str(class_dir), "--class_prompt", "a toy"]
    return parse_args(base + list(flags))


def _prompts(args, directory, role="Instance"):
    """{image name: prompt} as the scripts resolve them at start-up."""
    PartialState()  # accelerate's logger needs it; the scripts make it first thing
    prompt = args.instance_prompt if role == "Instance" else args.class_prompt
    images = training.list_images(directory, role, training.caption_files(args))
    found = training.caption_images(args, directory, images, prompt, role)
    return {image.name: p for image, p in zip(found.images, found.prompts)}


# ------------------------------------------------------------------------------------- in-process checks


def test_sidecar_captions_fallback_and_error(tmp_path):
    folder = _images(tmp_path / "instance", ["red", "green", "blue", "black"])
    (folder / "red.txt").write_text("a sks toy on red\nsecond line is not read\n")
    (folder / "green.txt").write_text("\ufeff  a sks toy on green  ")  # BOM and spaces are no part of it
    (folder / "blue.txt").write_text("")  # empty: like no caption; black.png has no caption file
    for extension in (".txt", "txt"):
        args = _args(train.parse_args, folder, "--caption_extension", extension)
        assert args.caption_extension == ".txt"
        assert _prompts(args, folder) == {"black.png": "a sks toy", "blue.png": "a sks toy",
                                          "green.png": "a sks toy on green", "red.png": "a sks toy on red"}
    assert [p.name for p in training.list_images(folder, "Instance", (".txt",))] == [
        "black.png", "blue.png", "green.png", "red.png"]  # caption files are not images to warn about

    args = _args(train.parse_args, folder, "--caption_extension", ".txt", "--missing_caption", "error")
    message = (f"2 instance image(s) without a caption (--missing_caption error): {folder / 'black.png'} "
               f"(no caption file {folder / 'black.txt'}); {folder / 'blue.png'} ({folder / 'blue.txt'} is empty)")
    with pytest.raises(training.TrainingError, match=re.escape(message)):
        _prompts(args, folder)
    args.output_dir = str(tmp_path / "out")
    with pytest.raises(training.TrainingError, match=re.escape(message)):
        train.main(args)  # at start-up: before the model (here a path that does not exist) loads
    # Class images fall back to the class prompt even then: the script generates them without captions.
    class_dir = _images(tmp_path / "class", ["white", "black"])
    (class_dir / "white.txt").write_text("a toy on white")
    args = _args(train.parse_args, folder, "--caption_extension", ".txt", "--missing_caption", "error",
                 class_dir=class_dir)
    assert _prompts(args, class_dir, "Class") == {"black.png": "a toy", "white.png": "a toy on white"}
    (folder / "red.txt").write_bytes(b"a sks toy on r\xe9d")  # Latin-1
    with pytest.raises(training.TrainingError, match=re.escape(f"{folder / 'red.txt'} is not UTF-8 text")):
        _prompts(_args(train.parse_args, folder, "--caption_extension", ".txt"), folder)


def test_metadata_captions_and_their_errors(tmp_path):
    folder = _images(tmp_path / "instance", ["red", "green", "blue", "black"])
    rows = [{"file_name": "red.png", "text": "a sks toy on red", "other": 1}, {"file_name": "green.png", "text": " "},
            {"file_name": "blue.png"}]
    (folder / "metadata.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n\n")
    args = _args(train.parse_args, folder, "--caption_column", "text")
    assert _prompts(args, folder) == {"black.png": "a sks toy", "blue.png": "a sks toy", "green.png": "a sks toy",
                                      "red.png": "a sks toy on red"}
    args = _args(train.parse_args, folder, "--caption_column", "text", "--missing_caption", "error")
    with pytest.raises(training.TrainingError, match=re.escape(
            f"3 instance image(s) without a caption (--missing_caption error): {folder / 'black.png'} (no line of "
            f"{folder / 'metadata.jsonl'} names it); {folder / 'blue.png'} ({folder / 'metadata.jsonl'}, line 3: "
            "empty 'text'); ")):
        _prompts(args, folder)

    def error_of(lines, column="text"):
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        with pytest.raises(training.TrainingError) as error:
            _prompts(_args(train.parse_args, folder, "--caption_column", column), folder)
        return str(error.value)

    where = f"{folder / 'metadata.jsonl'}, line 2: "
    good = json.dumps(rows[0])
    assert error_of([good, '{"file_name": "green.png", "text": "x"']) == where + (
        "not valid JSON (Expecting ',' delimiter, column 39).")
    assert error_of([good, '{"file_name": "gone.png", "text": "x"}']) == where + f"{folder / 'gone.png'} does not exist."
    assert error_of([good, '["red.png", "x"]']) == where + 'expected a JSON object with a "file_name" string.'
    assert error_of([good, good]) == where + "'red.png' again (first on line 1)."
    assert error_of([good, '{"file_name": "a/red.png"}']).startswith(where + "'a/red.png' is not a file name in")
    assert error_of([good, '{"file_name": "green.png", "text": ["x"]}']) == where + (
        "'text' of 'green.png' is a list, not a string.")
    assert error_of([good], column="caption") == (
        f"--caption_column caption: no line of {folder / 'metadata.jsonl'} has it (its columns: file_name, other, text).")
    (folder / "metadata.jsonl").write_text("\n")  # no lines: no captions, the prompt for all
    assert set(_prompts(_args(train.parse_args, folder, "--caption_column", "text"), folder).values()) == {"a sks toy"}
    (folder / "metadata.jsonl").unlink()
    with pytest.raises(training.TrainingError, match=re.escape(f"--caption_column text: {folder} has no metadata.jsonl")):
        _prompts(_args(train.parse_args, folder, "--caption_column", "text"), folder)
    # A class folder without one (generated class images) takes the class prompt.
    class_dir = _images(tmp_path / "class", ["white"])
    args = _args(train.parse_args, folder, "--caption_column", "text", class_dir=class_dir)
    assert _prompts(args, class_dir, "Class") == {"white.png": "a toy"}


def test_caption_flags_that_do_not_go_together():
    cases = [
        (["--caption_extension", ".txt", "--caption_column", "text"], "--caption_extension and --caption_column are two"),
        (["--missing_caption", "error"], "--missing_caption error needs captions: --caption_extension or --caption_column"),
    ]
    for parse_args in (train.parse_args, train_sdxl.parse_args):
        for flags, message in cases:
            with pytest.raises(training.TrainingError, match=re.escape(message)):
                _args(parse_args, "d", *flags)
    with pytest.raises(SystemExit):
        _args(train.parse_args, "d", "--caption_extension", ".")


# ------------------------------------------------------------------------------------------ real runs


@pytest.fixture
def record_batches(monkeypatch):
    """The (colour, prompt) pairs of every batch the data loader makes (it reads one batch ahead of the step)."""
    batches, collate_fn = [], training.collate_fn

    def collate(examples):
        batch = collate_fn(examples)
        batches.append([(_colour_of(p), prompt) for p, prompt in zip(batch["pixel_values"], batch["prompts"])])
        return batch

    monkeypatch.setattr(training.run, "collate_fn", collate)  # the name build_dataloader reads
    return batches


def test_sd_trains_each_image_with_its_caption_and_resumes_exactly(tiny_pipeline_dir, tmp_path, monkeypatch,
                                                                   record_batches):
    """Sidecar captions for instance and class images (some missing: the prompts); the text encoder gets each
    batch's own captions in one call; a resumed run ends with the straight run's exact weights."""
    instance_dir = _images(tmp_path / "instance", ["red", "green", "blue"])
    class_dir = _images(tmp_path / "class", ["white", "black"])
    for name in ("red", "green"):
        (instance_dir / f"{name}.txt").write_text(f"a sks toy on {name}")
    (class_dir / "white.txt").write_text("a toy on white")
    expected = {"red": "a sks toy on red", "green": "a sks toy on green", "blue": "a photo of sks toy",
                "white": "a toy on white", "black": "a toy"}
    encoded, forward = [], CLIPTextModel.forward

    def record(self, input_ids, **kwargs):
        encoded.append(input_ids)
        return forward(self, input_ids, **kwargs)

    monkeypatch.setattr(CLIPTextModel, "forward", record)

    def run(output, *flags):
        args = train.parse_args(_common(tiny_pipeline_dir, instance_dir, output, 4) + [
            "--caption_extension", "txt", "--with_prior_preservation", "--class_data_dir", str(class_dir),
            "--class_prompt", "a toy", "--num_class_images", "2", "--train_batch_size", "2", "--repeats", "2",
            "--random_flip",
            "--checkpointing_steps", "2", "--report_to", "none", *flags])
        train.main(args)

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(straight)
    # 3 instance images repeated twice, batch 2: 3 batches an epoch, so checkpoint-2 is mid-epoch.
    assert len(encoded) == 4
    straight_batches = record_batches[:4]
    tokenizer = AutoTokenizer.from_pretrained(tiny_pipeline_dir, subfolder="tokenizer")
    for batch, ids in zip(straight_batches, encoded):
        assert all(prompt == expected[colour] for colour, prompt in batch), batch
        prompts = [prompt for _, prompt in batch]
        assert torch.equal(ids, tokenizer(prompts, padding="max_length", truncation=True,
                                          max_length=tokenizer.model_max_length, return_tensors="pt").input_ids)
    assert {colour for batch in straight_batches for colour, _ in batch} == set(expected)
    card = (straight / "README.md").read_text()
    assert "Each image was trained with its own caption, from `*.txt` files beside the images" in card

    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    del record_batches[:], encoded[:]
    run(resumed, "--resume_from_checkpoint", "latest")
    assert len(encoded) == 2 and record_batches[:2] == straight_batches[2:]  # steps 3 and 4, the same data
    assert checkpoints(resumed) == ["checkpoint-2", "checkpoint-4"]
    a, b = load_weights(straight), load_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sdxl_conditions_each_image_on_its_caption(tiny_sdxl_pipeline_dir, tmp_path, monkeypatch, record_batches):
    """metadata.jsonl captions for instance and class images: the UNet gets each image's own prompt embeddings
    and pooled embedding, as the two text encoders give them for that caption."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    instance_dir = _images(tmp_path / "instance", ["red", "green"])
    class_dir = _images(tmp_path / "class", ["white", "black"])
    (instance_dir / "metadata.jsonl").write_text(json.dumps({"file_name": "red.png", "text": "a sks toy on red"}))
    (class_dir / "metadata.jsonl").write_text(json.dumps({"file_name": "black.png", "text": "a toy on black"}))
    expected = {"red": "a sks toy on red", "green": "a photo of sks toy", "white": "a toy", "black": "a toy on black"}
    conditions, forward = [], UNet2DConditionModel.forward

    def record(self, sample, timestep, hidden, **kwargs):
        conditions.append((hidden.detach().clone(), kwargs["added_cond_kwargs"]["text_embeds"].detach().clone()))
        return forward(self, sample, timestep, hidden, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", record)
    args = train_sdxl.parse_args(_common(tiny_sdxl_pipeline_dir, instance_dir, tmp_path / "out", 2) + [
        "--caption_column", "text", "--with_prior_preservation", "--class_data_dir", str(class_dir),
        "--class_prompt", "a toy", "--num_class_images", "2", "--train_batch_size", "2", "--report_to", "none"])
    train_sdxl.main(args)
    assert len(conditions) == 2

    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_pipeline_dir)
    with torch.no_grad():
        for batch, (hidden, pooled) in zip(record_batches, conditions):
            assert all(prompt == expected[colour] for colour, prompt in batch), batch
            want_hidden, _, want_pooled, _ = pipeline.encode_prompt(
                [prompt for _, prompt in batch], do_classifier_free_guidance=False)
            torch.testing.assert_close(hidden, want_hidden, rtol=0, atol=1e-5)
            torch.testing.assert_close(pooled, want_pooled, rtol=0, atol=1e-5)
    assert {colour for batch in record_batches for colour, _ in batch} == set(expected)
    assert "the `text` column of each image folder's `metadata.jsonl`" in (tmp_path / "out" / "README.md").read_text()
