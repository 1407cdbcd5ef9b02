"""train_text_to_image_lie.py: captions from an image folder with metadata.jsonl and from a saved `datasets` data
set, errors that name the bad file and line (or row), a run end to end, and exact resume.

The runs are in-process (`main(parse_args([...]))`) and a few steps long; each image is one solid colour, so
a batch's pixels say which image it holds, and so which caption it must have been trained with.
"""

from __future__ import annotations

import json
import re
import shutil
import sys

import pytest
import torch
from accelerate import PartialState
from PIL import Image
from test_train import REPO, _driver, _env, _load, _steps, checkpoints, load_weights, run
from test_train_captions import COLOURS, _colour_of, _images, record_batches  # noqa: F401 (a fixture)

from lie_diffusion import load_lie_weights, training

datasets = pytest.importorskip("datasets")
SCRIPT = REPO / "train_scripts" / "train_text_to_image_lie.py"
t2i = _load(SCRIPT)
CAPTIONS = {"red": ["a red square"], "green": ["a green square"], "blue": ["a blue square", "blue, square"]}


def _args(*flags, model="m", output=None):
    base = ["--pretrained_model_name_or_path", str(model)]
    if output is not None:
        base += ["--output_dir", str(output)]
    return t2i.parse_args(base + [str(f) for f in flags])


