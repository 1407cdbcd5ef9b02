"""Opt-in: the Forge extension against a real Forge checkout (LIE_FORGE_DIR), for tiny SD1 and SDXL models.

Forge's backend runs on the CPU without its web UI: its UNet class (built from a config with the tiny
pipelines' weights), ModelPatcher, key maps, LoRA loader and LoraLoader.refresh, which applies every patch
through merge_lora_to_weight and its extra_weight_calculators. What needs the web UI is not run here: the
extension's hook into the built-in LoRA extension (`networks.load_lora_for_models`) and `<lora:…>` prompts.
"""

import inspect
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from test_export import _adapted
from test_hosts_comfyui import (assert_same, diffusers_weights, host_weights, kohya_written, ldm_unet_config,
                                merged_with_lora, second_subject, together_weights)

FORGE = os.environ.get("LIE_FORGE_DIR")
pytestmark = pytest.mark.skipif(not FORGE, reason="set LIE_FORGE_DIR to a Forge checkout to run these")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def forge():
    sys.path.insert(0, FORGE)
    argv, sys.argv = sys.argv, ["forge", "--always-cpu"]  # Forge reads its flags at import
    try:
        from backend.nn.unet import IntegratedUNet2DConditionModel
        from backend.patcher import lora
        from backend.patcher.base import ModelPatcher
        from backend.patcher.clip import CLIP

        from lie_diffusion.integrations import forge as extension
    finally:
        sys.argv = argv
    lora.extra_weight_calculators[extension.PATCH_TYPE] = extension.calculate  # what install_hooks registers
    return SimpleNamespace(UNet=IntegratedUNet2DConditionModel, lora=lora, ModelPatcher=ModelPatcher, CLIP=CLIP,
                           extension=extension)


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def setup(request, forge, tmp_path_factory):
    from packages_3rdparty.comfyui_lora_collection.utils import unet_to_diffusers

    adapted = _adapted(tmp_path_factory.mktemp(f"forge-{request.param}"), request.param)
    pipe = adapted.cls.from_pretrained(str(adapted.base))
    config = ldm_unet_config(dict(pipe.unet.config))
    accepted = inspect.signature(forge.UNet.__init__).parameters
    config = {**{k: v for k, v in config.items() if k in accepted}, "num_heads": -1, "num_head_channels": 4}
    kmodel = torch.nn.Module()  # what Forge's key maps read of its KModel
    kmodel.diffusion_model = forge.UNet(**config)
    kmodel.config = SimpleNamespace(huggingface_repo=f"tiny-{request.param}")
    to_ldm = unet_to_diffusers(kmodel.diffusion_model.config)  # Forge's own diffusers -> LDM names
    kmodel.diffusion_model.load_state_dict({to_ldm[k]: v for k, v in pipe.unet.state_dict().items()}, strict=True)
    names = {f"diffusion_model.{to_ldm[k]}": ("unet", k) for k in pipe.unet.state_dict()}

    encoders = {}
    for clip_name, component in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2")):
        encoder = getattr(pipe, component, None)
        if encoder is None:
            continue
        # Forge holds transformers' CLIP models as `<clip>.transformer`, keys under `text_model.` (transformers 4)
        holder, transformer = torch.nn.Module(), encoder
        if not any(k.startswith("text_model.") for k in encoder.state_dict()):
            transformer = torch.nn.Module()
            transformer.text_model = encoder
        holder.transformer = transformer
        encoders[clip_name] = holder
        prefix = "" if transformer is encoder else "text_model."
        names.update({f"{clip_name}.transformer.{prefix}{k}": (component, k) for k in encoder.state_dict()})
    clip = forge.CLIP(model_dict=encoders)
    model = forge.ModelPatcher(kmodel, load_device=CPU, offload_device=CPU)
    return SimpleNamespace(adapted=adapted, model=model, clip=clip, names=names, base=diffusers_weights(adapted))


def applied(setup, model, clip):
    """Forge's weights after LoraLoader.refresh applies the patches; the originals are restored after."""
    return host_weights(setup, (model, clip.patcher), lambda p: p.refresh_loras(),
                        lambda p: p.lora_loader.refresh(lora_patches={}, force_refresh=True))


