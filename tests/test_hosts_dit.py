"""The host-free core of the host loaders on Flux.1 and SD3/SD3.5 transformers (no host installed).

The hosts hold these transformers in the original checkpoints' layout, where q, k, v (and, in Flux's single
blocks, the MLP) are rows of one fused weight. Checked here: the name maps both ways, against diffusers' own
checkpoint converters; a stand-in host that patches rows of fused weights the way ComfyUI and Forge do (a view,
the result ignored), against the formula W ⊙ exp(t·sΔ) per diffusers module; refusals. tests/test_hosts_comfyui_dit.py
and tests/test_hosts_forge_dit.py run the real hosts.
"""

import math
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.loaders.single_file_utils import (convert_flux_transformer_checkpoint_to_diffusers,
                                                 convert_sd3_transformer_checkpoint_to_diffusers)

from lie_diffusion.hosts import UNET, LiePatch, host_patches
from lie_diffusion.io import ModuleEntry, model_fingerprint, read_lie_file, write_lie_file
from lie_diffusion.naming import CheckpointSlot, checkpoint_slot, diffusers_module, dit_family, dit_host_name

FLUX = dict(patch_size=1, in_channels=4, out_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=6, guidance_embeds=True,
            axes_dims_rope=(2, 2, 4))
# SD3.5: dual attention in block 0, qk norms; the last block is context_pre_only (no context MLP, no to_add_out)
SD35 = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=6, out_channels=4,
            pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm")
# not Linears: the state dict keys of the norms and the position embedding in both layouts (the converters read them)
FLUX_NORMS = {"transformer_blocks.{}.attn.norm_q.weight": "double_blocks.{}.img_attn.norm.query_norm.scale",
              "transformer_blocks.{}.attn.norm_k.weight": "double_blocks.{}.img_attn.norm.key_norm.scale",
              "transformer_blocks.{}.attn.norm_added_q.weight": "double_blocks.{}.txt_attn.norm.query_norm.scale",
              "transformer_blocks.{}.attn.norm_added_k.weight": "double_blocks.{}.txt_attn.norm.key_norm.scale",
              "single_transformer_blocks.{}.attn.norm_q.weight": "single_blocks.{}.norm.query_norm.scale",
              "single_transformer_blocks.{}.attn.norm_k.weight": "single_blocks.{}.norm.key_norm.scale"}
SD3_NORMS = {"transformer_blocks.{}.attn.norm_q.weight": "joint_blocks.{}.x_block.attn.ln_q.weight",
             "transformer_blocks.{}.attn.norm_k.weight": "joint_blocks.{}.x_block.attn.ln_k.weight",
             "transformer_blocks.{}.attn.norm_added_q.weight": "joint_blocks.{}.context_block.attn.ln_q.weight",
             "transformer_blocks.{}.attn.norm_added_k.weight": "joint_blocks.{}.context_block.attn.ln_k.weight",
             "transformer_blocks.{}.attn2.norm_q.weight": "joint_blocks.{}.x_block.attn2.ln_q.weight",
             "transformer_blocks.{}.attn2.norm_k.weight": "joint_blocks.{}.x_block.attn2.ln_k.weight",
             "pos_embed.pos_embed": "pos_embed"}


def random_transformer(family, flux_config, sd3_config):
    """A Flux or SD3 transformer of the given config with every weight drawn at random (seed 0)."""
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**flux_config) if family == "flux" else SD3Transformer2DModel(**sd3_config)
    with torch.no_grad():  # zero-initialised layers (AdaLN, proj_out) would hide a mix-up of rows
        for parameter in model.parameters():
            parameter.normal_(0, 0.3)
    return model


def tiny(family):
    return random_transformer(family, FLUX, SD35)


