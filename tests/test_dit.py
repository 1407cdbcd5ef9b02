"""Lie adapters on diffusion transformers: tiny Flux.1, SD3 and SD3.5 built from diffusers' real classes."""

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import (DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline,
                       StableDiffusionPipeline)
from diffusers.utils import dynamic_modules_utils
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from torch import nn

from lie_diffusion import LieConfig, add_lie_adapters, cli, load_lie_weights, read_lie_file, save_lie_weights
from lie_diffusion.functional import BALANCE_MIN_RMS
from lie_diffusion.inject import PRESETS, find_targets, remove_adapter
from lie_diffusion.pipelines import LieFluxPipeline, LieStableDiffusion3Pipeline
from lie_diffusion.tiny import build_tiny_pipeline, tiny_t5_encoder, tiny_text_encoder, tiny_transformer

pytestmark = pytest.mark.filterwarnings(
    "ignore:Already found a `peft_config`", "ignore:Already following adapters", "ignore:All adapters are already",
    "ignore:Already unmerged"
)
REPO = Path(__file__).resolve().parents[1]

JOINT_ATTN = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
              "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
FF = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
MODULATION = ["norm1.linear", "norm1_context.linear"]
SINGLE = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear"]
# The last SD3 block is context-pre-only: no context output projection, no context feed-forward.
LAST_SD3_ATTN = [n for n in JOINT_ATTN if n != "attn.to_add_out"]
LAST_SD3_LINEAR = LAST_SD3_ATTN + ["ff.net.0.proj", "ff.net.2"] + MODULATION
ATTN2 = ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]
FLUX_OUTER = ["x_embedder", "context_embedder", "norm_out.linear", "proj_out"] + [
    f"time_text_embed.{e}.linear_{i}" for e in ("timestep_embedder", "guidance_embedder", "text_embedder")
    for i in (1, 2)]
SD3_OUTER = ["context_embedder", "norm_out.linear", "proj_out"] + [
    f"time_text_embed.{e}.linear_{i}" for e in ("timestep_embedder", "text_embedder") for i in (1, 2)]


def _in(block: str, names: list[str]) -> list[str]:
    return [f"{block}.{n}" for n in names]


# What each preset must select on the tiny models (1 double + 2 single Flux blocks; 2 SD3 blocks, the SD3.5 one
# with attn2 in block 0), written out by hand from the model classes' module names.
EXPECTED = {
    # "attn.to_q" (peft's suffix match in diffusers' script) also selects the single blocks' q, k, v
    ("flux", "flux"): ([], _in("transformer_blocks.0", JOINT_ATTN + FF) + _in("single_transformer_blocks.0", SINGLE[:3])
                       + _in("single_transformer_blocks.1", SINGLE[:3])),
    ("flux", "flux-attn"): ([], _in("transformer_blocks.0", JOINT_ATTN) + _in("single_transformer_blocks.0", SINGLE[:3])
                            + _in("single_transformer_blocks.1", SINGLE[:3])),
    ("flux", "flux-all-linear"): ([], _in("transformer_blocks.0", JOINT_ATTN + FF + MODULATION)
                                  + _in("single_transformer_blocks.0", SINGLE)
                                  + _in("single_transformer_blocks.1", SINGLE)),
    ("flux", "flux-all"): ([], _in("transformer_blocks.0", JOINT_ATTN + FF + MODULATION) + FLUX_OUTER
                           + _in("single_transformer_blocks.0", SINGLE) + _in("single_transformer_blocks.1", SINGLE)),
    ("sd3", "sd3"): ([], _in("transformer_blocks.0", JOINT_ATTN) + _in("transformer_blocks.1", LAST_SD3_ATTN)),
    ("sd3", "sd3-all-linear"): ([], _in("transformer_blocks.0", JOINT_ATTN + FF + MODULATION)
                                + _in("transformer_blocks.1", LAST_SD3_LINEAR)),
    ("sd3", "sd3-all"): (["pos_embed.proj"], _in("transformer_blocks.0", JOINT_ATTN + FF + MODULATION)
                         + _in("transformer_blocks.1", LAST_SD3_LINEAR) + SD3_OUTER),
    # diffusers' SD3 default targets "attn." only: SD3.5's attn2 is left out, as in its script
    ("sd3.5", "sd3"): ([], _in("transformer_blocks.0", JOINT_ATTN) + _in("transformer_blocks.1", LAST_SD3_ATTN)),
    ("sd3.5", "sd3-all-linear"): ([], _in("transformer_blocks.0", JOINT_ATTN + ATTN2 + FF + MODULATION)
                                  + _in("transformer_blocks.1", LAST_SD3_LINEAR)),
    ("sd3.5", "sd3-all"): (["pos_embed.proj"], _in("transformer_blocks.0", JOINT_ATTN + ATTN2 + FF + MODULATION)
                           + _in("transformer_blocks.1", LAST_SD3_LINEAR) + SD3_OUTER),
}