def _folder(tmp_path, captions=None):
    """Images 40x48 (bigger than the training size: random crops) with a metadata.jsonl of their captions."""
    folder = tmp_path / "folder"
    folder.mkdir()
    rows = []
    for name, caption in (captions or {"red": "a red square", "green": "a green square"}).items():
        Image.new("RGB", (40, 48), COLOURS[name]).save(folder / f"{name}.png")
        rows.append(json.dumps({"file_name": f"{name}.png", "text": caption, "n": 1}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def _saved_dataset(tmp_path, captions=CAPTIONS, name="saved"):
    data = datasets.Dataset.from_dict({
        "picture": [Image.new("RGB", (40, 48), COLOURS[colour]) for colour in captions],
        "caption": list(captions.values()),
    })
    data.save_to_disk(str(tmp_path / name))
    return tmp_path / name


def _data(args):
    """[(colour, caption(s))] of the training data `args` name, as the script reads it at start-up."""
    PartialState()  # accelerate's logger needs it; the script makes it first thing
    found = training.text_image_data(args)
    colours = {rgb: name for name, rgb in COLOURS.items()}
    return [(colours[training.load_rgb(image).getpixel((0, 0))], prompt)
            for image, prompt in zip(found.images, found.prompts)]


def test_captions_from_a_folder_and_from_a_saved_dataset(tmp_path):
    folder = _folder(tmp_path)
    assert _data(_args("--train_data_dir", folder)) == [("green", "a green square"), ("red", "a red square")]
    saved = _saved_dataset(tmp_path)
    args = _args("--dataset_name", saved, "--image_column", "picture", "--caption_column", "caption")
    assert _data(args) == list(CAPTIONS.items())
    # a DatasetDict saved to disk: its train split
    datasets.DatasetDict({"train": datasets.load_from_disk(str(saved))}).save_to_disk(str(tmp_path / "dict"))
    args = _args("--dataset_name", tmp_path / "dict", "--image_column", "picture", "--caption_column", "caption")
    assert len(_data(args)) == 3
    # --max_train_samples: that many, drawn with the seed, in the data set's order
    args = _args("--dataset_name", saved, "--image_column", "picture", "--caption_column", "caption",
                 "--max_train_samples", 2, "--seed", 3)
    kept, everything = _data(args), _data(_args("--dataset_name", saved, "--image_column", "picture",
                                                "--caption_column", "caption"))
    assert len(kept) == 2 and kept == _data(args) and all(row in everything for row in kept)
    assert [everything.index(row) for row in kept] == sorted(everything.index(row) for row in kept)


def test_bad_data_is_named_by_file_and_line(tmp_path):
    folder = _folder(tmp_path)
    metadata = folder / "metadata.jsonl"
    good = json.dumps({"file_name": "red.png", "text": "a red square"})

    def error_of(*flags):
        with pytest.raises(training.TrainingError) as error:
            _data(_args(*flags))
        return str(error.value)

    for lines, message in [
        ([good, '{"file_name": "green.png", "text": "x"'], "line 2: not valid JSON (Expecting ',' delimiter"),
        ([good, '{"file_name": "gone.png", "text": "x"}'], f"line 2: {folder / 'gone.png'} does not exist."),
        ([good, '{"file_name": "green.png", "text": " "}'], f"line 2: empty 'text'"),
    ]:
        metadata.write_text("\n".join(lines) + "\n")
        assert message in error_of("--train_data_dir", folder)
    metadata.write_text(good + "\n")  # green.png has no line
    assert error_of("--train_data_dir", folder) == (
        f"1 image(s) of {folder} without a caption: {folder / 'green.png'} (no line of {metadata} names it)")
    assert error_of("--train_data_dir", folder, "--caption_column", "caption") == (
        f"--caption_column caption: no line of {metadata} has it (its columns: file_name, text).")
    metadata.unlink()
    assert error_of("--train_data_dir", folder) == f"--caption_column text: {folder} has no metadata.jsonl."
    assert error_of("--train_data_dir", tmp_path / "nowhere") == (
        f"Training data directory {tmp_path / 'nowhere'} does not exist.")

    saved = _saved_dataset(tmp_path)
    assert error_of("--dataset_name", saved, "--caption_column", "caption") == (
        f"--image_column image: {saved} has no such column (its columns: picture, caption).")
    assert error_of("--dataset_name", saved, "--image_column", "picture") == (
        f"--caption_column text: {saved} has no such column (its columns: picture, caption).")
    bad = _saved_dataset(tmp_path, {"red": "a red square", "green": ""}, name="empty-caption")
    assert error_of("--dataset_name", bad, "--image_column", "picture", "--caption_column", "caption") == (
        f"{bad}, row 1: 'caption' is ''; expected a caption (a non-empty string, or a list of them).")
    datasets.Dataset.from_dict({"image": ["red.png"], "text": ["x"]}).save_to_disk(str(tmp_path / "paths"))
    assert error_of("--dataset_name", tmp_path / "paths") == (
        f"{tmp_path / 'paths'}, row 0: 'image' is a str, not an image (the column needs the datasets Image feature).")
    datasets.DatasetDict({"test": datasets.load_from_disk(str(saved))}).save_to_disk(str(tmp_path / "no-train"))
    assert error_of("--dataset_name", tmp_path / "no-train") == (
        f"--dataset_name {tmp_path / 'no-train'}: no 'train' split (its splits: test).")
    (tmp_path / "empty").mkdir()
    assert error_of("--dataset_name", tmp_path / "empty").startswith(
        f"--dataset_name {tmp_path / 'empty'}: cannot load it")

    for flags in ([], ["--train_data_dir", folder, "--dataset_name", saved]):
        with pytest.raises(training.TrainingError, match="Give the training data: --train_data_dir"):
            _args(*flags)
    # at start-up: before the model (here a path that does not exist) loads
    with pytest.raises(training.TrainingError, match="has no such column"):
        t2i.main(_args("--dataset_name", saved, output=tmp_path / "out"))


def _common(model, output, steps, *flags):
    return ["--pretrained_model_name_or_path", str(model), "--output_dir", str(output), "--resolution", "32",
            "--train_batch_size", "2", "--max_train_steps", str(steps), "--lr_warmup_steps", "0", "--seed", "0",
            "--num_inference_steps", "2", "--report_to", "none", *[str(f) for f in flags]]


def test_folder_run_end_to_end(tiny_pipeline_dir, tmp_path):
    """Two processes under DDP (torchrun), bf16, text encoder, noise offset, Min-SNR, validation: the processes
    stay in step, and the file loads and changes the pipeline. Then bad data stops a run at start-up, naming
    the file and line."""
    folder, output = _folder(tmp_path), tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(_driver(tmp_path, SCRIPT))]
    result = run(command + _common(
        tiny_pipeline_dir, output, 2, "--train_data_dir", folder, "--mixed_precision", "bf16", "--train_text_encoder",
        "--noise_offset", "0.1", "--snr_gamma", "5", "--validation_prompt", "a red square",
        "--num_validation_images", "1", "--center_crop"), env=_env(ACCELERATE_USE_CPU="1"))
    assert "Num processes: 2" in result.stdout + result.stderr
    steps = _steps(result)
    per_rank = {rank: [total for r, _, total in steps if r == rank] for rank in ("0", "1")}
    assert len(per_rank["0"]) == 2 and per_rank["0"] == per_rank["1"]
    assert {dtypes for _, dtypes, _ in steps} == {"torch.float32"}  # adapters in fp32 under bf16
    assert {k.split(".")[0] for k in load_weights(output)} == {"lie", "unet", "text_encoder"}
    card = (output / "README.md").read_text()
    assert f"trained on the images and captions of\n`{folder}`." in card and "dreambooth" not in card.lower()
    assert "`--train_data_dir`" in card and "`--instance_prompt`" not in card
    assert (output / "image_0.png").is_file()

    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(str(tiny_pipeline_dir), safety_checker=None)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 77, pipeline.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = pipeline.unet(latents, 10, text).sample
        load_lie_weights(pipeline, output)
        assert (pipeline.unet(latents, 10, text).sample - before).abs().max() > 1e-6

    (folder / "metadata.jsonl").write_text('{"file_name": "red.png", "text": "a red square"}\n{"file_name": \n')
    with pytest.raises(training.TrainingError, match=re.escape(f"{folder / 'metadata.jsonl'}, line 2: not valid JSON")):
        t2i.main(t2i.parse_args(_common(tiny_pipeline_dir, output, 2, "--train_data_dir", folder)))


def test_dataset_run_resumes_exactly(tiny_pipeline_dir, tmp_path, record_batches):
    """A saved data set with a list of captions, random crops and flips, noise offset, dropout: N steps
    straight == N/2, then resume, mid-epoch; each image trains with (one of) its own caption(s)."""
    saved = _saved_dataset(tmp_path)
    flags = ["--dataset_name", saved, "--image_column", "picture", "--caption_column", "caption", "--random_flip",
             "--noise_offset", "0.05", "--adapter_dropout", "0.1", "--train_text_encoder", "--checkpointing_steps", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    t2i.main(t2i.parse_args(_common(tiny_pipeline_dir, straight, 4, *flags)))
    straight_batches = record_batches[:4]
    for batch in straight_batches:
        for colour, prompt in batch:
            assert prompt in CAPTIONS[colour], (colour, prompt)
    # 3 images, batch 2: 2 batches an epoch, so step 3 opens the second epoch
    assert checkpoints(straight) == ["checkpoint-2", "checkpoint-4"]

    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    del record_batches[:]
    t2i.main(t2i.parse_args(_common(tiny_pipeline_dir, resumed, 4, *flags, "--resume_from_checkpoint", "latest")))
    assert record_batches[:2] == straight_batches[2:]
    a, b = load_weights(straight), load_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], load_weights(straight / "checkpoint-2")[k]) for k in a)
    assert re.search(r"lie\.unet\.", " ".join(a))