def linears(model):
    """diffusers module name -> Linear (and SD3's patch-embedding conv, which the layout also names)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def swap(weight):
    """(scale, shift) ↔ (shift, scale): the row order of AdaLN outputs in the original checkpoints."""
    first, second = weight.chunk(2)
    return torch.cat([second, first])


def to_checkpoint(model):
    """The model's state dict in the checkpoint layout, built from `checkpoint_slot` alone: each module's
    weight and bias placed in its rows of the (fused) checkpoint tensor."""
    config, state = model.config, model.state_dict()
    norms = FLUX_NORMS if dit_family(config) == "flux" else SD3_NORMS
    out, sizes = {}, {}
    for module in linears(model):
        slot = checkpoint_slot(module, config)
        for end in ("weight", "bias"):
            value = state[f"{module}.{end}"]
            key = f"{slot.key}.{end}"
            start, length = slot.rows or (0, value.shape[0])
            sizes[key] = max(sizes.get(key, 0), start + length)
            out.setdefault(key, {})[start] = swap(value) if slot.swapped else value
    out = {key: torch.cat([parts[start] for start in sorted(parts)]) for key, parts in out.items()}
    assert all(out[key].shape[0] == size for key, size in sizes.items())  # the slots tile each fused weight
    for key, value in state.items():
        for pattern, checkpoint in norms.items():
            index = key.split(".")[1] if "{}" in pattern else None
            if key == pattern.format(index):
                out[checkpoint.format(index)] = value
    return out


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_every_module_maps_to_its_checkpoint_rows_and_back(family):
    """Both ways: checkpoint_slot then diffusers_module is the identity on every Linear of a real model, and
    no two modules share rows."""
    model = tiny(family)
    slots = {module: checkpoint_slot(module, model.config) for module in linears(model)}
    assert all(diffusers_module(slot, model.config) == module for module, slot in slots.items())
    assert len(set(slots.values())) == len(slots)
    fused = {s.key for s in slots.values() if s.rows}
    expected = ({"double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "single_blocks.1.linear1"}
                if family == "flux" else
                {"joint_blocks.0.x_block.attn.qkv", "joint_blocks.0.x_block.attn2.qkv",
                 "joint_blocks.1.context_block.attn.qkv"})
    assert expected <= fused
    with pytest.raises(ValueError, match="no FLUX|no SD3"):
        diffusers_module(CheckpointSlot(next(iter(fused)), (1, 3)), model.config)


def test_flux_fused_rows_are_q_k_v_then_mlp():
    """Flux's single-block linear1 computes cat(q, k, v, mlp) of the input (BFL's SingleStreamBlock splits its
    output in that order); diffusers' converter hard-codes Flux-dev's width there, so it is checked directly."""
    model = tiny("flux")
    linear1 = to_checkpoint(model)["single_blocks.1.linear1.weight"]
    block = model.single_transformer_blocks[1]
    x = torch.randn(3, linear1.shape[1])
    parts = [block.attn.to_q, block.attn.to_k, block.attn.to_v, block.proj_mlp]
    torch.testing.assert_close(x @ linear1.T, torch.cat([p.weight @ x.T for p in parts]).T)


def test_the_layout_is_the_one_diffusers_converts_from():
    """Independent of our table: diffusers' converter from the original checkpoints takes the state dict our map
    builds back to the model's own (SD3.5 with dual attention and qk norms; Flux with its double blocks)."""
    model = tiny("sd3")
    converted = convert_sd3_transformer_checkpoint_to_diffusers(to_checkpoint(model))
    state = model.state_dict()
    assert converted.keys() == state.keys()
    assert all(torch.equal(converted[k], state[k]) for k in state)

    model = FluxTransformer2DModel(**{**FLUX, "num_single_layers": 0})  # its single blocks: previous test
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.3)
    checkpoint = to_checkpoint(model)
    # it needs one single block and splits its linear1 at Flux-dev's width (3072): a stand-in of that height
    checkpoint.update({f"single_blocks.0.{k}": torch.zeros(21504) for k in (
        "modulation.lin.weight", "modulation.lin.bias", "linear1.weight", "linear1.bias", "linear2.weight",
        "linear2.bias", "norm.query_norm.scale", "norm.key_norm.scale")})
    converted = convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
    state = model.state_dict()
    assert all(torch.equal(converted[k], state[k]) for k in state)


def host_key_map(model, prefix="diffusion_model."):
    """A stand-in ComfyUI: diffusers LoRA name -> (model key, (dim, start, length), row order function)."""
    key_map = {}
    for module in linears(model):
        slot = checkpoint_slot(module, model.config)
        key = f"{prefix}{slot.key}.weight"
        key_map[f"transformer.{module}"] = (
            key if slot.rows is None and not slot.swapped else
            (key, None if slot.rows is None else (0, *slot.rows), swap if slot.swapped else None))
    return key_map


