"""Adapter files: round trips, the file layout, stock-diffusers compatibility, merging, and bad input.

References are computed from the formula on the file's own tensors, not through lie_diffusion.
Helpers here (`tiny_pipeline`, `make_adapter`, `outputs`) are shared with test_pipelines / test_cli.
"""

import copy
import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

import lie_diffusion.io as lie_io
from lie_diffusion import (
    LieConfig,
    add_lie_adapters,
    load_lie_weights,
    merge_lie_weights,
    read_lie_file,
    save_lie_weights,
)
from lie_diffusion.io import HASH_KEY, content_hash
from lie_diffusion.layers import LieLayerMixin
from lie_diffusion.tiny import tiny_text_encoder, tiny_unet, tiny_vae

TOL = 1e-4
CONV = "down_blocks.0.resnets.0.conv1"
LINEAR = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def tiny_pipeline(kind: str = "sd1") -> StableDiffusionPipeline:
    """A fresh StableDiffusionPipeline from configs (same weights every call; no disk, no tokenizer)."""
    return StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=tiny_text_encoder(),
        tokenizer=None,
        unet=tiny_unet(kind),
        scheduler=DDPMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def randomize_adapters(model, seed: int) -> None:
    """Adapters start as the identity (B = 0); give every factor values so that they act."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def make_adapter(directory, unet_config=None, text_encoder_config=None, overrides=None, seed=0, kind="sd1"):
    """Adapt a fresh tiny pipeline with random factors and save it; returns (pipeline, file path)."""
    pipe = tiny_pipeline(kind)
    add_lie_adapters(pipe.unet, unet_config or LieConfig(), overrides=overrides)
    randomize_adapters(pipe.unet, seed)
    if text_encoder_config is not None:
        add_lie_adapters(pipe.text_encoder, text_encoder_config)
        randomize_adapters(pipe.text_encoder, seed + 1)
    path = save_lie_weights(directory, pipe.unet, pipe.text_encoder if text_encoder_config else None)
    return pipe, path


_gen = torch.Generator().manual_seed(1234)
SAMPLE, TOKENS = torch.randn(1, 4, 16, 16, generator=_gen), torch.randint(0, 1000, (1, 8), generator=_gen)


@torch.no_grad()
def outputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """(text-encoder hidden states, UNet noise prediction) on fixed inputs."""
    hidden = pipe.text_encoder(TOKENS)[0]
    return hidden, pipe.unet(SAMPLE, 10, hidden).sample


def max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def conv_lie_reference(conv, x, factors):
    """F.conv2d with W ⊙ exp(Σ sᵢ reshape(Bᵢ Aᵢ)): the group update written out from the formula."""
    algebra = sum(s * (B.flatten(1) @ A.flatten(1)).reshape(conv.weight.shape) for A, B, s in factors)
    return F.conv2d(x, conv.weight * algebra.exp(), conv.bias, conv.stride, conv.padding)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A pipeline with Lie convs (one rank override), LoRA attention and a LoRA text encoder; saved once."""
    pipe, path = make_adapter(
        tmp_path_factory.mktemp("adapter"),
        unet_config=LieConfig(rank=4, alpha=8, attn_rank=2, balance="none"),  # alphas as written, for the checks
        text_encoder_config=LieConfig(rank=2, alpha=1),
        overrides={"mid_block.resnets.0.conv1": (8, 2.0)},
    )
    return SimpleNamespace(pipe=pipe, path=path, dir=path.parent, outputs=outputs(pipe))


@pytest.fixture(scope="module")
def base_outputs():
    return outputs(tiny_pipeline())


# ------------------------------------------------------------------------------------------ round trips


def test_round_trip_reproduces_outputs(adapter, base_outputs):
    pipe = tiny_pipeline()
    load_lie_weights(pipe, adapter.dir)
    assert max_diff(outputs(pipe), adapter.outputs) <= TOL
    assert max_diff(adapter.outputs, base_outputs) > 1e-3  # the adapter does something


