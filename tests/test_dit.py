"""Lie adapters on diffusion transformers: tiny Flux.1, SD3 and SD3.5 built from diffusers' real classes."""

from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from safetensors import safe_open
from torch import nn

from lie_diffusion import LieConfig, add_lie_adapters, load_lie_weights, read_lie_file, save_lie_weights
from lie_diffusion.inject import PRESETS, find_targets, remove_adapter
from lie_diffusion.tiny import build_tiny_pipeline, tiny_t5_encoder, tiny_text_encoder, tiny_transformer

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`")

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
    ("flux", "flux-all-linear"): ([], _in("transformer_blocks.0", JOINT_ATTN + FF + MODULATION)
                                  + _in("single_transformer_blocks.0", SINGLE) + _in("single_transformer_blocks.1", SINGLE)),
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
        assert find_targets(transformers[kind], LieConfig()) == find_targets(transformers[kind], LieConfig(preset=preset))
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
