"""Opt-in: the A1111 extension against a real AUTOMATIC1111 checkout (LIE_A1111_DIR), for tiny SD1 and SDXL models.

A1111's built-in Lora extension runs as it is, from a prompt's `<lora:name:m>` to the patched weights:
`extra_networks.parse_prompt`, `ExtraNetworkLora.activate`, `networks` (the Lora folder listing, module_types,
load_networks, load_network's key matching, network_apply_weights and its restore), `network` (NetworkOnDisk,
NetworkModule), `network_lora`, `lyco_helpers`, and the `modules` they need that import without the web UI
(`devices`, `errors`, `patches`, `util`, `paths_internal`, `models.sd3.mmdit`). The extension's `install_hooks`
hooks into them. Stubbed, because they load the web UI, checkpoints or settings: `modules.shared` (opts,
cmd_opts, sd_model; walk_files is A1111's `util.walk_files`), `modules.sd_models` (read_state_dict =
safetensors' load_file), `modules.sd_hijack`, `modules.scripts`, `modules.cache`, `modules.hashes`,
`modules.textual_inversion`, `gradio`. A1111's ldm/sgm model classes are not in its repository (it clones them
at first launch), so the models are the tiny diffusers pipelines' own layers placed under A1111's module names:
the UNet under its SGM names, the CLIP text encoders under `transformer.text_model`, and SDXL's second encoder
as OpenCLIP blocks (one nn.MultiheadAttention per layer for q/k/v/out). A1111 runs with `devices.dtype` float32
(`--no-half`). network_apply_weights is called on every layer whose forward A1111 patches, as a forward would.
"""

import os
import shutil
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_export import _adapted
from test_hosts_comfyui import (assert_same, diffusers_weights, kohya_written, merged_with_lora, second_subject,
                                together_weights)
from test_io import _rewrite

from lie_diffusion.naming import unet_name_to_sgm

A1111 = os.environ.get("LIE_A1111_DIR")
pytestmark = pytest.mark.skipif(not A1111, reason="set LIE_A1111_DIR to a stable-diffusion-webui checkout to run these")
PATCHED_LAYERS = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.MultiheadAttention)
NonDynamicallyQuantizableLinear = torch.nn.modules.linear.NonDynamicallyQuantizableLinear  # an attention's out_proj


def stub(name, **attributes):
    module = ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module


@pytest.fixture(scope="module")
def a1111(tmp_path_factory):
    """A1111's Lora extension, imported from the checkout with the stubs above, and the extension's hooks."""
    saved_modules, saved_path, saved_argv = dict(sys.modules), list(sys.path), sys.argv
    sys.path[:0] = [A1111, str(Path(A1111) / "extensions-builtin" / "Lora")]
    sys.argv = ["webui"]  # A1111 parses its flags at import
    opts = SimpleNamespace(lora_functional=False, lora_in_memory_limit=100, lora_not_found_warning_console=False,
                           lora_not_found_gradio_warning=False, lora_bundled_ti_to_infotext=False,
                           lora_preferred_name="Filename", list_hidden_files=False, sd_lora="None",
                           lora_add_hashes_to_infotext=False, extra_networks_default_multiplier=1.0)
    folder = tmp_path_factory.mktemp("a1111-loras")
    shared = stub("modules.shared", opts=opts, sd_model=None,
                  cmd_opts=SimpleNamespace(lora_dir=str(folder), lyco_dir_backcompat=str(folder / "lyco"),
                                           use_ipex=False, device_id=None))
    stub("modules.sd_models", read_state_dict=lambda path, *args, **kwargs: load_file(path),
         read_metadata_from_safetensors=lambda path: safe_open(path, "pt").metadata() or {})
    hijack = stub("modules.sd_hijack", model_hijack=SimpleNamespace(comments=[], embedding_db=SimpleNamespace()))
    stub("modules.scripts")
    stub("modules.cache", cached_data_for_file=lambda subsection, title, filename, func: func())
    stub("modules.hashes", sha256_from_cache=lambda *args, **kwargs: None, sha256=lambda *args, **kwargs: "")
    stub("modules.textual_inversion")
    stub("modules.textual_inversion.textual_inversion")
    stub("gradio", Warning=Warning)
    try:
        from modules import devices, patches, util

        shared.walk_files = util.walk_files
        devices.dtype = torch.float32
        import extra_networks_lora
        import networks
        from modules import extra_networks

        from lie_diffusion.integrations import a1111 as extension

        networks.extra_network_lora = extra_networks_lora.ExtraNetworkLora()  # what lora_script's before_ui does
        extension.install_hooks()
        extension.install_hooks()  # A1111 may run its scripts twice: nothing is hooked twice
        yield SimpleNamespace(networks=networks, extra_networks=extra_networks, shared=shared, hijack=hijack,
                              patches=patches, extension=extension, folder=folder)
    finally:
        sys.path[:], sys.argv = saved_path, saved_argv
        for name in set(sys.modules) - set(saved_modules):
            del sys.modules[name]