def lie_file(model, modules, directory, mode="exp", scale=0.3, rank=2, lora=(), alpha=None, extra=()):
    """`directory`/adapter.safetensors for `modules` of `model`, written by write_lie_file with the model's
    fingerprint, and read back: random factors, Lie (mode "mixed": every fourth taylor) or, for those in `lora`,
    in the LoRA section; `alpha` for all if given; `extra` entries (text encoders) added."""
    generator = torch.Generator().manual_seed(5)
    entries = []
    for k, module in enumerate(modules):
        weight = linears(model)[module].weight
        A = torch.randn(rank, *weight.shape[1:], generator=generator) * scale
        B = torch.randn(weight.shape[0], rank, *[1] * (weight.ndim - 2), generator=generator) * scale
        section, kind = ("lora", None) if module in lora else (
            "lie", "taylor" if mode == "taylor" or (mode == "mixed" and k % 4 == 1) else "exp")
        entries.append(ModuleEntry("transformer", module, section, A, B, alpha=alpha or 1.5 + k % 3, mode=kind))
    path = write_lie_file(Path(directory) / "adapter.safetensors", entries + list(extra),
                          {"transformer": model_fingerprint(model)})
    return read_lie_file(path)


def reference(weight, entry, strength):
    """W ⊙ exp(t·sΔ) (exp) or W + t·s·W ⊙ Δ (taylor), Δ = reshape(B_flat @ A_flat), s = alpha/rank, in float64;
    W + t·sΔ for a LoRA-section module."""
    delta = (entry.B.double().flatten(1) @ entry.A.double().flatten(1)).reshape(weight.shape)
    t = strength * entry.alpha / entry.rank
    if entry.section == "lora":
        return weight.double() + t * delta
    return weight.double() * (torch.exp(t * delta) if entry.mode == "exp" else 1 + t * delta)


def apply_like_comfyui(weights, patches, strength):
    """What ComfyUI's calculate_weight (and Forge's merge_lora_to_weight) do per patch: narrow to the rows, call the
    patch with the key's function, discard what it returns for a slice."""
    weights = {k: v.clone() for k, v in weights.items()}
    for key, patch in patches.items():
        name, offset, function = (key, None, None) if isinstance(key, str) else key
        weight = weights[name]
        target = weight if offset is None else weight.narrow(*offset)
        out = patch.calculate_weight(target, name, strength, 1.0, offset, function or (lambda d: d))
        if offset is None:
            weights[name] = out
    return weights


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("strength", [1.0, 0.5, -1.0])
def test_sliced_patches_give_the_lie_model_per_module(family, strength, tmp_path):
    """Every Linear adapted (fused rows, swapped AdaLN rows, taylor modules among them), patched in the checkpoint
    layout, read back per diffusers module: the formula at that strength, and nothing else changed."""
    model = tiny(family)
    modules = list(linears(model))
    adapter = lie_file(model, modules, tmp_path, mode="mixed")
    weights = {f"diffusion_model.{k}": v for k, v in to_checkpoint(model).items()}
    patches = host_patches(adapter, host_key_map(model), weights, strength, UNET, lambda *_: {})
    assert len(patches) == len(modules) and all(isinstance(p, LiePatch) for p in patches.values())
    patched = apply_like_comfyui(weights, patches, strength)
    for entry in adapter.modules:
        slot = checkpoint_slot(entry.module, model.config)
        got = patched[f"diffusion_model.{slot.key}.weight"]
        got = got if slot.rows is None else got.narrow(0, *slot.rows)
        got = swap(got) if slot.swapped else got
        expected = reference(linears(model)[entry.module].weight.detach(), entry, strength)
        assert ((got.double() - expected).abs() <= 2**-22 * (expected.abs() + expected.abs().max())).all(), entry.module
    assert all(torch.equal(patched[k], v) for k, v in weights.items() if not k.endswith(".weight"))


def test_a_fused_rows_patch_leaves_the_other_rows_alone(tmp_path):
    """One module of a fused weight (Flux's proj_mlp in linear1): only its rows change."""
    model = tiny("flux")
    adapter = lie_file(model, ["single_transformer_blocks.0.proj_mlp"], tmp_path)
    weights = {f"diffusion_model.{k}": v for k, v in to_checkpoint(model).items()}
    patched = apply_like_comfyui(weights, host_patches(adapter, host_key_map(model), weights, 1.0, UNET, None), 1.0)
    key, hidden = "diffusion_model.single_blocks.0.linear1.weight", 16
    assert torch.equal(patched[key][:3 * hidden], weights[key][:3 * hidden])
    assert not torch.equal(patched[key][3 * hidden:], weights[key][3 * hidden:])
    assert all(torch.equal(patched[k], v) for k, v in weights.items() if k != key)


