"""SDXL end to end, in process: adapter files through whole StableDiffusionXLPipelines (UNet and both text
encoders), stock diffusers' reading of the LoRA part, `lie-diffusion merge | inspect`, and the SDXL pipeline class
from the installed package and as a community pipeline."""

import copy
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline
from diffusers.training_utils import cast_training_params
from diffusers.utils import dynamic_modules_utils
from peft.tuners.lora import LoraLayer
from test_io import randomize_adapters

from lie_diffusion import LieConfig, add_lie_adapters, load_lie_weights, read_lie_file, save_lie_weights
from lie_diffusion.cli import describe
from lie_diffusion.cli import main as cli_main
from lie_diffusion.layers import LieLayerMixin
from lie_diffusion.pipelines import LieLoaderMixin, LieStableDiffusionXLPipeline

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4
# Text encoders get LoRA with alpha != rank, each its own: a wrong alpha in any section shows in the outputs.
CONFIGS = {
    "unet": LieConfig(rank=4, alpha=2, balance="none"),  # Lie on convs, LoRA on attention; alphas as written
    "text_encoder": LieConfig(rank=2, alpha=4),
    "text_encoder_2": LieConfig(rank=2, alpha=1),
}


def adapt(pipe, seed=0):
    """Random adapters on the UNet and both text encoders, fp32 whatever the pipeline's dtype (as in training)."""
    models = {name: getattr(pipe, name) for name in CONFIGS}
    for offset, (name, model) in enumerate(models.items()):
        add_lie_adapters(model, CONFIGS[name])
        randomize_adapters(model, seed + offset)
    cast_training_params(list(models.values()), dtype=torch.float32)
    return models


@torch.no_grad()
def latents(pipe):
    """The denoised latents of a fixed prompt and seed (2 steps, classifier-free guidance): every model counts."""
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe("sks toy", num_inference_steps=2, generator=generator, output_type="latent").images.float()


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def adapted(tiny_sdxl_pipeline_dir, tmp_path_factory):
    """An fp32 SDXL pipeline with adapters on all three models, its file, and its and the base's latents."""
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_pipeline_dir)
    base_latents = latents(base)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_pipeline_dir)
    path = save_lie_weights(tmp_path_factory.mktemp("sdxl-adapter"), **adapt(pipe))
    return pipe, path, latents(pipe), base_latents


def test_file_has_all_sdxl_sections(adapted):
    _, path, adapted_latents, base_latents = adapted
    parsed = read_lie_file(path)
    assert parsed.components == ["unet", "text_encoder", "text_encoder_2"]
    assert {m.component for m in parsed.section("lie")} == {"unet"}
    alphas = {(m.component, m.section): m.alpha for m in parsed.modules}
    assert alphas == {("unet", "lie"): 2.0, ("unet", "lora"): 2.0, ("text_encoder", "lora"): 4.0,
                      ("text_encoder_2", "lora"): 1.0}
    assert max_diff(adapted_latents, base_latents) > 1e-3  # the adapters act


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_save_then_load_into_fresh_pipeline_reproduces_images(tiny_sdxl_pipeline_dir, tmp_path, dtype):
    trained = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_pipeline_dir, torch_dtype=dtype)
    path = save_lie_weights(tmp_path, **adapt(trained, seed=5))
    fresh = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_pipeline_dir, torch_dtype=dtype)
    load_lie_weights(fresh, path)
    assert all(any(isinstance(m, LieLayerMixin) or isinstance(m, LoraLayer) for m in getattr(fresh, c).modules())
               for c in CONFIGS)
    assert max_diff(latents(fresh), latents(trained)) <= TOL


def test_each_text_encoder_adapter_counts(adapted):
    """Switching off either text encoder's adapter changes the images: both sections are live, none ignored."""
    pipe, _, adapted_latents, _ = adapted
    for component in ("text_encoder", "text_encoder_2"):
        without = copy.deepcopy(pipe)
        with torch.no_grad():
            for name, param in getattr(without, component).named_parameters():
                if ".lora_B." in name:
                    param.zero_()
        assert max_diff(latents(without), adapted_latents) > 1e-4, component


def test_stock_load_lora_weights_reads_the_lora_part_with_its_alphas(tiny_sdxl_pipeline_dir, adapted):
    pipe, path, adapted_latents, _ = adapted
    stock = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_pipeline_dir)
    stock.load_lora_weights(path.parent)
    for component, config in CONFIGS.items():
        layers = [m for m in getattr(stock, component).modules() if isinstance(m, LoraLayer)]
        assert layers and all(isinstance(m.get_base_layer(), torch.nn.Linear) for m in layers), component
        assert {m.scaling["default_0"] for m in layers} == {config.attn_rank_alpha[1] / config.attn_rank_alpha[0]}

    attention_only = copy.deepcopy(pipe)  # the saved model with its Lie part switched to the identity
    with torch.no_grad():
        for module in attention_only.unet.modules():
            if isinstance(module, LieLayerMixin):
                module.lora_B["default"].weight.zero_()
    assert max_diff(latents(stock), latents(attention_only)) <= TOL
    assert max_diff(latents(stock), adapted_latents) > 1e-3  # the Lie section was not misread as LoRA


def test_merge_writes_a_stock_sdxl_folder(tiny_sdxl_pipeline_dir, adapted, tmp_path):
    _, path, adapted_latents, _ = adapted
    output = tmp_path / "merged"
    assert cli_main(["merge", "--base", str(tiny_sdxl_pipeline_dir), "--weights", str(path),
                     "--output", str(output)]) == 0
    merged = DiffusionPipeline.from_pretrained(output)
    assert type(merged) is StableDiffusionXLPipeline
    assert not any(isinstance(m, LoraLayer) for c in CONFIGS for m in getattr(merged, c).modules())
    assert max_diff(latents(merged), adapted_latents) <= TOL


def test_inspect_describes_an_sdxl_file(adapted):
    text = describe(read_lie_file(adapted[1]))
    assert "SDXL" in text
    lora_line = next(line for line in text.splitlines() if line.strip().startswith("LoRA"))
    assert "text_encoder 8, text_encoder_2 8" in lora_line and "keys unet.*, text_encoder.*, text_encoder_2.*" in lora_line
    assert "lie.unet.*" in text


def test_sdxl_pipeline_class_from_the_package_and_as_community_pipeline(
    tiny_sdxl_pipeline_dir, adapted, tmp_path, monkeypatch
):
    _, path, adapted_latents, base_latents = adapted
    assert issubclass(LieStableDiffusionXLPipeline, LieLoaderMixin)
    pipe = LieStableDiffusionXLPipeline.from_pretrained(tiny_sdxl_pipeline_dir)
    pipe.load_lie_weights(path)
    assert max_diff(latents(pipe), adapted_latents) <= TOL
    pipe.fuse_lie()
    assert max_diff(latents(pipe), adapted_latents) <= TOL
    pipe.unfuse_lie()
    pipe.set_lie_scale(0.0)
    assert max_diff(latents(pipe), base_latents) <= TOL

    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    community = DiffusionPipeline.from_pretrained(
        tiny_sdxl_pipeline_dir, custom_pipeline=str(REPO / "pipelines" / "lie_stable_diffusion_xl"),
        trust_remote_code=True,
    )
    assert type(community).__name__ == "LieStableDiffusionXLPipeline"
    assert isinstance(community, StableDiffusionXLPipeline)
    community.load_lie_weights(path.parent)
    assert max_diff(latents(community), adapted_latents) <= TOL