def place(root: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    """Put `module` at the dotted `path` under `root`, making the parents on the way."""
    *parents, leaf = path.split(".")
    for part in parents:
        if part not in root._modules:
            root.add_module(part, torch.nn.Module())
        root = root._modules[part]
    root.add_module(leaf, module)


def text_model_prefix(encoder) -> str:
    return "text_model." if any(k.startswith("text_model.") for k in encoder.state_dict()) else ""


def clip_holder(encoder):
    """A1111's FrozenCLIPEmbedder: the transformers CLIP model as `.transformer`, layers under `text_model.`."""
    holder, transformer = torch.nn.Module(), encoder
    if not text_model_prefix(encoder):  # transformers 5 drops the wrapper
        transformer = torch.nn.Module()
        transformer.text_model = encoder
    holder.transformer = transformer
    return holder


def open_clip_holder(encoder):
    """sgm's FrozenOpenCLIPEmbedder2: `.model.transformer.resblocks`, each with one nn.MultiheadAttention for
    q/k/v/out (the transformers encoder's weights) and its MLP as `mlp.c_fc` / `mlp.c_proj`."""
    holder, text = torch.nn.Module(), getattr(encoder, "text_model", encoder)
    config = encoder.config
    for i, layer in enumerate(text.encoder.layers):
        attention = torch.nn.MultiheadAttention(config.hidden_size, config.num_attention_heads)
        projections = layer.self_attn
        with torch.no_grad():
            attention.in_proj_weight.copy_(torch.cat([projections.q_proj.weight, projections.k_proj.weight,
                                                      projections.v_proj.weight]))
            attention.in_proj_bias.copy_(torch.cat([projections.q_proj.bias, projections.k_proj.bias,
                                                    projections.v_proj.bias]))
            attention.out_proj.weight.copy_(projections.out_proj.weight)
            attention.out_proj.bias.copy_(projections.out_proj.bias)
        place(holder, f"model.transformer.resblocks.{i}.attn", attention)
        place(holder, f"model.transformer.resblocks.{i}.mlp.c_fc", layer.mlp.fc1)
        place(holder, f"model.transformer.resblocks.{i}.mlp.c_proj", layer.mlp.fc2)
    return holder


def a1111_model(pipe, kind):
    """The tiny pipeline's layers where A1111's SD / SDXL model object holds them."""
    sd_model = torch.nn.Module()
    sd_model.is_sdxl = kind == "sdxl"
    sd_model.model = torch.nn.Module()
    for name, layer in pipe.unet.named_modules():
        if isinstance(layer, PATCHED_LAYERS):
            place(sd_model.model, "diffusion_model." + unet_name_to_sgm(name, pipe.unet.config), layer)
    if kind == "sdxl":
        sd_model.conditioner = torch.nn.Module()
        sd_model.conditioner.embedders = torch.nn.ModuleList([torch.nn.Module(), torch.nn.Module()])
        sd_model.conditioner.embedders[0].wrapped = clip_holder(pipe.text_encoder)
        sd_model.conditioner.embedders[1].wrapped = open_clip_holder(pipe.text_encoder_2)
    else:
        sd_model.cond_stage_model = torch.nn.Module()
        sd_model.cond_stage_model.wrapped = clip_holder(pipe.text_encoder)
    return sd_model


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def setup(request, a1111, tmp_path_factory):
    adapted = _adapted(tmp_path_factory.mktemp(f"a1111-{request.param}"), request.param)
    pipe = adapted.cls.from_pretrained(str(adapted.base))
    sd_model = a1111_model(pipe, request.param)
    a1111.shared.sd_model = sd_model
    a1111.networks.assign_network_names_to_compvis_modules(sd_model)  # A1111 runs it when a model loads
    return SimpleNamespace(adapted=adapted, pipe=pipe, sd_model=sd_model, kind=request.param,
                           base=diffusers_weights(adapted))


def register(a1111, path, name):
    """Put a file in A1111's Lora folder as `<name>.safetensors`; A1111 lists it when a prompt names it."""
    shutil.copy(path, a1111.folder / f"{name}.safetensors")
    return name


def activate(a1111, prompt):
    """What A1111 does with a prompt's `<lora:name:m>` before sampling: parse it, load and activate the networks."""
    _, extra = a1111.extra_networks.parse_prompt(prompt)
    p = SimpleNamespace(all_prompts=[prompt], extra_generation_params={})
    a1111.networks.extra_network_lora.activate(p, extra.get("lora", []))


def applied(a1111, setup, prompt):
    """Every weight once A1111 activated `prompt`'s networks and patched each layer; A1111 then restores them."""
    activate(a1111, prompt)
    apply_everywhere(a1111, setup)
    weights = {(c, k): v.detach().clone() for c in ("unet", "text_encoder", "text_encoder_2")
               if getattr(setup.pipe, c, None) is not None for k, v in getattr(setup.pipe, c).state_dict().items()}
    if setup.kind == "sdxl":  # text_encoder_2's attention lives in the OpenCLIP blocks A1111 patches
        blocks = setup.sd_model.conditioner.embedders[1].wrapped.model.transformer.resblocks
        prefix = text_model_prefix(setup.pipe.text_encoder_2)
        for i, block in enumerate(blocks.children()):
            chunks = dict(zip("qkv", block.attn.in_proj_weight.detach().chunk(3)))
            chunks["out"] = block.attn.out_proj.weight.detach()
            for part, weight in chunks.items():
                weights["text_encoder_2", f"{prefix}encoder.layers.{i}.self_attn.{part}_proj.weight"] = weight.clone()
    activate(a1111, "")
    apply_everywhere(a1111, setup)
    return weights


def apply_everywhere(a1111, setup):
    """What A1111's patched forwards do first, for every layer: nn.MultiheadAttention's out_proj is not called on
    its own (the attention's forward reads its weight), so A1111 patches it through the attention. A1111 samples
    under torch.no_grad()."""
    with torch.no_grad():
        for layer in setup.sd_model.network_layer_mapping.values():
            if isinstance(layer, PATCHED_LAYERS) and type(layer) is not NonDynamicallyQuantizableLinear:
                a1111.networks.network_apply_weights(layer)


def assert_unchanged(got, base):
    assert got.keys() <= base.keys() and all(torch.equal(v, base[k]) for k, v in got.items())


@pytest.mark.parametrize("multiplier", [1.0, 0.5, -1.0])
def test_extension_matches_merge_at_every_multiplier(a1111, setup, multiplier):
    name = register(a1111, setup.adapted.path, f"lie-{setup.kind}")
    got = applied(a1111, setup, f"a photo <lora:{name}:{multiplier}>")
    expected = diffusers_weights(setup.adapted, multiplier)
    assert any(not torch.equal(expected[k], setup.base[k]) for k in expected if k[0] == "unet")
    assert_same(got, expected)
    kinds = {type(module).__name__ for module in a1111.networks.networks_in_memory[name].modules.values()}
    assert kinds == {"NetworkModuleLie", "NetworkModuleLora"}  # the LoRA section went through A1111's own type
    assert_unchanged(applied(a1111, setup, "a photo"), setup.base)  # A1111 restored every weight


@pytest.mark.parametrize("order", ["lora first", "lie first"])
def test_composes_with_a_plain_kohya_lora(a1111, setup, order, tmp_path):
    """A kohya LoRA on a conv the Lie file also adapts, loaded by A1111's own LoRA module type, before or after it
    in the prompt (A1111 adds each network's update to the weight the previous ones left)."""
    module = "down_blocks.1.resnets.0.conv1"
    weight = setup.pipe.unet.get_submodule(module).weight
    generator = torch.Generator().manual_seed(3)
    down = torch.randn(2, *weight.shape[1:], generator=generator) * 0.2
    up = torch.randn(weight.shape[0], 2, 1, 1, generator=generator) * 0.2
    stem = "lora_unet_" + unet_name_to_sgm(module, setup.pipe.unet.config).replace(".", "_")
    save_file({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(3.0)},
              str(tmp_path / "plain.safetensors"))
    plain = register(a1111, tmp_path / "plain.safetensors", f"plain-{setup.kind}-{order}")
    lie = register(a1111, setup.adapted.path, f"lie-{setup.kind}")
    update = {("unet", module + ".weight"): 0.7 * 1.5 * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)}
    loras = [f"<lora:{plain}:0.7>", f"<lora:{lie}:0.5>"]
    got = applied(a1111, setup, " ".join(loras if order == "lora first" else loras[::-1]))
    assert_same(got, merged_with_lora(setup.adapted, 0.5, update, order))


