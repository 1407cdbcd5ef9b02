"""lie_diffusion.kohya without sd-scripts: kohya's models are stood in for by tiny diffusers models.

sd-scripts' SD 1.x/2.x UNet has diffusers' module names, so a tiny diffusers UNet stands in for it; its SDXL
UNet has SGM names, so the SDXL stand-in is a module tree with SGM names holding the tiny diffusers SDXL UNet's
own layers (adapting one adapts the other). tests/test_hosts_kohya.py runs the same against sd-scripts itself.
"""

import copy
import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lie_diffusion import LieConfig, load_lie_weights, read_lie_file
from lie_diffusion.inject import find_targets
from lie_diffusion.io import HASH_KEY, content_hash
from lie_diffusion.kohya import (KOHYA_FINGERPRINTS, LieNetwork, create_network, create_network_from_weights,
                                 parse_network_args, unet_layout)
from lie_diffusion.naming import kohya_name, module_of_kohya_name, unet_name_to_sgm
from lie_diffusion.tiny import tiny_text_encoder, tiny_unet

MULTIPLIERS = (1.0, 0.5, -1.0)


def sgm_stand_in(unet: nn.Module) -> nn.Module:
    """kohya's SDXL UNet as far as the network sees it: SGM module names, the same layer objects."""
    root = nn.Module()
    for name, layer in unet.named_modules():
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            continue
        *path, leaf = unet_name_to_sgm(name, unet.config).split(".")
        parent = root
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, layer)
    root.config = unet.config
    return root


@pytest.fixture
def sd1():
    torch.manual_seed(0)
    unet, te = tiny_unet("sd1"), tiny_text_encoder()
    return unet, te, copy.deepcopy(unet), copy.deepcopy(te)


def _inputs(unet, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 7, unet.config.cross_attention_dim, generator=generator)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled, generator=generator),
                                       "time_ids": torch.randn(2, 6, generator=generator)}
    return (x, torch.tensor([10, 500]), context), kwargs


def _run(unet, seed=1):
    args, kwargs = _inputs(unet, seed)
    with torch.no_grad():
        return unet(*args, **kwargs).sample


def _randomize(network: LieNetwork, seed=2, std=0.2):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def _expected(weight, down, up, s, mode):
    """W' from the formula, in float64: W ⊙ exp(sΔ) / W ⊙ (1 + sΔ) (Lie), W + s·BA (LoRA, mode None)."""
    delta = (up.double().flatten(1) @ down.double().flatten(1)).reshape(weight.shape) * s
    weight = weight.double()
    if mode is None:
        return weight + delta
    return weight * (delta.exp() if mode == "exp" else 1 + delta)


def _layer_output_vs_formula(module, t):
    """The adapted layer's output vs F.linear / F.conv2d with W' from `_expected`."""
    layer = module.layer
    generator = torch.Generator().manual_seed(3)
    if isinstance(layer, nn.Conv2d):
        x = torch.randn(1, layer.in_channels, 6, 6, generator=generator, dtype=torch.float64)
    else:
        x = torch.randn(2, layer.in_features, generator=generator, dtype=torch.float64)
    expected_weight = _expected(layer.weight.detach(), module.down.detach(), module.up.detach(),
                                t * module.alpha_value / module.rank, module.mode)
    bias = None if layer.bias is None else layer.bias.detach().double()
    if isinstance(layer, nn.Conv2d):
        expected = F.conv2d(x, expected_weight, bias, layer.stride, layer.padding, layer.dilation)
    else:
        expected = F.linear(x, expected_weight, bias)
    with torch.no_grad():
        actual = layer(x.float()).double()
    return (actual - expected).abs().max().item() / expected.abs().max().item()


# ------------------------------------------------------------------------------------------ names


