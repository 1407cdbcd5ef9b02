"""Opt-in: the Forge extension on a Flux.1 transformer, against a real Forge checkout (LIE_FORGE_DIR).

Forge's own code: its Flux class (`backend.nn.flux.IntegratedFluxTransformer2DModel`, BFL's layout), its Flux key
map (diffusers names → rows of fused weights, `model_lora_keys_unet`), its `load_lora` for the file's LoRA section
and a plain Flux LoRA, `ModelPatcher`, and `LoraLoader.refresh`, which applies every patch through
`merge_lora_to_weight` and the registered `extra_weight_calculators["lie"]`. The tiny diffusers Flux weights are
placed into Forge's model through Forge's own diffusers map. Compared per module with the formula.
"""

from types import SimpleNamespace

import pytest
import torch
from test_hosts_comfyui_dit import (LORA_SECTION, PLAIN_TARGET, assert_same, chained, diffusers_model, expected,
                                    merged_in_diffusers, module_weights, plain_factors, saved_adapter)
from test_hosts_dit import lie_file, linears
from test_hosts_forge import CPU, FORGE, forge  # noqa: F401  (the Forge fixture)

pytestmark = pytest.mark.skipif(not FORGE, reason="set LIE_FORGE_DIR to a Forge checkout to run these")


@pytest.fixture(scope="module")
def setup(forge, tmp_path_factory):  # noqa: F811
    from backend.nn.flux import IntegratedFluxTransformer2DModel
    from packages_3rdparty.comfyui_lora_collection.utils import flux_to_diffusers

    model = diffusers_model("flux")
    config = model.config
    unet_config = dict(in_channels=config.in_channels // 4, vec_in_dim=config.pooled_projection_dim,
                       context_in_dim=config.joint_attention_dim, mlp_ratio=4.0,
                       hidden_size=config.num_attention_heads * config.attention_head_dim,
                       num_heads=config.num_attention_heads, depth=config.num_layers,
                       depth_single_blocks=config.num_single_layers, axes_dim=list(config.axes_dims_rope),
                       theta=10000, qkv_bias=True, guidance_embed=True)
    kmodel = torch.nn.Module()  # what Forge's key maps read of its KModel
    kmodel.diffusion_model = IntegratedFluxTransformer2DModel(**unet_config)
    kmodel.diffusion_model.config = unet_config  # as Forge's loader sets it
    kmodel.config = SimpleNamespace(huggingface_repo="black-forest-labs/FLUX.1-dev")
    to_forge = flux_to_diffusers(unet_config, output_prefix="")  # Forge's own diffusers -> BFL map
    state = {k: torch.empty_like(v) for k, v in kmodel.diffusion_model.state_dict().items()}
    for key, value in model.state_dict().items():
        target = to_forge[key]
        if isinstance(target, str):
            state[target].copy_(value)
        else:
            name, offset, *function = target
            rows = state[name] if offset is None else state[name].narrow(*offset)
            rows.copy_(function[0](value) if function else value)
    kmodel.diffusion_model.load_state_dict(state, strict=True)
    patcher = forge.ModelPatcher(kmodel, load_device=CPU, offload_device=CPU)
    tmp = tmp_path_factory.mktemp("forge-flux")
    adapter = lie_file(model, list(linears(model)), tmp, mode="mixed", lora=LORA_SECTION["flux"])
    to_model = {k: v for k, v in flux_to_diffusers(unet_config, output_prefix="diffusion_model.").items()
                if k.endswith(".weight")}
    base = {m: layer.weight.detach().clone() for m, layer in linears(model).items()}
    return SimpleNamespace(model=model, patcher=patcher, adapter=adapter, base=base, to_model=to_model)


def load(forge, path, patcher, strength):  # noqa: F811
    """The extension's entry point, `load_lie_for_models`, as Forge calls it for `<lora:name:strength>` (model)."""
    model, _ = forge.extension.load_lie_for_models(patcher, None, path, strength, 0)
    return model


def applied(setup, patcher):
    """Forge's weights after LoraLoader.refresh applies the patches, by diffusers module."""
    patcher.refresh_loras()
    try:
        return module_weights(setup.to_model, patcher.model.state_dict())
    finally:
        patcher.lora_loader.refresh(lora_patches={}, force_refresh=True)


@pytest.mark.parametrize("strength", [1.0, 0.5, -1.0])
def test_extension_patches_every_flux_module_exactly(forge, setup, strength):  # noqa: F811
    model = load(forge, setup.adapter.path, setup.patcher, strength)
    got = applied(setup, model)
    assert_same(got, expected(setup, strength))
    assert any(not torch.equal(got[m], setup.base[m]) for m in setup.base)
    assert not setup.patcher.lora_patches


@pytest.mark.parametrize("order", ["lora first", "lie first"])
def test_chained_with_a_plain_flux_lora_loaded_by_forge(forge, setup, order):  # noqa: F811
    target = PLAIN_TARGET["flux"]
    down, up = plain_factors(setup.base[target])
    keys = forge.lora.model_lora_keys_unet(setup.patcher.model, {})
    stem = f"transformer.{target}"
    patches, unmatched = forge.lora.load_lora({f"{stem}.lora_A.weight": down, f"{stem}.lora_B.weight": up},
                                              {stem: keys[stem]})
    assert not unmatched and isinstance(keys[stem], tuple)  # a row slice of single_blocks.0.linear1

    def plain(model):
        clone = model.clone()
        clone.add_patches(filename="plain", patches=patches, strength_patch=0.7)
        return clone

    model = setup.patcher
    for step in (plain, lambda m: load(forge, setup.adapter.path, m, 0.5)) if order == "lora first" else (
            lambda m: load(forge, setup.adapter.path, m, 0.5), plain):
        model = step(model)
    assert_same(applied(setup, model), chained(setup, target, 0.7 * up @ down, order))


def test_an_sd3_file_is_refused_naming_it(forge, setup, tmp_path):  # noqa: F811
    sd3 = diffusers_model("sd3.5")
    wrong = lie_file(sd3, list(linears(sd3))[:4], tmp_path)
    with pytest.raises(ValueError, match=r"adapter.safetensors: does not fit this model \(the file was saved for "
                                         r"a SD3 transformer"):
        load(forge, wrong.path, setup.patcher, 1.0)
    assert not setup.patcher.lora_patches


@pytest.mark.parametrize("strength", [1.0, 0.5, -1.0])
def test_a_saved_file_through_the_extension_equals_diffusers_merge(forge, setup, strength, tmp_path):  # noqa: F811
    """The extension's own entry point (`load_lie_for_models`, what `<lora:name:t>` reaches) on a file written by
    save_lie_weights from an adapted Flux transformer, against diffusers loading and merging it."""
    path = saved_adapter(setup.model, "flux", tmp_path)
    model, clip = forge.extension.load_lie_for_models(setup.patcher, None, path, strength, 0)
    assert clip is None
    want = merged_in_diffusers(setup.model, path, strength)
    assert all(not torch.equal(want[m], setup.base[m]) for m in want)
    assert_same(applied(setup, model), want)