@pytest.mark.parametrize("strengths", [(1.0, 0.7), (0.5, -1.0)])
def test_two_stacked_files_equal_both_adapters_active_in_diffusers(a1111, setup, strengths, tmp_path):
    """Two `<lora:…>` tags: A1111 applies each network's update to the weight the previous ones left."""
    paths = [setup.adapted.path, second_subject(setup.adapted, tmp_path / "second.safetensors")]
    names = [register(a1111, path, f"stack{k}-{setup.kind}") for k, path in enumerate(paths)]
    got = applied(a1111, setup, " ".join(f"<lora:{n}:{s}>" for n, s in zip(names, strengths)))
    assert_same(got, together_weights(setup.adapted, paths, strengths))


@pytest.fixture(scope="module")
def kohya_file(setup, tmp_path_factory):
    return kohya_written(setup.adapted, tmp_path_factory.mktemp(f"kohya-{setup.kind}") / "kohya.safetensors")


@pytest.mark.parametrize("multiplier", [1.0, 0.5, -1.0])
def test_a_file_written_by_the_kohya_network_matches_merge(a1111, setup, kohya_file, multiplier):
    """Train in sd-scripts, `<lora:name:m>` in A1111: the file's LoRA section through A1111's own LoRA type."""
    name = register(a1111, kohya_file.path, f"kohya-{setup.kind}")
    expected = diffusers_weights(kohya_file, multiplier)
    assert any(not torch.equal(expected[k], setup.base[k]) for k in expected if k[0] == "unet")
    assert_same(applied(a1111, setup, f"a photo <lora:{name}:{multiplier}>"), expected)
    kinds = {type(module).__name__ for module in a1111.networks.networks_in_memory[name].modules.values()}
    assert kinds == {"NetworkModuleLie", "NetworkModuleLora"}


def test_bad_files_are_refused_naming_them_and_patch_nothing(a1111, setup, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp(f"bad-{setup.kind}")
    other = _adapted(tmp_path / "other", "sdxl" if setup.kind == "sd1" else "sd1")
    huge = _rewrite(setup.adapted.path, tmp_path / "huge.safetensors", edit_info=lambda i: i.update(alpha=1e30))
    for path, words in ((huge, "NaN/inf"), (other.path, "does not fit this model")):
        name = register(a1111, path, f"{path.parent.name}-{path.stem}-{setup.kind}")
        a1111.hijack.model_hijack.comments.clear()
        assert_unchanged(applied(a1111, setup, f"<lora:{name}:1>"), setup.base)
        comments = a1111.hijack.model_hijack.comments
        assert len(comments) == 1 and f"/{name}.safetensors: " in comments[0] and words in comments[0], comments
        assert not a1111.networks.loaded_networks
    # a plain kohya file never takes the Lie path; asked to, the reader names it
    kohya = tmp_path / "kohya.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(1, 4, 3, 3)}, str(kohya))
    with pytest.raises(ValueError, match="kohya.safetensors: not a lie-diffusion file"):
        a1111.extension.a1111_state_dict(kohya)
