"""End-to-end tests of train_scripts/train_dreambooth_lie_sdxl.py on the tiny SDXL pipeline: real
`accelerate launch` / `torchrun` runs of a few steps, each checking several things (every start costs
seconds of imports), plus in-process checks of the SDXL-only flags."""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from test_train import _common, _driver, _env, _steps, checkpoints, load_weights, make_instance_images, run

from lie_diffusion import load_lie_weights, read_lie_file

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_scripts" / "train_dreambooth_lie_sdxl.py"

_spec = importlib.util.spec_from_file_location("train_dreambooth_lie_sdxl", SCRIPT)
train_sdxl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_sdxl)


def _accelerate(mixed_precision="no"):
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
            "--mixed_precision", mixed_precision, "--dynamo_backend", "no", str(SCRIPT)]


def _optimizers(result):
    """The optimizer class of each step the driver reported."""
    return re.findall(r"STEP rank=\d+ optimizer=(\w+)", result.stderr)


@pytest.fixture(scope="module")
def toy_images(tmp_path_factory):
    directory = tmp_path_factory.mktemp("toy-sdxl")
    make_instance_images(directory, count=2, size=48)
    return directory


def test_sdxl_flags_and_their_errors(tmp_path):
    base = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--instance_prompt", "p",
            "--output_dir", str(tmp_path)]
    args = train_sdxl.parse_args(base)
    assert (args.resolution, args.optimizer, args.pretrained_vae_model_name_or_path) == (1024, "AdamW", None)
    assert args.output_dir == str(tmp_path) and args.prodigy_safeguard_warmup is True
    args = train_sdxl.parse_args(base + ["--optimizer", "prodigy", "--prodigy_decouple", "False",
                                         "--crops_coords_top_left_h", "0", "--crops_coords_top_left_w", "0"])
    assert args.prodigy_decouple is False and (args.crops_coords_top_left_h, args.crops_coords_top_left_w) == (0, 0)
    cases = [
        (["--crops_coords_top_left_h", "0"], "--crops_coords_top_left_h and --crops_coords_top_left_w go together"),
        (["--do_edm_style_training", "--snr_gamma", "5"], "--snr_gamma does not apply to --do_edm_style_training"),
        (["--use_8bit_adam", "--optimizer", "prodigy"], "--use_8bit_adam goes with --optimizer AdamW"),
        (["--train_text_encoder", "--attn_adapter", "none"], "--train_text_encoder needs text encoder adapters"),
    ]
    for flags, message in cases:
        with pytest.raises(train_sdxl.TrainingError, match=re.escape(message)):
            train_sdxl.parse_args(base + flags)


def test_sd1_model_is_refused_in_one_line(tiny_pipeline_dir, tiny_sdxl_pipeline_dir, tmp_path):
    def args_for(model):
        return train_sdxl.parse_args(["--pretrained_model_name_or_path", str(model), "--instance_data_dir", "d",
                                      "--instance_prompt", "p"])

    train_sdxl.check_sdxl_model(args_for(tiny_sdxl_pipeline_dir))
    with pytest.raises(train_sdxl.TrainingError, match="is not an SDXL pipeline"):
        train_sdxl.check_sdxl_model(args_for(tiny_pipeline_dir))
    with pytest.raises(train_sdxl.TrainingError, match="cannot read the pipeline"):
        train_sdxl.check_sdxl_model(args_for(tmp_path / "missing"))