SDXL_NAMES = {  # full-size SDXL, as kohya's SDXL UNet names its modules (hand-written from the SGM layout)
    "down_blocks.0.resnets.0.conv1": "input_blocks_1_0_in_layers_2",
    "down_blocks.0.downsamplers.0.conv": "input_blocks_3_0_op",
    "down_blocks.1.resnets.0.conv_shortcut": "input_blocks_4_0_skip_connection",
    "down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k": "input_blocks_5_1_transformer_blocks_1_attn2_to_k",
    "mid_block.resnets.1.conv2": "middle_block_2_out_layers_3",
    "mid_block.attentions.0.transformer_blocks.9.attn1.to_out.0": "middle_block_1_transformer_blocks_9_attn1_to_out_0",
    "up_blocks.0.upsamplers.0.conv": "output_blocks_2_2_conv",
    "up_blocks.1.attentions.2.proj_out": "output_blocks_5_1_proj_out",
    "up_blocks.2.resnets.2.time_emb_proj": "output_blocks_8_0_emb_layers_1",
    None: "output_blocks_8_3_conv",  # an SGM block has no fourth part: refused
}


@pytest.mark.parametrize("module, sgm", SDXL_NAMES.items())
def test_sdxl_names_both_ways_match_kohyas_sgm_names(module, sgm):
    layout = KOHYA_FINGERPRINTS["sdxl"]
    if module is None:
        with pytest.raises(ValueError, match=f"lora_unet_{sgm}: not a kohya name of an SDXL UNet"):
            module_of_kohya_name(f"lora_unet_{sgm}", layout)
        return
    assert kohya_name("unet", module, layout) == f"lora_unet_{sgm}"
    assert module_of_kohya_name(f"lora_unet_{sgm}", layout) == ("unet", module)


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_every_kohya_name_maps_back_to_its_module(kind):
    """Both ways for every Linear/Conv2d of the UNet (and SGM names for SD too) and the text encoders' projections."""
    unet = tiny_unet(kind)
    config = unet.config
    modules = [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert len(modules) > 50
    for module in modules:
        for sgm in (False, True):
            stem = kohya_name("unet", module, config, sgm_unet=sgm)
            assert module_of_kohya_name(stem, config) == ("unet", module), stem
    encoders = ("text_encoder", "text_encoder_2") if kind == "sdxl" else ("text_encoder",)
    for component in encoders:
        for layer in range(2):
            for part in ("self_attn.q_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"):
                module = f"text_model.encoder.layers.{layer}.{part}"
                stem = kohya_name(component, module, config)
                assert stem.startswith({"text_encoder": "lora_te1_" if kind == "sdxl" else "lora_te_",
                                        "text_encoder_2": "lora_te2_"}[component])
                assert module_of_kohya_name(stem, config) == (component, module)


def test_sd1_names_are_diffusers_names_and_bad_names_are_refused():
    layout = KOHYA_FINGERPRINTS["sd1"]
    stem = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0"
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"
    assert module_of_kohya_name(stem, layout) == ("unet", module)
    assert module_of_kohya_name("lora_unet_up_blocks_1_resnets_2_conv_shortcut", layout)[1] == \
        "up_blocks.1.resnets.2.conv_shortcut"
    for bad in ("lora_unet_no_such_block", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                "lora_te_text_model_embeddings_token_embedding", "lora_unet_input_blocks_99_0_in_layers_2"):
        with pytest.raises(ValueError, match=bad):
            module_of_kohya_name(bad, layout)


# ------------------------------------------------------------------------------------------ network_args


def test_network_args_are_parsed_from_strings():
    args = parse_network_args({"conv_dim": "8", "conv_alpha": "0.5", "attn": "lie", "mode": "taylor",
                               "balance": "none", "dropout": None, "rank_dropout": "0.1", "module_dropout": "0"})
    assert args == {"conv_dim": 8, "conv_alpha": 0.5, "attn": "lie", "mode": "taylor", "balance": "none",
                    "rank_dropout": 0.1, "module_dropout": 0.0}


@pytest.mark.parametrize("kwargs, message", [
    ({"algo": "locon"}, "unknown network_args algo"),
    ({"conv_dim": "abc"}, r"conv_dim='abc': expected a positive integer"),
    ({"conv_dim": "0"}, r"conv_dim='0': expected a positive integer"),
    ({"conv_alpha": "nan"}, r"conv_alpha='nan': expected a finite number"),
    ({"attn": "loha"}, r"attn='loha': expected one of lora, lie, none"),
    ({"mode": "log"}, r"mode='log': expected one of exp, taylor"),
    ({"balance": "max"}, r"balance='max': expected one of rms, none"),
    ({"dropout": "1.5"}, r"dropout='1.5': expected a probability"),
    ({"rank_dropout": "x"}, r"rank_dropout='x': expected a number"),
])
def test_bad_network_args_stop_the_run_naming_the_arg(sd1, kwargs, message):
    unet, te, base, _ = sd1
    with pytest.raises(ValueError, match=message):
        create_network(1.0, 4, 1, None, te, unet, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), base.state_dict().values()))