def test_file_layout_and_metadata(adapter):
    with safe_open(str(adapter.path), framework="pt") as file:
        header, keys = file.metadata(), list(file.keys())
        dtypes = {file.get_tensor(k).dtype for k in keys}
    lie_modules = {n for n, m in adapter.pipe.unet.named_modules() if isinstance(m, LieLayerMixin)}
    lora_modules = {n for n, m in adapter.pipe.unet.named_modules() if isinstance(m, LoraLayer)} - lie_modules
    assert all("lora" in k for k in keys)  # stock diffusers refuses files with any other key
    assert {k.removeprefix("lie.unet.").rsplit(".lora_", 1)[0] for k in keys if k.startswith("lie.")} == lie_modules
    assert {k.removeprefix("unet.").rsplit(".lora_", 1)[0] for k in keys if k.startswith("unet.")} == lora_modules
    assert all(isinstance(adapter.pipe.unet.get_submodule(m).get_base_layer(), torch.nn.Conv2d) for m in lie_modules)
    assert any(k.startswith("text_encoder.") for k in keys) and dtypes == {torch.float32}

    assert header["format"] == "pt"
    info = json.loads(header["lie_diffusion"])
    assert (info["format_version"], info["mode"], info["rank"], info["alpha"]) == (1, "exp", 4, 8.0)
    assert info["overrides"]["unet.mid_block.resnets.0.conv1"] == {"rank": 8, "alpha": 2.0}
    assert info["overrides"][f"unet.{LINEAR}"] == {"rank": 2}
    assert sorted(info["targets"]["unet"]["lie"]) == sorted(lie_modules)
    assert info["fingerprint"]["unet"]["cross_attention_dim"] == 32
    assert info["fingerprint"]["unet"]["block_out_channels"] == [32, 64]

    lora_meta = json.loads(header["lora_adapter_metadata"])
    unet_kwargs = {k.removeprefix("unet."): v for k, v in lora_meta.items() if k.startswith("unet.")}
    config = LoraConfig(**unet_kwargs)  # what stock diffusers builds from it
    assert (config.r, config.lora_alpha, set(config.target_modules)) == (2, 8.0, lora_modules)
    assert lora_meta["text_encoder.r"] == 2 and lora_meta["text_encoder.lora_alpha"] == 1.0


def test_half_precision_model_saves_exact_fp32_factors(tmp_path):
    unet = tiny_unet()
    add_lie_adapters(unet, LieConfig(rank=2))
    randomize_adapters(unet, 3)
    unet.to(torch.bfloat16)
    tensors = load_file(save_lie_weights(tmp_path, unet))
    layer = unet.get_submodule(CONV)
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert torch.equal(tensors[f"lie.unet.{CONV}.lora_B.weight"], layer.lora_B["default"].weight.float())
    fresh = tiny_unet().to(torch.bfloat16)
    load_lie_weights(fresh, tmp_path)
    assert torch.equal(fresh.get_submodule(CONV).lora_B["default"].weight, layer.lora_B["default"].weight)


def test_failed_save_keeps_the_previous_file(adapter, tmp_path, monkeypatch):
    path = save_lie_weights(tmp_path, adapter.pipe.unet)
    before = path.read_bytes()

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(lie_io.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        save_lie_weights(tmp_path, adapter.pipe.unet, adapter.pipe.text_encoder)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_saved_file_gets_the_usual_permissions(adapter, tmp_path):
    """Atomic saves go through a private temporary file; the result must still be readable like any file."""
    umask = os.umask(0o022)
    try:
        save_lie_weights(tmp_path, adapter.pipe.unet, adapter.pipe.text_encoder)
    finally:
        os.umask(umask)
    assert (tmp_path / "pytorch_lora_weights.safetensors").stat().st_mode & 0o777 == 0o644


def test_save_refuses_unknown_adapter_and_nan(adapter, tmp_path):
    with pytest.raises(ValueError, match="No adapter named 'other'"):
        save_lie_weights(tmp_path, adapter.pipe.unet, adapter_name="other")
    unet = copy.deepcopy(adapter.pipe.unet)
    with torch.no_grad():
        unet.get_submodule(CONV).lora_A["default"].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"lie\.unet\.{CONV}\.lora_A\.weight holds 1 NaN/inf"):
        save_lie_weights(tmp_path, unet)
    assert not any(tmp_path.iterdir())