def test_accelerate_bf16_run_then_resume_matches_straight_run(tiny_sdxl_pipeline_dir, toy_images, tmp_path):
    """bf16 + both text encoders + gradient checkpointing + prior preservation + validation + fixed crop
    conditioning; then a run resumed from `latest` (mid-epoch) ends with the straight run's exact weights."""
    straight, resumed, class_dir = tmp_path / "straight", tmp_path / "resumed", tmp_path / "class"
    flags = ["--train_text_encoder", "--gradient_checkpointing", "--with_prior_preservation",
             "--class_data_dir", str(class_dir), "--class_prompt", "a photo of toy", "--num_class_images", "2",
             "--checkpointing_steps", "1", "--checkpoints_total_limit", "2", "--random_flip",
             "--adapter_dropout", "0.1", "--crops_coords_top_left_h", "0", "--crops_coords_top_left_w", "0"]
    # 2 images, batch 1: epochs are 2 steps; validation after step 2; checkpoint-3 is mid-epoch.
    command = _accelerate("bf16")
    command[-1] = str(_driver(tmp_path, SCRIPT))
    validation = ["--validation_prompt", "sks toy", "--num_validation_images", "1", "--validation_epochs", "1"]
    result = run(command + _common(tiny_sdxl_pipeline_dir, toy_images, straight, 4) + flags + validation)
    assert [dtypes for _, dtypes, _ in _steps(result)] == ["torch.float32"] * 4  # fp32 adapters under bf16
    assert _optimizers(result) == ["AdamW"] * 4
    assert checkpoints(straight) == ["checkpoint-3", "checkpoint-4"]
    assert len(list(class_dir.glob("*.jpg"))) == 2

    weights = load_weights(straight)
    assert {k.split(".")[0] for k in weights} == {"lie", "unet", "text_encoder", "text_encoder_2"}
    assert {t.dtype for t in weights.values()} == {torch.float32}
    parsed = read_lie_file(straight)
    assert parsed.components == ["unet", "text_encoder", "text_encoder_2"]
    card = (straight / "README.md").read_text()
    assert "StableDiffusionXLPipeline" in card and "stable-diffusion-xl" in card and "text_encoder_2" in card
    assert sorted(p.name for p in (straight / "validation").glob("*.png")) == [
        "test-step-000004.png", "validation-step-000002.png"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((straight / "logs").rglob("events.out.tfevents.*")).parent)).Reload()
    assert {"loss", "lr", "lr_text_encoder"} <= set(events.Tags()["scalars"])
    assert "validation" in events.Tags()["images"]

    # The file in a fresh bf16 StableDiffusionXLPipeline gives the script's own test image again.
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_pipeline_dir, torch_dtype=torch.bfloat16)
    base_image = _test_image(pipeline)
    load_lie_weights(pipeline, straight)
    image = _test_image(pipeline)
    assert np.array_equal(image, np.asarray(Image.open(straight / "image_0.png")))
    assert np.abs(image.astype(int) - base_image.astype(int)).max() > 0  # the trained adapters act

    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    # Without validation: it draws no training randomness, so the weights must still match exactly.
    result = run(_accelerate("bf16") + _common(tiny_sdxl_pipeline_dir, toy_images, resumed, 4) + flags
                 + ["--resume_from_checkpoint", "latest"])
    assert f"Resuming from checkpoint {resumed / 'checkpoint-3'}" in result.stdout + result.stderr
    a, b = load_weights(straight), load_weights(resumed)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    assert max((a[k] - load_weights(straight / "checkpoint-3")[k]).abs().max().item() for k in a) > 0


def _test_image(pipeline):
    """The script's final test image, made again: DPM-Solver++, 2 steps, seed 0, under bf16 autocast."""
    from diffusers import DPMSolverMultistepScheduler

    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        image = pipeline("sks toy", num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(0),
                         crops_coords_top_left=(0, 0)).images[0]
    return np.asarray(image)


def test_torchrun_two_process_ddp_edm_prodigy(tiny_sdxl_pipeline_dir, toy_images, tmp_path):
    """DDP on 2 CPU processes with both text encoders, EDM-style training and Prodigy: ranks stay in step.
    (Class images under DDP and the NaN stop are the shared code of lie_diffusion.training: test_train.py.)"""
    output = tmp_path / "out"
    flags = ["--train_text_encoder", "--do_edm_style_training", "--optimizer", "prodigy", "--learning_rate", "1.0",
             "--checkpointing_steps", "2", "--report_to", "none"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(_driver(tmp_path, SCRIPT))]
    result = run(command + _common(tiny_sdxl_pipeline_dir, toy_images, output, 2) + flags,
                 env=_env(ACCELERATE_USE_CPU="1"))
    assert "Num processes: 2" in result.stdout + result.stderr
    steps = _steps(result)
    per_rank = {rank: [total for r, _, total in steps if r == rank] for rank in ("0", "1")}
    assert len(per_rank["0"]) == 2 and per_rank["0"] == per_rank["1"]
    assert set(_optimizers(result)) == {"Prodigy"}
    assert checkpoints(output) == ["checkpoint-2"]
    assert {"random_states_0.safetensors", "random_states_1.safetensors"} <= {p.name for p in (output / "checkpoint-2").iterdir()}
    assert {k.split(".")[0] for k in load_weights(output)} == {"lie", "unet", "text_encoder", "text_encoder_2"}