def test_host_names_are_diffusers_names():
    flux, sd3 = dict(tiny("flux").config), dict(tiny("sd3").config)
    assert dit_host_name("transformer", "single_transformer_blocks.0.proj_mlp", flux) == \
        "transformer.single_transformer_blocks.0.proj_mlp"
    assert dit_host_name("text_encoder", "encoder.layers.0.self_attn.q_proj", flux) == \
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    assert dit_host_name("text_encoder_2", "encoder.layers.1.mlp.fc2", sd3) == \
        "text_encoder_2.text_model.encoder.layers.1.mlp.fc2"
    with pytest.raises(ValueError, match="text_encoder_2.*T5"):
        dit_host_name("text_encoder_2", "encoder.block.0.layer.0.SelfAttention.q", flux)  # Flux's T5
    with pytest.raises(ValueError, match="SD3 transformer module"):
        dit_host_name("transformer", "single_transformer_blocks.0.proj_mlp", sd3)
    with pytest.raises(ValueError, match="not the config"):
        dit_family({"block_out_channels": [32]})


def test_a_file_that_does_not_fit_is_refused_naming_file_module_and_base(tmp_path):
    """A Flux file on a Flux model of another width, and on an SD3 model: one error, nothing patched."""
    model = tiny("flux")
    wider = FluxTransformer2DModel(**{**FLUX, "attention_head_dim": 16, "axes_dims_rope": (4, 4, 8)})
    adapter = lie_file(model, ["transformer_blocks.0.attn.to_k", "single_transformer_blocks.1.proj_mlp"], tmp_path)
    weights = {f"diffusion_model.{k}": v for k, v in to_checkpoint(wider).items()}
    with pytest.raises(ValueError, match=r"adapter.safetensors: does not fit this model \(the file was saved for a "
                                         r"FLUX transformer of width 16: 2 double-stream and 2 single-stream blocks\): "
                                         r"lie.transformer.single_transformer_blocks.1.proj_mlp: .* do not fit .*to_k"):
        host_patches(adapter, host_key_map(wider), weights, 1.0, UNET, None)
    sd3 = tiny("sd3")
    weights = {f"diffusion_model.{k}": v for k, v in to_checkpoint(sd3).items()}
    with pytest.raises(ValueError, match="the model has no layer transformer.single_transformer_blocks.1.proj_mlp"):
        host_patches(adapter, host_key_map(sd3), weights, 1.0, UNET, None)


def test_a_huge_alpha_on_fused_rows_is_refused(tmp_path):
    model = tiny("flux")
    adapter = lie_file(model, ["transformer_blocks.1.attn.add_v_proj"], tmp_path, alpha=1e30)
    weights = {f"diffusion_model.{k}": v for k, v in to_checkpoint(model).items()}
    with pytest.raises(ValueError, match="adapter.safetensors.*NaN/inf"):
        host_patches(adapter, host_key_map(model), weights, 1.0, UNET, None)


