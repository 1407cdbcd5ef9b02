"""Shared fixtures: tiny pipelines built offline once per test session."""

from pathlib import Path

import pytest
import torch

from lie_diffusion.tiny import build_tiny_pipeline
from lie_diffusion.training import load_script

REPO = Path(__file__).resolve().parents[1]

# Tiny tensors: a second thread only adds synchronisation (2-3x slower on a 2-core machine).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A saved tiny SD1-layout StableDiffusionPipeline folder (read-only: copy it before changing it)."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd1"), kind="sd1")


@pytest.fixture(scope="session")
def tiny_sd2_pipeline_dir(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd2"), kind="sd2")


@pytest.fixture(scope="session")
def tiny_sdxl_pipeline_dir(tmp_path_factory):
    """A saved tiny StableDiffusionXLPipeline folder: two text encoders, two tokenizers (read-only)."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sdxl"), kind="sdxl")


# Three steps of the real Flux pretraining script on 4 emoji: a tiny emoji FluxPipeline folder in seconds.
FLUX_PRETRAINING = ["--num_classes", "4", "--train_steps", "3", "--train_batch_size", "2", "--save_every", "2",
                    "--log_every", "1", "--seed", "5", "--warmup_steps", "1"]


@pytest.fixture(scope="session")
def pretrain_tiny_flux():
    """`pretrain(output_dir, *flags)`: the short run of train_scripts/pretrain_tiny_emoji_flux.py, its log beside the
    folder (output_dir.log); flags are added to (or override) FLUX_PRETRAINING."""
    script = load_script(REPO / "train_scripts" / "pretrain_tiny_emoji_flux.py")

    def pretrain(output_dir: Path, *flags: str) -> Path:
        script.main(["--output_dir", str(output_dir), "--log_file", f"{output_dir}.log", *FLUX_PRETRAINING, *flags])
        return output_dir

    return pretrain


@pytest.fixture(scope="session")
def tiny_emoji_flux_dir(tmp_path_factory, pretrain_tiny_flux):
    """A tiny emoji FluxPipeline folder (read-only: copy it before changing it), with its emoji_classes.json."""
    return pretrain_tiny_flux(tmp_path_factory.mktemp("flux") / "a")
