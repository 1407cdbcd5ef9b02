"""Shared fixtures: tiny pipelines built offline once per test session."""

import pytest
import torch

from lie_diffusion.tiny import build_tiny_pipeline

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