@pytest.mark.parametrize("strength", [1.0, 0.5, -1.0])
def test_extension_matches_merge_at_every_strength(forge, setup, strength):
    model, clip = forge.extension.load_lie_for_models(setup.model, setup.clip, setup.adapted.path, strength, strength)
    expected = diffusers_weights(setup.adapted, strength)
    assert any(not torch.equal(expected[k], setup.base[k]) for k in expected if k[0] == "unet")
    assert_same(applied(setup, model, clip), expected)
    assert not setup.model.lora_patches and not setup.clip.patcher.lora_patches  # clones were patched


@pytest.mark.parametrize("order", ["lora first", "lie first"])
def test_composes_with_a_plain_lora_loaded_by_forge(forge, setup, order):
    """A kohya LoRA on a conv the Lie file also adapts, loaded by Forge's own load_lora and add_patches."""
    keys = forge.lora.model_lora_keys_unet(setup.model.model, {})
    stem = next(s for s, k in keys.items() if s.startswith("lora_unet_")
                and setup.names.get(k) == ("unet", "down_blocks.1.resnets.0.conv1.weight"))
    weight = setup.model.model.state_dict()[keys[stem]]
    generator = torch.Generator().manual_seed(3)
    down = torch.randn(2, *weight.shape[1:], generator=generator) * 0.2
    up = torch.randn(weight.shape[0], 2, 1, 1, generator=generator) * 0.2
    patches, unmatched = forge.lora.load_lora(
        {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(3.0)},
        {stem: keys[stem]})
    assert not unmatched
    update = {("unet", "down_blocks.1.resnets.0.conv1.weight"): 0.7 * 1.5 * (up.flatten(1) @ down.flatten(1)).reshape(
        weight.shape)}

    def plain(model, clip):
        clone = model.clone()
        clone.add_patches(filename="plain", patches=patches, strength_patch=0.7)
        return clone, clip

    def lie(model, clip):
        return forge.extension.load_lie_for_models(model, clip, setup.adapted.path, 0.5, 0.5)

    model, clip = setup.model, setup.clip
    for step in (plain, lie) if order == "lora first" else (lie, plain):
        model, clip = step(model, clip)
    assert_same(applied(setup, model, clip), merged_with_lora(setup.adapted, 0.5, update, order))


@pytest.mark.parametrize("strengths", [(1.0, 0.7), (0.5, -1.0)])
def test_two_stacked_files_equal_both_adapters_active_in_diffusers(forge, setup, strengths, tmp_path):
    """Two `<lora:…>` tags: Forge patches the weight with each file in turn."""
    paths = [setup.adapted.path, second_subject(setup.adapted, tmp_path / "second.safetensors")]
    model, clip = setup.model, setup.clip
    for path, strength in zip(paths, strengths):
        model, clip = forge.extension.load_lie_for_models(model, clip, path, strength, strength)
    assert_same(applied(setup, model, clip), together_weights(setup.adapted, paths, strengths))


def test_bad_file_raises_naming_it_and_patches_nothing(forge, setup, tmp_path):
    from test_io import _rewrite

    huge = _rewrite(setup.adapted.path, tmp_path / "huge.safetensors", edit_info=lambda i: i.update(alpha=1e30))
    with pytest.raises(ValueError, match="huge.safetensors: .*NaN/inf"):
        forge.extension.load_lie_for_models(setup.model, setup.clip, huge, 1.0, 1.0)
    assert not setup.model.lora_patches and not setup.clip.patcher.lora_patches


@pytest.fixture(scope="module")
def kohya_file(setup, tmp_path_factory):
    return kohya_written(setup.adapted, tmp_path_factory.mktemp("kohya-written") / "kohya.safetensors")


@pytest.mark.parametrize("strength", [1.0, 0.5, -1.0])
def test_a_file_written_by_the_kohya_network_matches_merge(forge, setup, kohya_file, strength):
    model, clip = forge.extension.load_lie_for_models(setup.model, setup.clip, kohya_file.path, strength, strength)
    assert_same(applied(setup, model, clip), diffusers_weights(kohya_file, strength))