def test_lie_attention_taylor_mode_round_trip(tmp_path):
    source, path = make_adapter(tmp_path, unet_config=LieConfig(rank=3, mode="taylor", attn_adapter="lie"), seed=5)
    pipe = tiny_pipeline()
    load_lie_weights(pipe, path)
    assert isinstance(pipe.unet.get_submodule(LINEAR), LieLayerMixin)
    assert pipe.unet.get_submodule(CONV).lie_mode["default"] == "taylor"
    assert max_diff(outputs(pipe), outputs(source)) <= TOL


def test_sdxl_unet_round_trip(tmp_path):
    unet = tiny_unet("sdxl")
    add_lie_adapters(unet, LieConfig(rank=4, alpha=2))
    randomize_adapters(unet, 7)
    save_lie_weights(tmp_path, unet=unet)
    fresh = tiny_unet("sdxl")
    load_lie_weights(fresh, tmp_path / "pytorch_lora_weights.safetensors")
    hidden = torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(0))
    extra = {"text_embeds": torch.zeros(1, 32), "time_ids": torch.ones(1, 6)}
    with torch.no_grad():
        expected, got = (m(SAMPLE, 10, hidden, added_cond_kwargs=extra).sample for m in (unet, fresh))
    assert (expected - got).abs().max().item() <= TOL


def test_plain_lora_file_from_stock_diffusers_loads(tmp_path):
    source = tiny_pipeline()
    source.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    source.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=1, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(source.unet, 11)
    randomize_adapters(source.text_encoder, 12)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=get_peft_model_state_dict(source.unet),
        # the `text_model.` layout of files written with transformers 4
        text_encoder_lora_layers={
            f"text_model.{k}": v for k, v in get_peft_model_state_dict(source.text_encoder).items()
        },
        unet_lora_adapter_metadata=source.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=source.text_encoder.peft_config["default"].to_dict(),
    )
    pipe = tiny_pipeline()
    load_lie_weights(pipe, tmp_path)
    assert max_diff(outputs(pipe), outputs(source)) <= TOL  # alphas 8 and 1 (not the ranks) came from the metadata


# -------------------------------------------------------------------------------------- stock diffusers


def test_stock_diffusers_loads_exactly_the_lora_section(adapter):
    stock = tiny_pipeline()
    stock.load_lora_weights(adapter.dir)
    adapted = {n for n, m in stock.unet.named_modules() if isinstance(m, LoraLayer)}
    assert adapted and all(isinstance(stock.unet.get_submodule(n).get_base_layer(), torch.nn.Linear) for n in adapted)

    attention_only = copy.deepcopy(adapter.pipe)  # the saved model with its Lie part switched to the identity
    with torch.no_grad():
        for module in attention_only.unet.modules():
            if isinstance(module, LieLayerMixin):
                module.lora_B["default"].weight.zero_()
    assert max_diff(outputs(stock), outputs(attention_only)) <= TOL
    assert max_diff(outputs(stock), adapter.outputs) > 1e-3  # the Lie section was not misread as LoRA


def _stock_saved(directory, pipe, metadata: bool):
    """What diffusers' training scripts do: peft's state dict → save_lora_weights (with or without metadata)."""
    StableDiffusionPipeline.save_lora_weights(
        directory,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict() if metadata else None,
    )


@pytest.mark.parametrize("metadata", [False, True], ids=["no-metadata", "metadata"])
def test_stock_diffusers_save_then_load_of_lie_adapters_fails_loudly(adapter, base_outputs, tmp_path, metadata):
    """diffusers' own save/load of a Lie-adapted UNet never gives an additive model: it raises, and the
    pipeline stays the base model."""
    _stock_saved(tmp_path, adapter.pipe, metadata)
    stock = tiny_pipeline()
    match = "lie_diffusion" if metadata else "size mismatch"
    with pytest.raises((RuntimeError, TypeError)) as raised:
        stock.load_lora_weights(tmp_path)
    assert match in str(raised.value) + str(raised.value.__cause__)
    assert not any(isinstance(m, LoraLayer) and m.lora_A for m in stock.unet.modules())
    assert max_diff(outputs(stock), base_outputs) == 0