# ------------------------------------------------------------------------------------------ the network


def test_network_adapts_what_the_training_script_adapts_with_balanced_alphas(sd1):
    unet, te, _, _ = sd1
    network = create_network(1.0, 4, 2, None, te, unet, conv_dim="3", conv_alpha="1.5")
    convs, attns = find_targets(unet, LieConfig())  # the training script's default targets
    te_convs, te_attns = find_targets(te, LieConfig())
    by_module = {(m.component, m.module): m for m in network.children()}
    expected = {("unet", n) for n in convs + attns} | {("text_encoder", "text_model." + n.removeprefix("text_model."))
                                                        for n in te_attns}
    assert set(by_module) == expected and not te_convs
    for name in convs:
        module = by_module["unet", name]
        rms = unet.get_submodule(name).weight.double().pow(2).mean().sqrt().item()
        assert (module.section, module.mode, module.rank) == ("lie", "exp", 3)
        assert module.alpha_value == pytest.approx(1.5 / max(rms, 1e-3), rel=1e-6)
    for name in attns:
        module = by_module["unet", name]
        assert (module.section, module.mode, module.rank, module.alpha_value) == ("lora", None, 4, 2.0)
    assert {m.lora_name for m in network.children()} == {kohya_name(m.component, m.module, unet.config)
                                                         for m in network.children()}


@pytest.mark.parametrize("mode, attn", [("exp", "lora"), ("taylor", "lie")])
def test_every_adapted_layer_is_the_formula_at_every_multiplier(sd1, mode, attn):
    unet, te, base, _ = sd1
    network = create_network(1.0, 4, 1, None, te, unet, mode=mode, attn=attn, balance="none")
    network.apply_to(te, unet)
    assert torch.equal(_run(unet), _run(base))  # B = 0: the group identity, exactly
    _randomize(network)
    for t in MULTIPLIERS:
        network.set_multiplier(t)
        errors = [_layer_output_vs_formula(m, t) for m in network.children()]
        assert max(errors) < 1e-5, t
    network.set_multiplier(0)
    assert torch.equal(_run(unet), _run(base))


