"""Pipeline API: the community pipeline folder, the loader mixin, and diffusers' own LoRA controls on Lie adapters."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from diffusers.utils import dynamic_modules_utils
from peft.tuners.lora import LoraLayer
from test_io import TOL, make_adapter, max_diff, outputs, tiny_pipeline

from lie_diffusion import LieConfig, load_lie_weights

REPO = Path(__file__).resolve().parents[1]
COMMUNITY_PIPELINE = REPO / "pipelines" / "lie_stable_diffusion"
CONV = "down_blocks.0.resnets.0.conv1"
TE_LINEAR = "encoder.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two adapter files: Lie convs + LoRA attention + Lie (taylor) text encoder, and a second, unet-only one."""
    root = tmp_path_factory.mktemp("pipeline-adapters")
    pipe_a, path_a = make_adapter(
        root / "a",
        unet_config=LieConfig(rank=4, alpha=2),
        text_encoder_config=LieConfig(rank=2, attn_adapter="lie", mode="taylor"),
        seed=1,
    )
    pipe_b, path_b = make_adapter(root / "b", unet_config=LieConfig(rank=2), seed=2)
    return SimpleNamespace(
        a=path_a, b=path_b, a_out=outputs(pipe_a), b_out=outputs(pipe_b), base_out=outputs(tiny_pipeline())
    )


@pytest.fixture(scope="module")
def mixin():
    sys.path.insert(0, str(REPO))  # the pipelines/ folder is used from a checkout
    try:
        from pipelines import LieLoaderMixin
    finally:
        sys.path.remove(str(REPO))
    return LieLoaderMixin


def weights(pipe):
    return {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if "lora_" not in n}


def max_change(before, after):
    return max((after[n] - w).abs().max().item() for n, w in before.items())


def test_community_pipeline_from_pretrained(tiny_pipeline_dir, adapters, tmp_path, monkeypatch):
    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    pipe = DiffusionPipeline.from_pretrained(
        tiny_pipeline_dir, custom_pipeline=str(COMMUNITY_PIPELINE), trust_remote_code=True
    )
    assert type(pipe).__name__ == "LieStableDiffusionPipeline" and isinstance(pipe, StableDiffusionPipeline)
    pipe.load_lie_weights(adapters.a.parent)
    assert max_diff(outputs(pipe), adapters.a_out) <= TOL


def test_mixin_load_scale_fuse_unfuse_unload(mixin, adapters):
    class Pipeline(mixin, StableDiffusionPipeline):
        pass

    pipe = Pipeline(**tiny_pipeline().components)
    pipe.load_lie_weights(adapters.a)
    pipe.load_lie_weights(adapters.b)
    assert pipe.get_list_adapters() == {"unet": ["default", "default_1"], "text_encoder": ["default"]}
    pipe.set_adapters(["default"])
    assert max_diff(outputs(pipe), adapters.a_out) <= TOL

    pipe.set_lie_scale(0.0, "default")  # strength only: the active set stays ["default"]
    assert pipe.unet.get_submodule(CONV).active_adapters == ["default"]
    assert max_diff(outputs(pipe), adapters.base_out) <= TOL
    pipe.set_lie_scale(1.0)
    with pytest.raises(ValueError, match=r"No adapter named \['nope'\]"):
        pipe.set_lie_scale(1.0, ["nope"])

    before = weights(pipe)
    pipe.fuse_lie()
    assert pipe.unet.get_submodule(CONV).merged and pipe.text_encoder.get_submodule(TE_LINEAR).merged
    assert max_diff(outputs(pipe), adapters.a_out) <= TOL
    with pytest.raises(ValueError, match="unfuse_lie"):
        pipe.set_lie_scale(0.5)
    pipe.unfuse_lie()
    assert max_change(before, weights(pipe)) <= 1e-6

    pipe.fuse_lie()
    pipe.unload_lie_weights()  # fused effect stays, adapter layers go
    assert not any(isinstance(m, LoraLayer) for c in (pipe.unet, pipe.text_encoder) for m in c.modules())
    assert max_diff(outputs(pipe), adapters.a_out) <= TOL


def test_diffusers_lora_controls_act_on_lie_adapters(adapters):
    pipe = tiny_pipeline()
    load_lie_weights(pipe, adapters.a, adapter_name="a")
    load_lie_weights(pipe, adapters.b, adapter_name="b")

    pipe.set_adapters(["a", "b"], [1.0, 0.0])
    assert max_diff(outputs(pipe), adapters.a_out) <= TOL
    pipe.set_adapters("b")
    assert max_diff(outputs(pipe), adapters.b_out) <= TOL
    pipe.disable_lora()
    assert max_diff(outputs(pipe), adapters.base_out) == 0
    pipe.enable_lora()
    pipe.set_adapters(["a"])

    before = weights(pipe)
    pipe.fuse_lora(components=["unet", "text_encoder"])
    assert pipe.unet.get_submodule(CONV).merged_adapters == ["a"]
    assert max_diff(outputs(pipe), adapters.a_out) <= TOL
    pipe.unfuse_lora(components=["unet", "text_encoder"])
    assert not pipe.unet.get_submodule(CONV).merged
    assert max_change(before, weights(pipe)) <= 1e-6

    pipe.delete_adapters("b")
    assert pipe.get_list_adapters() == {"unet": ["a"], "text_encoder": ["a"]}
    pipe.fuse_lora(components=["unet", "text_encoder"])
    pipe.unload_lora_weights()
    assert not any(isinstance(m, LoraLayer) for c in (pipe.unet, pipe.text_encoder) for m in c.modules())
    assert max_diff(outputs(pipe), adapters.a_out) <= TOL