def test_stock_diffusers_model_level_save_lora_adapter_fails_loudly(adapter, tmp_path):
    adapter.pipe.unet.save_lora_adapter(tmp_path)
    with pytest.raises(TypeError) as raised:
        tiny_unet("sd1").load_lora_adapter(tmp_path, prefix=None, use_safetensors=True)
    assert "lie_diffusion" in str(raised.value.__cause__)


def test_load_lie_weights_names_the_route_for_a_stock_saved_lie_file(adapter, tmp_path):
    _stock_saved(tmp_path, adapter.pipe, metadata=False)
    with pytest.raises(ValueError, match="save_lie_weights"):
        load_lie_weights(tiny_pipeline(), tmp_path)
    recovered = tiny_pipeline()  # the recovery the message describes
    add_lie_adapters(recovered.unet, LieConfig(rank=4, alpha=8, attn_rank=2, balance="none"),
                     overrides={"mid_block.resnets.0.conv1": (8, 2.0)})
    state = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    set_peft_model_state_dict(recovered.unet, {k.removeprefix("unet."): v for k, v in state.items()})
    with torch.no_grad():
        hidden = recovered.text_encoder(TOKENS)[0]  # the UNets' own text encoders differ (adapter's has LoRA)
        want, got = (unet(SAMPLE, 10, hidden).sample for unet in (adapter.pipe.unet, recovered.unet))
    assert torch.equal(got, want)


def test_stock_diffusers_ignores_a_lie_only_file(tmp_path):
    _, path = make_adapter(tmp_path, unet_config=LieConfig(attn_adapter="none"))
    stock = tiny_pipeline()
    stock.load_lora_weights(tmp_path)
    assert not any(isinstance(m, LoraLayer) for m in stock.unet.modules())
    assert not any(k.startswith("unet.") for k in load_file(path))


# --------------------------------------------------------------------------------------- named adapters


def test_named_adapters_compose_in_the_algebra(tmp_path):
    _, path_a = make_adapter(tmp_path / "a", unet_config=LieConfig(rank=4, alpha=2, balance="none"), seed=1)
    _, path_b = make_adapter(tmp_path / "b", unet_config=LieConfig(rank=2, alpha=4, balance="none"), seed=2)
    pipe = tiny_pipeline()
    load_lie_weights(pipe, path_a, adapter_name="a")
    load_lie_weights(pipe, path_b, adapter_name="b", scale=3.0)
    assert pipe.get_list_adapters() == {"unet": ["a", "b"]}
    pipe.set_adapters(["a", "b"], [1.0, 0.5])

    a, b = load_file(path_a), load_file(path_b)
    conv = pipe.unet.get_submodule(CONV)
    x = torch.randn(1, 32, 16, 16, generator=torch.Generator().manual_seed(0))
    factors = [
        (f[f"lie.unet.{CONV}.lora_A.weight"], f[f"lie.unet.{CONV}.lora_B.weight"], s)
        for f, s in ((a, 2 / 4), (b, 0.5 * 4 / 2))
    ]
    with torch.no_grad():
        assert (conv(x) - conv_lie_reference(conv.get_base_layer(), x, factors)).abs().max().item() <= TOL

    linear = pipe.unet.get_submodule(LINEAR)
    h = torch.randn(2, 32, generator=torch.Generator().manual_seed(1))
    base = linear.get_base_layer()
    expected = F.linear(h, base.weight, base.bias)
    for f, s in ((a, 2 / 4), (b, 0.5 * 4 / 2)):
        expected = expected + s * h @ f[f"unet.{LINEAR}.lora_A.weight"].T @ f[f"unet.{LINEAR}.lora_B.weight"].T
    with torch.no_grad():
        assert (linear(h) - expected).abs().max().item() <= TOL


def test_scale_argument_matches_set_adapters(adapter):
    scaled, reference = tiny_pipeline(), tiny_pipeline()
    load_lie_weights(scaled, adapter.dir, adapter_name="x", scale=0.5)
    load_lie_weights(reference, adapter.dir, adapter_name="x")
    reference.set_adapters(["x"], [0.5])
    assert max_diff(outputs(scaled), outputs(reference)) <= 1e-6