@pytest.fixture(scope="module")
def transformers():
    return {kind: tiny_transformer(kind) for kind in ("flux", "sd3", "sd3.5")}


@pytest.mark.parametrize("kind,preset", sorted(EXPECTED))
def test_preset_targets_on_the_real_classes(transformers, kind, preset):
    convs, linears = find_targets(transformers[kind], LieConfig(preset=preset))
    assert (sorted(convs), sorted(linears)) == tuple(sorted(x) for x in EXPECTED[kind, preset])


def test_every_family_preset_is_listed():
    assert {p for _, p in EXPECTED} == {name for name, p in PRESETS.items() if p.family in ("flux", "sd3")}


def test_all_presets_cover_every_linear_and_the_patch_conv(transformers):
    for kind, preset in (("flux", "flux-all"), ("sd3.5", "sd3-all")):
        model = transformers[kind]
        linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
        found = find_targets(model, LieConfig(preset=preset))
        assert (sorted(found[0]), sorted(found[1])) == (sorted(convs), sorted(linears))


def test_default_preset_is_the_family_one_with_lie_on_linear(transformers):
    for kind, preset in (("flux", "flux"), ("sd3", "sd3"), ("sd3.5", "sd3")):
        config = LieConfig().resolved(transformers[kind])
        assert (config.preset, config.attn_adapter) == (preset, "lie")
        default, named = LieConfig(), LieConfig(preset=preset)
        assert find_targets(transformers[kind], default) == find_targets(transformers[kind], named)
    subclass = type("MyFlux", (type(transformers["flux"]),), {})(**transformers["flux"].config)
    assert LieConfig().resolved(subclass).preset == "flux"  # a subclass of a known class is of its family
    # a CLIP text encoder keeps today's default (LoRA on its attention) and takes any preset's CLIP targets
    clip = tiny_text_encoder()
    assert LieConfig().resolved(clip).attn_adapter == "lora"
    expected = sorted(f"encoder.layers.{i}.self_attn.{p}" for i in range(2)
                      for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
    for preset in PRESETS:
        convs, linears = find_targets(clip, LieConfig(preset=preset))
        assert (convs, sorted(linears)) == ([], expected)


def test_t5_is_never_a_target():
    t5 = tiny_t5_encoder()
    for preset in PRESETS:
        assert find_targets(t5, LieConfig(preset=preset)) == ([], [])


def test_lora_option_and_clear_errors(transformers):
    config = LieConfig(preset="flux", attn_adapter="lora").resolved(transformers["flux"])
    assert config.attn_adapter == "lora" and config.attn_targets == PRESETS["flux"].attn_targets
    with pytest.raises(ValueError, match=r"preset 'sd3' is for sd3 models, not FluxTransformer2DModel.*flux-all"):
        find_targets(transformers["flux"], LieConfig(preset="sd3"))
    with pytest.raises(ValueError, match=r"preset 'flux' is for flux models, not SD3Transformer2DModel"):
        find_targets(transformers["sd3.5"], LieConfig(preset="flux"))
    with pytest.raises(ValueError, match="LieConfig.preset must be one of"):
        LieConfig(preset="flux-dev")


# ------------------------------------------------------------------------------------------------ files


@pytest.fixture(scope="module")
def pipeline_dirs(tmp_path_factory):
    return {kind: build_tiny_pipeline(tmp_path_factory.mktemp(kind), kind) for kind in ("flux", "sd3", "sd3.5")}


def load_pipeline(directory):
    return DiffusionPipeline.from_pretrained(str(directory))


def render(pipe) -> torch.Tensor:
    kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="pt", max_sequence_length=16)
    return pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images