def test_swapped_rows_patch_in_place_through_the_hosts_function():
    """The row order function (swap halves) is applied to W before the update and to ΔW after; a view is
    written in place."""
    entry = ModuleEntry("transformer", "norm_out.linear", "lie", torch.randn(1, 3) * 0.4,
                        torch.arange(4.0).reshape(4, 1) * 0.3, 1.0, mode="exp")
    module_weight = torch.randn(4, 3)
    fused = torch.cat([torch.ones(2, 3), swap(module_weight)])
    LiePatch(entry).calculate_weight(fused.narrow(0, 2, 4), "k", 0.5, 1.0, (0, 2, 4), swap)
    assert torch.equal(fused[:2], torch.ones(2, 3))
    torch.testing.assert_close(swap(fused[2:]).double(), reference(module_weight, entry, 0.5))
    assert math.isfinite(fused.sum().item())


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_export_writes_the_names_the_hosts_map(family, tmp_path):
    """`export` for a transformer: diffusers names (`transformer.<module>`), which the hosts map onto rows of their
    fused weights; applied as ComfyUI applies a kohya file at strength 1 (W + function(ΔW) on the rows), the exact
    export (`.diff`) is the Lie model, and the low-rank one is within the error it reports."""
    from lie_diffusion.export import export_kohya, summary

    model = tiny(family)
    adapter = lie_file(model, list(linears(model)), tmp_path, mode="mixed")
    weights = {f"diffusion_model.{k}": v for k, v in to_checkpoint(model).items()}
    key_map = host_key_map(model)
    for conv in ("exact", "lowrank"):
        tensors, rows = export_kohya(adapter, {"transformer": model}, conv=conv, rank=2 if conv == "lowrank" else None,
                                     dtype=torch.float32)
        assert {key.rsplit(".", 2)[0] if "lora_" in key else key.rsplit(".", 1)[0] for key in tensors} == set(key_map)
        assert summary(rows, "ComfyUI, Forge")["read_by"] == "ComfyUI, Forge"
        patched = {k: v.clone() for k, v in weights.items()}
        for row in rows:
            stem = row.name
            if f"{stem}.diff" in tensors:
                update = tensors[f"{stem}.diff"]
            else:
                down, up = tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"]
                update = (up.flatten(1) @ down.flatten(1)).reshape(-1, *down.shape[1:]) * (
                    tensors[f"{stem}.alpha"].item() / down.shape[0])
            key = key_map[stem]
            name, offset, function = (key, None, None) if isinstance(key, str) else key
            target = patched[name] if offset is None else patched[name].narrow(*offset)
            target += function(update) if function else update
        for entry, row in zip(sorted(adapter.modules, key=lambda e: e.module), sorted(rows, key=lambda r: r.module)):
            slot = checkpoint_slot(entry.module, model.config)
            got = patched[f"diffusion_model.{slot.key}.weight"]
            got = got if slot.rows is None else got.narrow(0, *slot.rows)
            got = swap(got) if slot.swapped else got
            base = linears(model)[entry.module].weight.detach()
            want = reference(base, entry, 1.0)
            error = ((got.double() - want).norm() / (want - base.double()).norm()).item()
            assert error <= (1e-6 if conv == "exact" else row.rel_error + 1e-6), entry.module


def test_export_cli_on_a_flux_pipeline_folder(tmp_path, capsys):
    """`lie-diffusion export` loads a Flux pipeline's transformer as the base and says who reads the result."""
    from safetensors import safe_open

    from lie_diffusion import LieConfig, add_lie_adapters, save_lie_weights
    from lie_diffusion.cli import main
    from lie_diffusion.export import load_models
    from lie_diffusion.tiny import build_tiny_pipeline

    base = build_tiny_pipeline(tmp_path / "flux", "flux")
    transformer = load_models(base, ("transformer",))["transformer"]
    assert type(transformer).__name__ == "FluxTransformer2DModel"
    add_lie_adapters(transformer, LieConfig(rank=2))
    with torch.no_grad():
        for key, parameter in transformer.named_parameters():
            if "lora_B" in key:
                parameter.normal_(0, 0.1)
    path = save_lie_weights(tmp_path / "adapter", transformer=transformer)
    output = tmp_path / "exported.safetensors"
    assert main(["export", str(path), "--base", str(base), "--output", str(output)]) == 0
    with safe_open(str(output), framework="pt") as file:
        keys = list(file.keys())
    assert keys and all(key.startswith("transformer.") for key in keys)
    assert "Read by: ComfyUI, Forge" in capsys.readouterr().out


def test_forge_calculator_applies_the_row_order_the_patch_carries():
    """Forge hands extra_weight_calculators only (weight, strength, patch), no row order: the extension's patch
    carries the one from the key map."""
    from lie_diffusion.integrations.forge import PATCH_TYPE, calculate, lie_patch

    entry = ModuleEntry("transformer", "norm_out.linear", "lie", torch.randn(1, 3) * 0.4,
                        torch.arange(4.0).reshape(4, 1) * 0.3, 1.0, mode="exp")
    module_weight = torch.randn(4, 3)
    held = swap(module_weight)  # the host's order
    kind, patch = lie_patch(entry, swap)
    assert kind == PATCH_TYPE and patch.layout is swap
    calculate(held, -1.0, patch)
    torch.testing.assert_close(swap(held).double(), reference(module_weight, entry, -1.0))