def test_warnings_for_other_components_and_other_base(adapter):
    unet = tiny_unet()
    with pytest.warns(UserWarning, match=r"no \['text_encoder'\]"):
        load_lie_weights(unet, adapter.path)
    with pytest.warns(UserWarning, match="different config.*use_linear_projection"):
        load_lie_weights(tiny_pipeline("sd2"), adapter.path)  # same shapes, other base: loads, but says so


# ------------------------------------------------------------------------------------------------ merge


def test_merge_then_stock_reload_reproduces_outputs(adapter, tmp_path):
    pipe = copy.deepcopy(adapter.pipe)
    merge_lie_weights(pipe)
    assert not any(isinstance(m, LoraLayer) for c in (pipe.unet, pipe.text_encoder) for m in c.modules())
    pipe.unet.save_pretrained(tmp_path / "unet")
    pipe.text_encoder.save_pretrained(tmp_path / "text_encoder")
    reloaded = SimpleNamespace(
        unet=UNet2DConditionModel.from_pretrained(tmp_path / "unet"),
        text_encoder=CLIPTextModel.from_pretrained(tmp_path / "text_encoder"),
    )
    assert max_diff(outputs(reloaded), adapter.outputs) <= TOL


# -------------------------------------------------------------------------------------------- bad input


def _rewrite(source, target, edit_tensors=None, edit_info=None):
    """Copy an adapter file with its tensors and/or `lie_diffusion` metadata edited."""
    tensors = load_file(source)
    with safe_open(str(source), framework="pt") as file:
        header = file.metadata()
    if edit_tensors:
        edit_tensors(tensors)
    if edit_info:
        info = json.loads(header["lie_diffusion"])
        edit_info(info)
        header["lie_diffusion"] = json.dumps(info)
    if HASH_KEY in header:  # a consistent hand edit: the checks after the hash's are what these files test
        header[HASH_KEY] = content_hash(tensors)
    save_file(tensors, target, metadata=header)
    return target


def _rename_module(tensors, old, new):
    """Move a module's factors to another module name (or drop them: new=None)."""
    for key in [k for k in tensors if f".{old}." in k]:
        factor = tensors.pop(key)
        if new is not None:
            tensors[key.replace(old, new)] = factor


def _bad_missing(src, d):
    return d / "nope"


def _bad_not_safetensors(src, d):
    (d / "notes.safetensors").write_text("this is not a safetensors file")
    return d / "notes.safetensors"


def _bad_truncated(src, d):
    (d / "cut.safetensors").write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return d / "cut.safetensors"


def _bad_version(src, d):
    return _rewrite(src, d / "v99.safetensors", edit_info=lambda info: info.update(format_version=99))


def _bad_module(src, d):
    def edit_info(info):
        names = info["targets"]["unet"]["lie"]
        names[names.index(CONV)] = "down_blocks.7.resnets.0.conv1"

    return _rewrite(
        src, d / "module.safetensors", lambda t: _rename_module(t, CONV, "down_blocks.7.resnets.0.conv1"), edit_info
    )


def _bad_nan(src, d):
    def poison(tensors):
        tensors[f"lie.unet.{CONV}.lora_B.weight"].view(-1)[3] = float("inf")

    return _rewrite(src, d / "nan.safetensors", poison)


def _bad_alpha_overflow(src, d):
    """exp(sΔ) overflows float32: every factor is finite, only the adapted weight is not."""
    return _rewrite(src, d / "alpha.safetensors", edit_info=lambda info: info.update(alpha=1e30))


def _bad_huge_factor(src, d):
    def corrupt(tensors):
        tensors[f"lie.unet.{CONV}.lora_A.weight"].view(-1)[5] = 3e38

    return _rewrite(src, d / "huge.safetensors", corrupt)


def _bad_partner(src, d):
    return _rewrite(src, d / "partner.safetensors", lambda t: t.pop(f"lie.unet.{CONV}.lora_B.weight"))


def _bad_lost_module(src, d):
    return _rewrite(src, d / "lost.safetensors", lambda t: _rename_module(t, CONV, None))