def test_gradients_match_finite_differences_through_the_patched_layer(sd1):
    unet, te, _, _ = sd1
    network = create_network(1.0, 2, 1, None, te, unet)
    network.apply_to(te, unet)
    _randomize(network, std=0.3)
    network.double()
    for module in (next(m for m in network.children() if m.section == s) for s in ("lie", "lora")):
        layer = module.layer.double()
        shape = (1, layer.in_channels, 5, 5) if isinstance(layer, nn.Conv2d) else (3, layer.in_features)
        x = torch.randn(shape, dtype=torch.float64)
        loss = lambda: (layer(x) ** 2).sum()  # noqa: E731
        grads = torch.autograd.grad(loss(), [module.down, module.up])
        for param, grad in zip((module.down, module.up), grads):
            for index in (0, param.numel() // 2, param.numel() - 1):
                with torch.no_grad():
                    flat = param.view(-1)
                    flat[index] += 1e-6
                    plus = loss()
                    flat[index] -= 2e-6
                    minus = loss()
                    flat[index] += 1e-6
                numeric = (plus - minus).item() / 2e-6
                assert grad.reshape(-1)[index].item() == pytest.approx(numeric, rel=1e-5, abs=1e-8), module.lora_name


@pytest.mark.filterwarnings("ignore:.*the target has no")  # a UNet alone takes the file's UNet part
@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_file_reads_back_exactly_everywhere(kind, tmp_path):
    torch.manual_seed(0)
    unet = tiny_unet(kind)
    encoders = [tiny_text_encoder(0)] + ([tiny_text_encoder(1, with_projection=True)] if kind == "sdxl" else [])
    base = copy.deepcopy(unet)
    kohya_unet = sgm_stand_in(unet) if kind == "sdxl" else unet
    network = create_network(1.0, 4, 1, None, encoders if kind == "sdxl" else encoders[0], kohya_unet)
    network.apply_to(encoders, kohya_unet)
    _randomize(network, std=0.1)
    path = tmp_path / "kohya.safetensors"
    network.save_weights(str(path), torch.float32, {"ss_network_module": "lie_diffusion.kohya", "ss_network_dim": "4"})

    keys = load_file(path).keys()
    stems = {k.split(".")[0] for k in keys}
    assert stems == {m.lora_name for m in network.children()}
    prefixes = {"lora_unet"} | ({"lora_te1", "lora_te2"} if kind == "sdxl" else {"lora_te"})
    assert all(any(s.startswith(p + "_") for p in prefixes) for s in stems)
    if kind == "sdxl":
        assert "lora_unet_input_blocks_1_0_in_layers_2.lie_down.weight" in keys
        assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    with safe_open(str(path), framework="pt") as file:
        header = file.metadata()
    assert header["ss_network_module"] == "lie_diffusion.kohya" and header["ss_network_dim"] == "4"
    assert json.loads(header["lie_diffusion"])["balance"] == "rms"

    adapter = read_lie_file(path)
    assert adapter.kohya_names and len(adapter.modules) == len(list(network.children()))
    by_ref = {m.ref: m for m in adapter.modules}
    for module in network.children():
        entry = by_ref[f"{module.component}.{module.module}"]
        assert torch.equal(entry.A, module.down) and torch.equal(entry.B, module.up)
        assert (entry.section, entry.mode, entry.alpha) == (module.section, module.mode, module.alpha_value)

    for t in MULTIPLIERS:  # the kohya-side network (patched layers) vs the file loaded by diffusers
        network.set_multiplier(t)
        loaded = copy.deepcopy(base)
        load_lie_weights(loaded, path, scale=t)
        expected, actual = _run(unet), _run(loaded)
        assert (expected - actual).abs().max() <= 1e-5 * expected.abs().max(), t


def test_create_network_from_weights_reloads_and_merges_exactly(sd1, tmp_path):
    unet, te, base, base_te = sd1
    network = create_network(1.0, 4, 1, None, te, unet, conv_dim="2", mode="taylor")
    network.apply_to(te, unet)
    _randomize(network)
    path = str(tmp_path / "trained.safetensors")
    network.save_weights(path, None, {})
    network.set_multiplier(0.5)
    expected = _run(unet)

    # --network_weights (resume): a fresh network from the args, then load_weights
    unet2, te2 = copy.deepcopy(base), copy.deepcopy(base_te)
    fresh = create_network(0.5, 4, 1, None, te2, unet2, conv_dim="2", mode="taylor")
    fresh.apply_to(te2, unet2)
    info = fresh.load_weights(path)
    assert not info.missing_keys and not info.unexpected_keys
    assert torch.equal(_run(unet2), expected)

    # --dim_from_weights / gen_img: the network the file describes, applied then loaded from its state dict
    unet3, te3 = copy.deepcopy(base), copy.deepcopy(base_te)
    loaded, weights_sd = create_network_from_weights(0.5, path, None, te3, unet3, for_inference=True)
    assert weights_sd.keys() == load_file(path).keys()
    loaded.apply_to(te3, unet3)
    loaded.load_state_dict(weights_sd, False)
    assert torch.equal(_run(unet3), expected)

    # --base_weights / gen_img's merge: folded into the weights, the layers are plain again
    unet4, te4 = copy.deepcopy(base), copy.deepcopy(base_te)
    merged, weights_sd = create_network_from_weights(0.5, path, None, te4, unet4, for_inference=True)
    originals = {m.lora_name: m.layer.weight.detach().clone() for m in merged.children()}
    merged.merge_to(te4, unet4, weights_sd, torch.float32, "cpu")
    for module in merged.children():
        formula = _expected(originals[module.lora_name], module.down.detach(), module.up.detach(),
                            0.5 * module.alpha_value / module.rank, module.mode)
        assert torch.allclose(module.layer.weight.double(), formula, rtol=1e-6, atol=1e-7), module.lora_name
    actual = _run(unet4)
    assert (actual - expected).abs().max() <= 1e-5 * expected.abs().max()

    # gen_img --network_pre_calc: fold at the multiplier, restore exactly
    loaded.backup_weights()
    loaded.pre_calculation()
    assert (_run(unet3) - expected).abs().max() <= 1e-5 * expected.abs().max()
    loaded.restore_weights()
    assert torch.equal(_run(unet3), expected)


def test_weights_that_do_not_fit_are_refused_naming_the_file(sd1, tmp_path):
    unet, te, base, base_te = sd1
    network = create_network(1.0, 4, 1, None, te, unet)
    path = str(tmp_path / "rank4.safetensors")
    network.save_weights(path, None, None)
    other = create_network(1.0, 8, 1, None, copy.deepcopy(base_te), copy.deepcopy(base))
    with pytest.raises(ValueError, match=r"rank4\.safetensors: does not fit this network: .*\(lie, rank 4; the network "
                                         r"has a lie module of rank 8\)"):
        other.load_weights(path)
    with pytest.raises(ValueError, match=r"\.safetensors only"):
        network.save_weights(str(tmp_path / "x.ckpt"), None, None)
    sdxl = sgm_stand_in(tiny_unet("sdxl"))
    with pytest.raises(ValueError, match=r"rank4\.safetensors: saved for another UNet"):
        encoders = [tiny_text_encoder(), tiny_text_encoder(1, with_projection=True)]
        create_network_from_weights(1.0, path, None, encoders, sdxl)


def test_optimizer_groups_learning_rates_and_max_norm(tmp_path):
    torch.manual_seed(0)
    unet = tiny_unet("sdxl")
    encoders = [tiny_text_encoder(0), tiny_text_encoder(1, with_projection=True)]
    network = create_network(1.0, 4, 1, None, encoders, sgm_stand_in(unet), attn="lie")
    groups, descriptions = network.prepare_optimizer_params([1e-5, 2e-5], 1e-4, 1e-3)
    assert descriptions == ["textencoder1", "textencoder2", "unet"]
    assert [g["lr"] for g in groups] == [1e-5, 2e-5, 1e-4]
    assert sum(len(g["params"]) for g in groups) == len(list(network.parameters()))
    groups, descriptions = network.prepare_optimizer_params(0, None, 1e-3)  # lr 0: that part is not trained
    assert descriptions == ["unet"] and groups[0]["lr"] == 1e-3

    _randomize(network, std=1.0)
    scaled, mean, largest = network.apply_max_norm_regularization(0.5, "cpu")
    assert scaled > 0 and largest == pytest.approx(0.5) and mean <= 0.5
    for module in network.children():
        delta = (module.up.flatten(1) @ module.down.flatten(1)) * module.alpha_value / module.rank
        assert delta.norm().item() <= 0.5 * (1 + 1e-5)


def test_not_an_sd_unet_is_refused():
    with pytest.raises(ValueError, match="not an SD 1.x/2.x or SDXL UNet.*Flux, SD3"):
        unet_layout(nn.Sequential(nn.Linear(4, 4)))


# ------------------------------------------------------------------------------------------ content hash


def _independent_hash(path) -> str:
    digest = hashlib.sha256()
    tensors = load_file(path)
    for key in sorted(tensors):
        tensor = tensors[key]
        digest.update(f"{key}\0{str(tensor.dtype).removeprefix('torch.')}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _flip_data_byte(path, target, offset):
    data = bytearray(path.read_bytes())
    data[8 + int.from_bytes(data[:8], "little") + offset] ^= 0x01
    target.write_bytes(bytes(data))
    return target


def test_content_hash_refuses_one_flipped_byte_and_old_files_still_load(sd1, tmp_path, capsys):
    unet, te, base, _ = sd1
    network = create_network(1.0, 4, 1, None, te, unet)
    _randomize(network)
    path = tmp_path / "good.safetensors"
    network.save_weights(str(path), torch.float16, None)
    with safe_open(str(path), framework="pt") as file:
        header = file.metadata()
    assert header[HASH_KEY] == _independent_hash(path) == content_hash(load_file(path))

    size = sum(t.numel() * t.element_size() for t in load_file(path).values())
    for offset in (0, size // 2, size - 1):
        bad = _flip_data_byte(path, tmp_path / f"bad{offset}.safetensors", offset)
        for reader in (read_lie_file, lambda p: load_lie_weights(copy.deepcopy(base), p),
                       lambda p: create_network_from_weights(1.0, str(p), None, te, copy.deepcopy(base))):
            with pytest.raises(ValueError, match=rf"bad{offset}\.safetensors: the tensors do not match the file's "
                                                 "content hash"):
                reader(bad)

    old = tmp_path / "old.safetensors"  # written before there was a hash
    save_file(load_file(path), str(old), metadata={k: v for k, v in header.items() if k != HASH_KEY})
    assert len(read_lie_file(old).modules) == len(read_lie_file(path).modules)

    from lie_diffusion.cli import main

    capsys.readouterr()
    assert main(["inspect", str(path)]) == 0 and f"Content hash: sha256 {header[HASH_KEY]} (matches" in \
        capsys.readouterr().out
    assert main(["inspect", str(old)]) == 0 and "Content hash: none" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "bad0.safetensors")]) == 1
    assert "bad0.safetensors: the tensors do not match the file's content hash" in capsys.readouterr().err
    tampered = tmp_path / "alpha.safetensors"  # consistent hash, but an .alpha that is not the metadata's
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith(".alpha"))
    tensors[key] = tensors[key] * 2
    save_file(tensors, str(tampered), metadata={**header, HASH_KEY: content_hash(tensors)})
    with pytest.raises(ValueError, match=rf"alpha\.safetensors: {key.split('.')[0]}\.alpha holds"):
        read_lie_file(tampered)