def trained(model, adapter_name="default", std=0.3, seed=1):
    """Factors as after training: lora_B no longer zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f"lora_B.{adapter_name}." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model


def adapted_pipeline(directory, preset, attn_adapter=None, text_adapter="lora", rank=2, attn_alpha=None):
    pipe = load_pipeline(directory)
    trained(add_lie_adapters(pipe.transformer, LieConfig(preset=preset, rank=rank, attn_adapter=attn_adapter,
                                                         attn_alpha=attn_alpha)))
    if text_adapter:
        trained(add_lie_adapters(pipe.text_encoder, LieConfig(rank=rank, attn_adapter=text_adapter)), seed=2)
    return pipe


def save(pipe, directory) -> Path:
    return save_lie_weights(directory, transformer=pipe.transformer,
                            text_encoder=pipe.text_encoder if getattr(pipe.text_encoder, "peft_config", None) else None)


# The Flux loader's converter triggers and norm-key routing (diffusers 0.42 FluxLoraLoaderMixin).
FLUX_LOADER_TRIGGERS = (".lora_down.weight", "processor", "query_norm.scale", "base_model", "alpha",
                        "norm_q", "norm_k", "norm_added_q", "norm_added_k")


@pytest.mark.parametrize("kind,preset", [("flux", "flux-all"), ("sd3.5", "sd3-all")])
@pytest.mark.parametrize("attn_adapter", ["lie", "lora"])
def test_keys_never_trigger_the_stock_loaders_traps(pipeline_dirs, tmp_path, kind, preset, attn_adapter):
    pipe = adapted_pipeline(pipeline_dirs[kind], preset, attn_adapter)
    with safe_open(str(save(pipe, tmp_path)), "pt") as file:
        keys = list(file.keys())
    assert len(keys) == 2 * (len(find_targets(pipe.transformer, LieConfig(preset=preset))[0])
                             + len(find_targets(pipe.transformer, LieConfig(preset=preset))[1]) + 8)
    assert all("lora" in key for key in keys)  # the SD3 loader refuses any other key
    assert not [key for key in keys for trigger in FLUX_LOADER_TRIGGERS if trigger in key]
    lie = [key for key in keys if key.startswith("lie.")]
    assert all(key.startswith(("lie.transformer.", "transformer.", "text_encoder.")) for key in keys)
    convs = ["lie.transformer.pos_embed.proj.lora_A.weight", "lie.transformer.pos_embed.proj.lora_B.weight"]
    assert sorted(lie) == (sorted(convs) if kind == "sd3.5" else []) if attn_adapter == "lora" else len(lie) > 2


@pytest.mark.parametrize("kind,preset", [("flux", "flux-all-linear"), ("sd3.5", "sd3-all-linear")])
def test_stock_loader_applies_the_lora_part_with_its_alpha_and_ignores_the_lie_part(pipeline_dirs, tmp_path, kind,
                                                                                   preset):
    # LoRA on the transformer at alpha 3 × rank (only the metadata tells stock diffusers), Lie on CLIP
    ours = adapted_pipeline(pipeline_dirs[kind], preset, "lora", text_adapter="lie", attn_alpha=6.0)
    path = save(ours, tmp_path)
    stock = load_pipeline(pipeline_dirs[kind])
    stock.load_lora_weights(str(path))
    assert stock.get_list_adapters() == {"transformer": ["default_0"]}
    reference = load_pipeline(pipeline_dirs[kind])
    load_lie_weights(reference, path)
    remove_adapter(reference.text_encoder, "default")  # the Lie part, which stock diffusers must not apply
    torch.testing.assert_close(render(stock), render(reference), rtol=0, atol=1e-6)
    assert (render(stock) - render(load_pipeline(pipeline_dirs[kind]))).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_stock_loader_loads_nothing_from_a_lie_only_transformer_file(pipeline_dirs, tmp_path, kind):
    path = save(adapted_pipeline(pipeline_dirs[kind], None, text_adapter=None), tmp_path)
    assert read_lie_file(path).section("lora") == []
    stock = load_pipeline(pipeline_dirs[kind])
    stock.load_lora_weights(str(path))
    assert not any(stock.get_list_adapters().values())
    torch.testing.assert_close(render(stock), render(load_pipeline(pipeline_dirs[kind])), rtol=0, atol=0)


def test_files_refuse_another_model_family(pipeline_dirs, tiny_pipeline_dir, tmp_path):
    files = {kind: save(adapted_pipeline(pipeline_dirs[kind], None, text_adapter=None), tmp_path / kind)
             for kind in ("flux", "sd3")}
    unet = StableDiffusionPipeline.from_pretrained(str(tiny_pipeline_dir))
    add_lie_adapters(unet.unet, LieConfig(rank=2))
    files["sd1"] = save_lie_weights(tmp_path / "sd1", unet=unet.unet)
    targets = {"flux": load_pipeline(pipeline_dirs["flux"]), "sd3": load_pipeline(pipeline_dirs["sd3.5"]),
               "sd1": StableDiffusionPipeline.from_pretrained(str(tiny_pipeline_dir))}
    errors = {
        ("flux", "sd3"): r"saved for a FluxTransformer2DModel; this transformer is a SD3Transformer2DModel",
        ("sd3", "flux"): r"saved for a SD3Transformer2DModel; this transformer is a FluxTransformer2DModel",
        ("flux", "sd1"): r"holds adapters for \['transformer'\] but the target has only",
        ("sd1", "flux"): r"holds adapters for \['unet'\] but the target has only",
    }
    for (file_kind, model_kind), message in errors.items():
        target = targets[model_kind]
        with pytest.raises(ValueError, match=message):
            load_lie_weights(target, files[file_kind])
        assert not any(getattr(m, "peft_config", None) for m in target.components.values() if isinstance(m, nn.Module))
    with pytest.raises(ValueError, match=r"holds adapters for \['transformer'\] but the target has only \['unet'\]"):
        load_lie_weights(targets["sd1"].unet, files["flux"])  # a bare model is its family's component
    assert read_lie_file(files["sd3"]).info["fingerprint"]["transformer"]["_class_name"] == "SD3Transformer2DModel"


# ------------------------------------------------------------------------------------- pipelines and CLI


@pytest.fixture(scope="module")
def flux_files(pipeline_dirs, tmp_path_factory):
    """Two Flux adapter files (Lie transformer + LoRA CLIP; Lie on all linear) and what each renders."""
    root = tmp_path_factory.mktemp("flux-files")
    a = adapted_pipeline(pipeline_dirs["flux"], None)
    b = trained(add_lie_adapters(load_pipeline(pipeline_dirs["flux"]).transformer, LieConfig(preset="flux-all-linear",
                                                                                              rank=3)), seed=5)
    pipe_b = load_pipeline(pipeline_dirs["flux"])
    pipe_b.transformer = b
    return SimpleNamespace(a=save(a, root / "a"), b=save_lie_weights(root / "b", transformer=b), a_out=render(a),
                           b_out=render(pipe_b), base_out=render(load_pipeline(pipeline_dirs["flux"])))


def frozen_weights(pipe):
    return {f"{c}.{n}".replace(".base_layer", ""): p.detach().clone() for c in ("transformer", "text_encoder")
            for n, p in getattr(pipe, c).named_parameters() if "lora_" not in n}


def test_community_pipelines_load_lie_files(pipeline_dirs, flux_files, tmp_path, monkeypatch):
    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    # one after the other in one process: diffusers runs every local pipeline.py into one cached module
    for kind, folder, base in (("flux", "lie_flux", FluxPipeline), ("sd3.5", "lie_stable_diffusion_3",
                                                                     StableDiffusion3Pipeline),
                               ("flux", "lie_flux", FluxPipeline)):
        pipe = DiffusionPipeline.from_pretrained(pipeline_dirs[kind], custom_pipeline=str(REPO / "pipelines" / folder),
                                                 trust_remote_code=True)
        assert isinstance(pipe, base) and type(pipe).__name__ == f"Lie{base.__name__}"
    pipe.load_lie_weights(flux_files.a.parent)
    torch.testing.assert_close(render(pipe), flux_files.a_out, rtol=0, atol=1e-6)


def test_mixin_methods_and_diffusers_controls_on_flux(pipeline_dirs, flux_files, tmp_path):
    pipe = LieFluxPipeline(**load_pipeline(pipeline_dirs["flux"]).components)
    base = frozen_weights(pipe)
    pipe.load_lie_weights(flux_files.a)
    pipe.load_lie_weights(flux_files.b)
    assert pipe.get_list_adapters() == {"transformer": ["default", "default_1"], "text_encoder": ["default"]}
    pipe.set_adapters(["default", "default_1"], [1.0, 0.0])
    torch.testing.assert_close(render(pipe), flux_files.a_out, rtol=0, atol=1e-5)
    pipe.set_adapters("default_1")
    torch.testing.assert_close(render(pipe), flux_files.b_out, rtol=0, atol=1e-5)
    pipe.disable_lora()
    torch.testing.assert_close(render(pipe), flux_files.base_out, rtol=0, atol=0)
    pipe.enable_lora()

    # set_adapters(weights) is the strength: W ⊙ exp(0.5·sΔ), the same as loading at scale 0.5
    pipe.set_adapters(["default"], [0.5])
    half = LieFluxPipeline(**load_pipeline(pipeline_dirs["flux"]).components)
    half.load_lie_weights(flux_files.a, scale=0.5)
    torch.testing.assert_close(render(pipe), render(half), rtol=0, atol=1e-6)
    pipe.set_adapters(["default"])

    pipe.fuse_lora(components=["transformer", "text_encoder"])
    layer = pipe.transformer.get_submodule("transformer_blocks.0.attn.to_q")
    assert layer.merged_adapters == ["default"]
    torch.testing.assert_close(render(pipe), flux_files.a_out, rtol=0, atol=1e-5)
    pipe.unfuse_lora(components=["transformer", "text_encoder"])
    assert not layer.merged
    for name, weight in frozen_weights(pipe).items():
        torch.testing.assert_close(weight, base[name], rtol=0, atol=1e-6)

    saved = pipe.save_lie_weights(tmp_path, adapter_name="default")
    assert read_lie_file(saved).components == ["transformer", "text_encoder"]
    pipe.delete_adapters("default_1")
    assert pipe.get_list_adapters() == {"transformer": ["default"], "text_encoder": ["default"]}
    pipe.merge_lie_weights()
    assert not any(isinstance(m, LoraLayer) for c in (pipe.transformer, pipe.text_encoder) for m in c.modules())
    torch.testing.assert_close(render(pipe), flux_files.a_out, rtol=0, atol=1e-5)

    again = LieFluxPipeline(**load_pipeline(pipeline_dirs["flux"]).components)
    again.load_lie_weights(saved)
    torch.testing.assert_close(render(again), flux_files.a_out, rtol=0, atol=0)
    again.fuse_lie()
    again.unload_lora_weights()  # the fused effect stays, the adapter layers go
    assert not any(isinstance(m, LoraLayer) for m in again.transformer.modules())
    torch.testing.assert_close(render(again), flux_files.a_out, rtol=0, atol=1e-5)


def test_sd3_pipeline_save_load_fuse_merge(pipeline_dirs, tmp_path):
    ours = adapted_pipeline(pipeline_dirs["sd3.5"], "sd3-all")
    trained(add_lie_adapters(ours.text_encoder_2, LieConfig(rank=2)), seed=3)
    expected = render(ours)
    path = save_lie_weights(tmp_path, transformer=ours.transformer, text_encoder=ours.text_encoder,
                            text_encoder_2=ours.text_encoder_2)
    pipe = LieStableDiffusion3Pipeline(**load_pipeline(pipeline_dirs["sd3.5"]).components)
    pipe.load_lie_weights(path)
    assert pipe.get_list_adapters() == {c: ["default"] for c in ("transformer", "text_encoder", "text_encoder_2")}
    torch.testing.assert_close(render(pipe), expected, rtol=0, atol=0)
    pipe.fuse_lie()
    torch.testing.assert_close(render(pipe), expected, rtol=0, atol=1e-5)
    pipe.unfuse_lie()
    pipe.merge_lie_weights()
    assert type(pipe.transformer.pos_embed.proj) is nn.Conv2d and not hasattr(pipe.transformer, "peft_config")
    torch.testing.assert_close(render(pipe), expected, rtol=0, atol=1e-5)


def test_cli_merge_inspect_combine_on_flux_and_sd3(pipeline_dirs, flux_files, tmp_path, capsys):
    merged = tmp_path / "merged"
    assert cli.main(["merge", "--base", str(pipeline_dirs["flux"]), "--weights", str(flux_files.a),
                     "--output", str(merged)]) == 0
    pipe = load_pipeline(merged)
    assert isinstance(pipe, FluxPipeline)
    assert not any(isinstance(m, LoraLayer) for m in pipe.transformer.modules())
    torch.testing.assert_close(render(pipe), flux_files.a_out, rtol=0, atol=1e-5)

    capsys.readouterr()
    assert cli.main(["inspect", str(flux_files.a)]) == 0
    report = capsys.readouterr().out
    assert "Base FluxTransformer2DModel: attention_head_dim=16" in report and "lie.transformer.*" in report

    combined = tmp_path / "combined.safetensors"
    assert cli.main(["combine", str(flux_files.a), str(flux_files.b), "--weights", "1", "0.5",
                     "--output", str(combined)]) == 0
    both = LieFluxPipeline(**load_pipeline(pipeline_dirs["flux"]).components)
    both.load_lie_weights(flux_files.a, adapter_name="a")
    both.load_lie_weights(flux_files.b, adapter_name="b")
    both.set_adapters(["a", "b"], [1.0, 0.5])
    one = LieFluxPipeline(**load_pipeline(pipeline_dirs["flux"]).components)
    one.load_lie_weights(combined)
    torch.testing.assert_close(render(one), render(both), rtol=0, atol=1e-5)

    sd3 = save(adapted_pipeline(pipeline_dirs["sd3"], None, text_adapter=None), tmp_path / "sd3")
    capsys.readouterr()
    assert cli.main(["combine", str(flux_files.a), str(sd3), "--output", str(tmp_path / "mixed.safetensors")]) == 1
    assert "made for different base models" in capsys.readouterr().err
    assert cli.main(["merge", "--base", str(pipeline_dirs["sd3"]), "--weights", str(flux_files.a),
                     "--output", str(tmp_path / "wrong")]) == 1
    assert "saved for a FluxTransformer2DModel" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- math


def reference_weight(W, factors, mode="exp"):
    """W ⊙ exp(Σ sᵢ·BᵢAᵢ) (taylor: W ⊙ (1 + sBA)), written from the formula, in float64."""
    exponent = sum(s * (B.double().reshape(W.shape[0], -1) @ A.double().reshape(A.shape[0], -1)).reshape(W.shape)
                   for A, B, s in factors)
    return W.double() * (torch.exp(exponent) if mode == "exp" else 1 + exponent)


def layer_input(base, generator):
    if isinstance(base, nn.Conv2d):
        return torch.randn(2, base.in_channels, 8, 8, generator=generator)
    return torch.randn(2, 5, base.in_features, generator=generator)


def reference_output(base, weight, x):
    bias = None if base.bias is None else base.bias.double()
    if isinstance(base, nn.Conv2d):
        return nn.functional.conv2d(x.double(), weight, bias, base.stride, base.padding, base.dilation, base.groups)
    return nn.functional.linear(x.double(), weight, bias)


@pytest.mark.parametrize("kind,preset", [("flux", "flux-all"), ("sd3.5", "sd3-all")])
@pytest.mark.parametrize("mode", ["exp", "taylor"])
def test_every_adapted_layer_is_the_formula_and_fuses_exactly(kind, preset, mode):
    model = tiny_transformer(kind)
    convs, linears = find_targets(model, LieConfig(preset=preset))
    bases = {name: (model.get_submodule(name).weight.detach().clone()) for name in convs + linears}
    generator = torch.Generator().manual_seed(3)
    inputs = {name: layer_input(model.get_submodule(name), generator) for name in bases}
    before = {name: model.get_submodule(name)(x) for name, x in inputs.items()}
    add_lie_adapters(model, LieConfig(preset=preset, rank=3, alpha=1.5, mode=mode))  # balance "rms"
    for name, x in inputs.items():  # the group identity at init
        assert torch.equal(model.get_submodule(name)(x), before[name]), name
    trained(model, std=0.05)
    with torch.no_grad():
        for name, x in inputs.items():
            layer, W = model.get_submodule(name), bases[name]
            s = 1.5 / 3 / max(W.double().pow(2).mean().sqrt().item(), BALANCE_MIN_RMS)  # balance "rms": alpha / RMS(W)
            expected = reference_weight(W, [(layer.lora_A["default"].weight, layer.lora_B["default"].weight, s)], mode)
            torch.testing.assert_close(layer(x).double(), reference_output(layer.base_layer, expected, x),
                                       rtol=1e-5, atol=1e-6, msg=name)
            layer.merge()
            torch.testing.assert_close(layer.base_layer.weight.double(), expected, rtol=1e-6, atol=1e-7, msg=name)
            layer.unmerge()
            torch.testing.assert_close(layer.base_layer.weight, W, rtol=1e-6, atol=1e-7, msg=name)
    assert {type(model.get_submodule(n)).__name__ for n in convs} <= {"LieConv2d"}
    assert {type(model.get_submodule(n)).__name__ for n in linears} == {"LieLinear"}


def test_two_adapters_compose_in_the_algebra():
    model = tiny_transformer("sd3.5")
    names = find_targets(model, LieConfig(preset="sd3-all"))
    bases = {name: model.get_submodule(name).weight.detach().clone() for name in names[0] + names[1]}
    add_lie_adapters(model, LieConfig(preset="sd3-all", rank=2, balance="none"), adapter_name="a")
    add_lie_adapters(model, LieConfig(preset="sd3-all", rank=3, alpha=1.0, balance="none"), adapter_name="b")
    trained(model, "a", std=0.05, seed=1)
    trained(model, "b", std=0.05, seed=2)
    model.set_adapters(["a", "b"], weights=[0.7, -0.4])
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, W in bases.items():
            layer = model.get_submodule(name)
            factors = [(layer.lora_A[a].weight, layer.lora_B[a].weight, w * s)
                       for a, w, s in (("a", 0.7, 1.0), ("b", -0.4, 1 / 3))]
            x = layer_input(layer.base_layer, generator)
            expected = reference_output(layer.base_layer, reference_weight(W, factors), x)
            torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-6, msg=name)


def block_case(kind):
    """A float64 DiT block with Lie adapters on every Linear, and its inputs. Flux: a double-stream block;
    SD3.5: joint attention + attn2, without the qk RMS-norm: diffusers' RMSNorm takes its variance in float32
    even for float64 inputs, which would put float32 noise into the finite differences."""
    model = tiny_transformer(kind)
    if kind != "flux":
        model = type(model)(**dict(model.config, qk_norm=None))
    model = model.double()
    block = model.transformer_blocks[0]
    add_lie_adapters(block, LieConfig(preset=f"{'flux' if kind == 'flux' else 'sd3'}-all-linear", rank=2))
    trained(block, std=0.1)
    generator = torch.Generator().manual_seed(5)
    width = model.inner_dim
    args = (torch.randn(1, 6, width, generator=generator, dtype=torch.float64),
            torch.randn(1, 4, width, generator=generator, dtype=torch.float64),
            torch.randn(1, width, generator=generator, dtype=torch.float64))
    return block, args


@pytest.mark.parametrize("kind", ["flux", "sd3.5"])
def test_gradients_match_finite_differences_on_a_dit_block(kind):
    block, args = block_case(kind)
    factors = {n: p for n, p in block.named_parameters() if "lora_" in n}
    assert len(factors) == 2 * len(find_targets(block, LieConfig(preset="sd3-all-linear" if kind != "flux" else
                                                                 "flux-all-linear"))[1])

    def run(*values):
        context, hidden = torch.func.functional_call(block, dict(zip(factors, values)), args)
        return torch.cat([context.flatten(), hidden.flatten()])

    assert torch.autograd.gradcheck(run, tuple(p.detach().requires_grad_() for p in factors.values()),
                                    eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


# -------------------------------------------------------------------------------------------- bad files


def unchanged(pipe, directory):
    assert not any(pipe.get_list_adapters().values())
    components = (pipe.transformer, pipe.text_encoder)
    assert not any(isinstance(m, LoraLayer) for component in components for m in component.modules())
    torch.testing.assert_close(render(pipe), render(load_pipeline(directory)), rtol=0, atol=0)


def test_bad_files_are_refused_naming_file_module_and_shape(pipeline_dirs, tmp_path):
    flux = pipeline_dirs["flux"]
    other = tiny_transformer("flux")
    wider = type(other)(**dict(other.config, attention_head_dim=24, axes_dims_rope=(8, 8, 8)))
    wide_file = save_lie_weights(tmp_path / "wide", transformer=trained(add_lie_adapters(wider, LieConfig(rank=2))))
    deeper = type(other)(**dict(other.config, num_single_layers=3))
    deep_file = save_lie_weights(tmp_path / "deep", transformer=trained(add_lie_adapters(deeper, LieConfig(rank=2))))
    good = save(adapted_pipeline(flux, None), tmp_path / "good")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases = [
        (wide_file, rf"{wide_file}: does not fit the model: "
                    r"lie\.transformer\.single_transformer_blocks\.0\.attn\.to_k: factor shapes lora_A \(2, 48\), "
                    r"lora_B \(48, 2\) do not fit Linear \(32, 32\).*"
                    r"attention_head_dim 24 \(file\) vs 16 \(model\)"),
        (deep_file, rf"{deep_file}: does not fit the model: .*transformer has no module "
                    r"'single_transformer_blocks\.2\.attn\.to_q'.*num_single_layers 3 \(file\) vs 2 \(model\)"),
        (truncated, rf"{truncated}: not a readable safetensors file"),
    ]
    pipe = load_pipeline(flux)
    for path, message in cases:
        with pytest.raises(ValueError, match=message):
            load_lie_weights(pipe, path)
        unchanged(pipe, flux)
    # a failure in the second component (the text encoder's factors do not fit) leaves the first one alone too
    parsed = read_lie_file(good)
    entry = next(m for m in parsed.modules if m.component == "text_encoder")
    entry.A, entry.B = entry.A[:, :-1].contiguous(), entry.B
    with pytest.raises(ValueError, match=rf"does not fit the model: text_encoder\.{re.escape(entry.module)}: factor "
                                         r"shapes lora_A \(2, 31\), lora_B \(32, 2\) do not fit Linear \(32, 32\)"):
        load_lie_weights(pipe, parsed)
    unchanged(pipe, flux)


def test_balance_report_on_transformers(tmp_path):
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks import balance_report
    finally:
        sys.path.remove(str(REPO))
    data = balance_report.main(["--models", "tiny-flux", "tiny-sd3.5", "--out", str(tmp_path), "--name", "dit",
                                "--readme", "none"])
    flux, sd35 = data["models"]
    assert len(flux["layers"]) == len(find_targets(tiny_transformer("flux"), LieConfig(preset="flux-all"))[1])
    model = tiny_transformer("sd3.5")
    for row in sd35["layers"]:
        weight = model.get_submodule(row["module"]).weight.double()
        assert row["factor"] == pytest.approx(1 / weight.pow(2).mean().sqrt().item(), rel=1e-9)
        assert 0.9 < row["move_ratio"] < 1.1 and row["finite"]
    kinds = {row["kind"] for row in sd35["layers"]}
    assert {"pos_embed.proj", "transformer_blocks.*.attn2.to_q", "transformer_blocks.*.attn.to_q (default)"} <= kinds
    assert (tmp_path / "dit.md").read_text().startswith("### What the balancing rule does per layer")