BAD_INPUTS = {
    "missing path": (_bad_missing, FileNotFoundError, "no such file"),
    "not safetensors": (_bad_not_safetensors, ValueError, "not a readable safetensors file"),
    "truncated": (_bad_truncated, ValueError, "not a readable safetensors file"),
    "unknown format_version": (_bad_version, ValueError, "unknown lie_diffusion format_version 99"),
    "module the model lacks": (_bad_module, ValueError, r"unet has no module 'down_blocks\.7\.resnets\.0\.conv1'"),
    "NaN/inf": (_bad_nan, ValueError, rf"lie\.unet\.{CONV}\.lora_B\.weight holds 1 NaN/inf"),
    "exp overflow (alpha 1e30)": (_bad_alpha_overflow, ValueError, r"lie\.unet\.[\w.]+: the adapted weight .* NaN/inf"),
    "huge finite factor": (_bad_huge_factor, ValueError, rf"lie\.unet\.{CONV}: the adapted weight .* NaN/inf"),
    "partner factor missing": (_bad_partner, ValueError, rf"lie\.unet\.{CONV}\.lora_A\.weight has no partner"),
    "module's factors missing": (
        _bad_lost_module,
        ValueError,
        rf"metadata lists lie\.unet\.{CONV} but the file has no",
    ),
}


@pytest.fixture(scope="module")
def victim():
    """One pipeline shared by every bad-input case: each must leave it exactly as it was."""
    pipe = tiny_pipeline()
    return SimpleNamespace(pipe=pipe, outputs=outputs(pipe))


def assert_untouched(victim, state):
    pipe = victim.pipe
    for name in ("unet", "text_encoder"):
        model = getattr(pipe, name)
        assert getattr(model, "peft_config", None) is None
        assert not any(isinstance(m, LoraLayer) for m in model.modules())
        now = model.state_dict()
        assert now.keys() == state[name].keys()
        assert all(torch.equal(now[k], v) for k, v in state[name].items())
        assert all(p.requires_grad for p in model.parameters())
    assert max_diff(outputs(pipe), victim.outputs) == 0


def _state(pipe):
    return {
        name: {k: v.clone() for k, v in getattr(pipe, name).state_dict().items()} for name in ("unet", "text_encoder")
    }


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_and_pipeline_unchanged(case, adapter, victim, tmp_path):
    make_bad, error, message = BAD_INPUTS[case]
    path = make_bad(adapter.path, tmp_path)
    state = _state(victim.pipe)
    with pytest.raises(error, match=message) as info:
        load_lie_weights(victim.pipe, path)
    assert str(path) in str(info.value)
    assert_untouched(victim, state)


def test_finiteness_check_bounds_first_and_skips_offloaded_weights():
    """Sound factors pass on the cheap bound; huge ones are checked element by element, also against a
    half-precision weight's range; a weight without values (meta) is not checked."""
    A, B = torch.full((1, 3), 2.0), torch.full((4, 1), 2.0)
    entry = lie_io.ModuleEntry("unet", "m", "lie", A, B, alpha=1.0, mode="exp")  # Δ = 4 everywhere
    weight = torch.full((4, 3), 1000.0)
    lie_io.check_adapted_finite("f", entry, weight)  # 1000·e⁴ ≈ 5.5e4 fits float32
    with pytest.raises(ValueError, match=r"f: lie\.unet\.m: .* 12 NaN/inf value\(s\) in torch.float16 at strength 2"):
        lie_io.check_adapted_finite("f", entry, weight.half(), scale=2.0)  # 1000·e⁸ overflows fp16
    lie_io.check_adapted_finite("f", entry, weight.to("meta"), scale=1e6)


def test_file_for_another_base_model_names_shapes_and_config(victim, tmp_path):
    unet = tiny_unet("sdxl")
    add_lie_adapters(unet, LieConfig())
    path = save_lie_weights(tmp_path, unet=unet)
    state = _state(victim.pipe)
    with pytest.raises(ValueError) as info:
        load_lie_weights(victim.pipe, path)
    message = str(info.value)
    assert str(path) in message and "do not fit Linear (32, 32) (expected (4, 32), (32, 4))" in message
    assert "saved for another base model" in message and "cross_attention_dim 64 (file) vs 32 (model)" in message
    assert_untouched(victim, state)