def test_sdxl_variant_trains_both_text_encoders_on_the_captions(tiny_sdxl_pipeline_dir, tmp_path, record_batches):
    t2i_sdxl = _load(REPO / "train_scripts" / "train_text_to_image_lie_sdxl.py")
    saved, output = _saved_dataset(tmp_path), tmp_path / "out"
    args = t2i_sdxl.parse_args(_common(tiny_sdxl_pipeline_dir, output, 2, "--dataset_name", saved, "--image_column",
                                       "picture", "--caption_column", "caption", "--train_text_encoder",
                                       "--noise_offset", "0.05"))
    assert (args.task, args.pretrained_vae_model_name_or_path) == ("text-to-image", None)
    t2i_sdxl.main(args)
    assert len(record_batches) == 2
    assert all(prompt in CAPTIONS[colour] for batch in record_batches for colour, prompt in batch)
    assert {k.split(".")[0] for k in load_weights(output)} == {"lie", "unet", "text_encoder", "text_encoder_2"}
    assert "# Lie text-to-image (Stable Diffusion XL)" in (output / "README.md").read_text()


def test_noise_offset_adds_one_constant_per_image_and_channel():
    """--noise_offset s: the Gaussian noise plus s times a standard normal per (image, channel), as in diffusers."""
    from types import SimpleNamespace

    latents = torch.zeros(64, 4, 8, 8)
    torch.manual_seed(0)
    plain = training.training_noise(SimpleNamespace(noise_offset=0.0), latents)
    torch.manual_seed(0)
    offset = training.training_noise(SimpleNamespace(noise_offset=0.5), latents)
    assert plain.shape == latents.shape
    difference = offset - plain  # the same Gaussian draw first, then the offsets
    per_channel = difference[:, :, :1, :1]
    torch.testing.assert_close(difference, per_channel.expand_as(difference), rtol=0, atol=1e-6)  # (a + c) - a
    assert 0.4 < per_channel.std().item() < 0.6 and abs(per_channel.mean().item()) < 0.1
