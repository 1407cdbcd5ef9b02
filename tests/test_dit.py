"""Lie adapters on diffusion transformers: tiny Flux.1, SD3 and SD3.5 built from diffusers' real classes."""

import pytest
import torch
from torch import nn

from lie_diffusion import LieConfig
from lie_diffusion.inject import PRESETS, find_targets
from lie_diffusion.tiny import tiny_t5_encoder, tiny_text_encoder, tiny_transformer

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