def test_failure_mid_injection_rolls_back(adapter, victim, monkeypatch):
    real = lie_io.add_lie_adapters

    def fail_on_text_encoder(model, *args, **kwargs):
        if isinstance(model, CLIPTextModel):
            raise RuntimeError("boom")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(lie_io, "add_lie_adapters", fail_on_text_encoder)
    state = _state(victim.pipe)
    with pytest.raises(RuntimeError, match="boom"):
        load_lie_weights(victim.pipe, adapter.path)
    assert_untouched(victim, state)


def test_adapter_name_in_use_is_refused(adapter):
    pipe = tiny_pipeline()
    load_lie_weights(pipe, adapter.path, adapter_name="style")
    with pytest.raises(ValueError, match="already has an adapter named 'style'"):
        load_lie_weights(pipe, adapter.path, adapter_name="style")
    assert pipe.get_list_adapters() == {"unet": ["style"], "text_encoder": ["style"]}


def test_read_lie_file_describes_without_a_model(adapter):
    parsed = read_lie_file(adapter.dir)
    assert parsed.path == adapter.path and parsed.components == ["unet", "text_encoder"]
    override = next(m for m in parsed.modules if m.module == "mid_block.resnets.0.conv1")
    assert (override.section, override.rank, override.alpha, override.mode) == ("lie", 8, 2.0, "exp")


# ------------------------------------------------------------------------------------------ balancing rule


def _rewrite_lie_metadata(path, edit) -> None:
    """Rewrite a file with its `lie_diffusion` metadata changed by `edit(info)` (e.g. as an older writer made it)."""
    with safe_open(str(path), framework="pt") as file:
        header = file.metadata()
    info = json.loads(header["lie_diffusion"])
    edit(info)
    save_file(load_file(path), path, metadata={**header, "lie_diffusion": json.dumps(info)})


def test_balanced_file_stores_its_alphas_and_reloads_them_without_balancing_again(tmp_path):
    pipe, path = make_adapter(tmp_path / "adapter", unet_config=LieConfig(rank=4, alpha=2))  # default: rms
    rms = pipe.unet.get_submodule(CONV).get_base_layer().weight.double().pow(2).mean().sqrt().item()
    parsed = read_lie_file(path)
    assert parsed.info["balance"] == "rms"
    alphas = {m.ref: m.alpha for m in parsed.modules}
    assert alphas[f"unet.{CONV}"] == pytest.approx(2 / rms)
    assert alphas[f"unet.{LINEAR}"] == 2.0  # LoRA attention keeps alpha / rank

    fresh = tiny_pipeline()
    load_lie_weights(fresh, path)
    assert max_diff(outputs(fresh), outputs(pipe)) <= TOL
    # Another base (this kernel doubled): the file's alpha is used as stored, never recomputed from the new W.
    other = tiny_pipeline()
    with torch.no_grad():
        other.unet.get_submodule(CONV).weight.mul_(2)
    load_lie_weights(other, path)
    assert other.unet.get_submodule(CONV).scaling["default"] == pytest.approx(2 / rms / 4)
    # Saving the loaded adapter again writes the same alphas and the rule's name.
    again = read_lie_file(save_lie_weights(tmp_path / "again", fresh.unet, fresh.text_encoder))
    assert again.info["balance"] == "rms" and {m.ref: m.alpha for m in again.modules} == alphas


def test_files_written_before_the_balancing_rule_load_as_before(tmp_path):
    pipe, path = make_adapter(tmp_path, unet_config=LieConfig(rank=4, alpha=2, balance="none"))
    _rewrite_lie_metadata(path, lambda info: info.pop("balance"))
    fresh = tiny_pipeline()
    load_lie_weights(fresh, path)
    assert fresh.unet.get_submodule(CONV).scaling["default"] == 0.5  # alpha / rank
    assert max_diff(outputs(fresh), outputs(pipe)) <= TOL


def test_unknown_balance_rule_in_a_file_is_refused(tmp_path):
    _, path = make_adapter(tmp_path)
    _rewrite_lie_metadata(path, lambda info: info.update(balance="max"))
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match=r"unknown balance 'max'"):
        load_lie_weights(pipe, path)
    assert not any(isinstance(m, LoraLayer) for m in pipe.unet.modules())