# ------------------------------------------------------------------------------------------ other readers


def test_hosts_find_the_files_own_names_and_stock_diffusers_refuses_it(sd1, tmp_path):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from lie_diffusion.hosts import TEXT_ENCODERS, UNET, kohya_names
    from lie_diffusion.tiny import tiny_vae

    unet, te, base, base_te = sd1
    network = create_network(1.0, 4, 1, None, te, unet)
    _randomize(network)
    path = tmp_path / "kohya.safetensors"
    network.save_weights(str(path), None, None)
    names, problems = kohya_names(read_lie_file(path), UNET + TEXT_ENCODERS)  # what ComfyUI/Forge/A1111 look up
    assert not problems and set(names) == {k.split(".")[0] for k in load_file(path)}

    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=base_te, tokenizer=None, unet=base,
                                   scheduler=DDPMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(ValueError, match=r"(?s)not been correctly renamed.*lie_down\.weight"):
        pipe.load_lora_weights(str(path))
    assert pipe.unet.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())


def test_cli_reads_the_kohya_file(tiny_pipeline_dir, tmp_path, capsys):
    """merge, inspect, export and combine on a file the network wrote for the tiny pipeline's own UNet/encoder."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from lie_diffusion.cli import main

    unet = UNet2DConditionModel.from_pretrained(str(tiny_pipeline_dir), subfolder="unet")
    te = CLIPTextModel.from_pretrained(str(tiny_pipeline_dir), subfolder="text_encoder")
    network = create_network(1.0, 4, 1, None, te, unet)
    _randomize(network, std=0.05)
    path = tmp_path / "kohya.safetensors"
    network.save_weights(str(path), None, None)

    assert main(["inspect", str(path)]) == 0
    assert "Names: kohya" in capsys.readouterr().out
    assert main(["merge", "--base", str(tiny_pipeline_dir), "--weights", str(path), "--output",
                 str(tmp_path / "merged")]) == 0
    merged = UNet2DConditionModel.from_pretrained(str(tmp_path / "merged"), subfolder="unet")
    network.merge_to(te, unet, None)  # the kohya side folds the same model into its layers
    for name, param in unet.state_dict().items():
        assert torch.allclose(merged.state_dict()[name], param, rtol=1e-6, atol=1e-7), name
    assert main(["export", str(path), "--base", str(tiny_pipeline_dir), "--output", str(tmp_path / "e.safetensors"),
                 "--conv", "exact", "--dtype", "fp32"]) == 0
    assert main(["combine", str(path), str(path), "--weights", "0.5", "0.5", "--output",
                 str(tmp_path / "c.safetensors")]) == 0
    combined, original = read_lie_file(tmp_path / "c.safetensors"), read_lie_file(path)
    assert {m.ref for m in combined.modules} == {m.ref for m in original.modules}


@pytest.mark.parametrize("strength", MULTIPLIERS)
def test_host_loaders_patch_the_kohya_file_to_the_networks_model(sd1, tmp_path, strength):
    """The ComfyUI/Forge core (`hosts.host_patches`, ComfyUI's key names as test_export writes them down) on the
    file gives every UNet weight the network's own merge at that strength."""
    from test_export import comfyui_table

    from lie_diffusion.hosts import UNET, host_patches

    unet, te, base, _ = sd1
    network = create_network(1.0, 4, 1, None, te, unet, attn="lie")
    _randomize(network, std=0.1)
    path = tmp_path / "kohya.safetensors"
    network.save_weights(str(path), None, None)
    table = comfyui_table(base, {})
    key_map = {stem: module for stem, (component, module) in table.items() if component == "unet"}
    weights = {name: base.get_submodule(name).weight.detach() for name in set(key_map.values())}
    got = host_patches(path, key_map, weights, strength, UNET, load_lora=lambda *_: {})
    network.set_multiplier(strength)
    network.merge_to(te, unet, None)
    assert set(got) == {m.module for m in network.unet_loras}
    for name, patch in got.items():
        weight = weights[name]
        patched = weight.float() + patch.update(weight, strength)
        assert torch.allclose(patched, unet.get_submodule(name).weight, rtol=1e-5, atol=1e-7), name


def test_a_module_without_its_alpha_is_refused(sd1, tmp_path):
    unet, te, _, _ = sd1
    network = create_network(1.0, 4, 1, None, te, unet)
    path = tmp_path / "kohya.safetensors"
    network.save_weights(str(path), None, None)
    with safe_open(str(path), framework="pt") as file:
        header = file.metadata()
    tensors = load_file(path)
    key = "lora_unet_down_blocks_0_resnets_0_conv1.alpha"
    del tensors[key]
    save_file(tensors, str(tmp_path / "no-alpha.safetensors"), metadata={**header, HASH_KEY: content_hash(tensors)})
    with pytest.raises(ValueError, match=r"no-alpha\.safetensors: unet\.down_blocks\.0\.resnets\.0\.conv1 has no "
                                         r"\.alpha tensor"):
        read_lie_file(tmp_path / "no-alpha.safetensors")


def test_resuming_the_unet_only_leaves_the_text_encoder_part_out(sd1, tmp_path, caplog):
    unet, te, base, base_te = sd1
    network = create_network(1.0, 4, 1, None, te, unet)
    _randomize(network)
    path = str(tmp_path / "full.safetensors")
    network.save_weights(path, None, None)
    unet_only = create_network(1.0, 4, 1, None, base_te, base)
    unet_only.apply_to(base_te, base, apply_text_encoder=False, apply_unet=True)  # --network_train_unet_only
    info = unet_only.load_weights(path)
    assert not info.missing_keys and not unet_only.text_encoder_loras
    assert "text_encoder modules are not trained in this run" in caplog.text
    for module in unet_only.children():
        assert torch.equal(module.up, getattr(network, module.lora_name).up)
