"""The host-free core of the host loaders (no host installed): names, patches, the patch math, errors, install.

Key maps here follow ComfyUI's naming rules as test_export writes them down (`comfyui_table`); the patch math
is checked against the formula written out below. tests/test_hosts_comfyui.py runs the real ComfyUI.
"""

import importlib
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from test_export import _adapted, comfyui_table
from test_io import _rewrite

from lie_diffusion import read_lie_file
from lie_diffusion.cli import main
from lie_diffusion.integrations import HOSTS
from lie_diffusion.hosts import TEXT_ENCODERS, UNET, LiePatch, host_patches, kohya_names
from lie_diffusion.io import ModuleEntry


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def host(request, tmp_path_factory):
    """An adapted tiny pipeline and a stand-in ComfyUI: kohya name -> "component:module.weight" and its weights."""
    adapted = _adapted(tmp_path_factory.mktemp(f"hosts-{request.param}"), request.param)
    pipe = adapted.cls.from_pretrained(str(adapted.base))
    encoders = {c: getattr(pipe, c).config.num_hidden_layers for c in TEXT_ENCODERS if getattr(pipe, c, None)}
    table = comfyui_table(pipe.unet, encoders)
    key_map = {stem: f"{c}:{m}.weight" for stem, (c, m) in table.items()}
    weights = {f"{c}:{m}.weight": layer(pipe, c, m).weight.detach() for c, m in set(table.values())}
    return SimpleNamespace(adapted=adapted, key_map=key_map, weights=weights, file=read_lie_file(adapted.path))


def layer(pipe, component, module):
    """A module by kohya's CLIP path (transformers 5 drops CLIPTextModel's leading `text_model.`)."""
    modules = dict(getattr(pipe, component).named_modules())
    return modules.get(module) or modules[module.removeprefix("text_model.")]


def stand_in_load_lora(lora, to_load):
    """Records what ComfyUI's load_lora would get: a kohya state dict and kohya name -> model key."""
    return {key: ("lora", {part: lora[f"{stem}.{part}"] for part in ("lora_down.weight", "lora_up.weight", "alpha")})
            for stem, key in to_load.items()}


def patches(host, components, strength=1.0, file=None):
    return host_patches(file or host.file, host.key_map, host.weights, strength, components, stand_in_load_lora)


def model_key(entry: ModuleEntry) -> str:
    module = entry.module
    if entry.component != "unet" and not module.startswith("text_model."):
        module = "text_model." + module
    return f"{entry.component}:{module}.weight"


def test_every_module_lands_on_its_own_layer(host):
    """Lie modules become LiePatches, LoRA modules go to the host's LoRA loader with their alpha; UNet and text
    encoders are patched separately (ComfyUI's MODEL and CLIP)."""
    for components in (UNET, TEXT_ENCODERS):
        got = patches(host, components)
        entries = [e for e in host.file.modules if e.component in components]
        assert entries and set(got) == {model_key(e) for e in entries}
        for entry in entries:
            patch = got[model_key(entry)]
            if entry.section == "lie":
                assert isinstance(patch, LiePatch) and patch.entry is entry
            else:
                kind, lora = patch
                assert kind == "lora" and lora["lora_down.weight"] is entry.A and lora["lora_up.weight"] is entry.B
                assert lora["alpha"].item() == entry.alpha
    assert {e.section for e in host.file.modules} == {"lie", "lora"}


def reference(weight, entry, strength):
    """W ⊙ exp(t·sΔ) (exp) or W + t·s·W ⊙ Δ (taylor), Δ = reshape(B_flat @ A_flat), in float64."""
    s = strength * entry.alpha / entry.rank
    delta = (entry.B.double().reshape(entry.B.shape[0], -1) @ entry.A.double().reshape(entry.rank, -1))
    delta = delta.reshape(weight.shape)
    w = weight.double()
    return w * torch.exp(s * delta) if entry.mode == "exp" else w + s * w * delta


@pytest.mark.parametrize("mode", ["exp", "taylor"])
@pytest.mark.parametrize("strength", [1.0, 0.5, -1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_patch_math_against_the_formula(mode, strength, dtype):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 4, 3, 3, generator=generator)
    A, B = torch.randn(2, 4, 3, 3, generator=generator), torch.randn(6, 2, 1, 1, generator=generator)
    entry = ModuleEntry("unet", "conv", "lie", A * 0.3, B * 0.3, alpha=3.0, mode=mode)
    expected = reference(weight.to(dtype), entry, strength)
    given = weight.to(dtype)
    got = LiePatch(entry).calculate_weight(given, "k", strength, 1.0, None, lambda d: d, dtype, None)
    assert got is given and got.dtype == dtype  # in place, in the weight's own dtype
    half_ulp = {torch.float32: 2**-24, torch.float16: 2**-11, torch.bfloat16: 2**-8}[dtype]
    error = (got.double() - expected).abs()
    assert (error <= expected.abs() * (half_ulp + 2**-22) + 1e-12).all()  # float32 work, one rounding to dtype


def test_patch_applies_the_hosts_row_order_and_writes_slices_in_place():
    """The host's `function` is the row order of the module in its weight (its own inverse, as ComfyUI's
    scale/shift swap): the update is computed on the module's own rows and written back in the host's order."""
    rows = torch.arange(1.0, 5.0).reshape(4, 1)
    entry = ModuleEntry("unet", "linear", "lie", torch.full((1, 3), 0.5), 0.5 * rows, 1.0, mode="exp")
    weight = torch.ones(8, 3)
    view = weight.narrow(0, 4, 4)  # ComfyUI patches a slice of a fused weight through `offset`
    LiePatch(entry).calculate_weight(view, "k", 1.0, 1.0, (0, 4, 4), lambda d: d.flip(0), torch.float32, None)
    assert torch.equal(weight[:4], torch.ones(4, 3))
    expected = torch.exp(0.25 * rows).flip(0).expand(4, 3)  # W ⊙ exp(sΔ) on the module's rows, then flipped
    assert torch.allclose(weight[4:], expected)


def test_strength_zero_is_the_identity_and_minus_one_undoes_exp():
    generator = torch.Generator().manual_seed(1)
    entry = ModuleEntry("unet", "linear", "lie", torch.randn(2, 5, generator=generator),
                        torch.randn(7, 2, generator=generator), 2.0, mode="exp")
    weight = torch.randn(7, 5, generator=generator)
    patch = LiePatch(entry)
    assert torch.equal(patch.calculate_weight(weight.clone(), "k", 0.0, 1.0, None, lambda d: d), weight)
    there = patch.calculate_weight(weight.clone(), "k", 1.0, 1.0, None, lambda d: d)
    back = patch.calculate_weight(there, "k", -1.0, 1.0, None, lambda d: d)
    assert torch.allclose(back, weight, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("host", ["sd1"], indirect=True)
def test_bad_files_name_the_file_and_the_module(host, tmp_path):
    unknown = {k: v for k, v in host.key_map.items() if "down_blocks_0_resnets_0_conv1" not in k}
    with pytest.raises(ValueError, match=r"lie\.unet\.down_blocks\.0\.resnets\.0\.conv1: the model has no layer") as e:
        host_patches(host.file, unknown, host.weights, 1.0, UNET, stand_in_load_lora)
    assert str(host.adapted.path) in str(e.value) and "SD 1.x/2.x UNet" in str(e.value)

    key = model_key(next(e for e in host.file.modules if e.module == "down_blocks.0.resnets.0.conv1"))
    narrow = {**host.weights, key: host.weights[key][:, :-1]}
    with pytest.raises(ValueError, match=r"conv1: lora_A \(4, 32, 3, 3\), lora_B \(32, 4, 1, 1\) do not fit"):
        host_patches(host.file, host.key_map, narrow, 1.0, UNET, stand_in_load_lora)

    huge = _rewrite(host.adapted.path, tmp_path / "huge.safetensors", edit_info=lambda i: i.update(alpha=1e30))
    with pytest.raises(ValueError, match=r"huge.safetensors: lie\.unet\.[\w.]+: .* NaN/inf .*\(alpha 1e\+30"):
        patches(host, UNET, file=huge)
    with pytest.raises(ValueError, match=r"NaN/inf value\(s\) in torch.float32 at strength 1e\+30"):
        patches(host, UNET, strength=1e30)

    kohya = tmp_path / "kohya.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(1, 4, 3, 3)}, str(kohya))
    with pytest.raises(ValueError, match="kohya.safetensors: not a lie-diffusion file"):
        patches(host, UNET, file=kohya)


def test_a_file_for_another_base_model_is_refused(tmp_path_factory):
    sd1 = _adapted(tmp_path_factory.mktemp("hosts-other"), "sd1")
    xl = _adapted(tmp_path_factory.mktemp("hosts-other-xl"), "sdxl")
    pipe = xl.cls.from_pretrained(str(xl.base))
    table = comfyui_table(pipe.unet, {"text_encoder": 2, "text_encoder_2": 2})
    key_map = {stem: f"{c}:{m}.weight" for stem, (c, m) in table.items() if c == "unet"}
    weights = {f"unet:{k}": v for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(ValueError, match=r"does not fit this model \(the file was saved for an SD 1\.x/2\.x UNet"):
        host_patches(sd1.path, key_map, weights, 1.0, UNET, stand_in_load_lora)


def test_comfyui_node_module_imports_without_comfyui():
    nodes = importlib.import_module("lie_diffusion.integrations.comfyui")
    assert set(nodes.NODE_CLASS_MAPPINGS) == set(nodes.NODE_DISPLAY_NAME_MAPPINGS)
    assert nodes.NODE_CLASS_MAPPINGS["LieAdapterLoader"].RETURN_TYPES == ("MODEL", "CLIP")
    assert nodes.NODE_CLASS_MAPPINGS["LieAdapterLoaderModelOnly"].RETURN_TYPES == ("MODEL",)


def fake_host(root, host):
    """A folder with the files that mark a checkout of `host`."""
    for marker in HOSTS[host].markers:
        (root / marker).parent.mkdir(parents=True, exist_ok=True)
        (root / marker).write_text("")
    return root


@pytest.mark.parametrize("host_name", sorted(HOSTS))
def test_install_links_once_and_refuses_other_folders(host_name, tmp_path, capsys):
    spec = HOSTS[host_name]
    root = fake_host(tmp_path / "host", host_name)
    assert main(["install", host_name, str(root)]) == 0
    target = root / spec.plugins / "lie-diffusion"
    assert target.resolve() == Path(importlib.import_module(f"lie_diffusion.integrations.{spec.source}").__file__).parent
    assert "Installed" in capsys.readouterr().out
    assert main(["install", host_name, str(root)]) == 0 and "Already installed" in capsys.readouterr().out

    copied = fake_host(tmp_path / "host-copy", host_name)
    for _ in range(2):
        assert main(["install", host_name, str(copied), "--copy"]) == 0
    assert not (copied / spec.plugins / "lie-diffusion").is_symlink()
    assert "Already installed" in capsys.readouterr().out

    (copied / spec.plugins / "lie-diffusion" / "__init__.py").write_text("# someone else's code\n")
    for argv, words in (
        (["install", host_name, str(copied), "--copy"], [f"exists and is not this lie-diffusion's {spec.title}"]),
        (["install", host_name, str(tmp_path)], [f"not a {spec.title} folder", spec.markers[0]]),
    ):
        assert main(argv) == 1
        captured = capsys.readouterr()
        assert not captured.out and all(word in captured.err for word in words), captured.err


def test_a_forge_folder_is_not_taken_for_a1111(tmp_path, capsys):
    """Forge grew from A1111 and may keep its files: installing the A1111 extension there points at Forge's."""
    root = fake_host(fake_host(tmp_path / "forge", "forge"), "a1111")
    assert main(["install", "a1111", str(root)]) == 1
    assert "a Forge folder" in capsys.readouterr().err and not (root / "extensions" / "lie-diffusion").exists()
    assert main(["install", "forge", str(root)]) == 0


def test_forge_hooks_route_only_lie_diffusion_files(host, tmp_path, monkeypatch):
    """install_hooks (run by Forge at start-up) against stand-ins for Forge's LoRA modules: the calculator is
    registered, lie-diffusion files go to load_lie_for_models, every other file to Forge's own loader."""
    forge = importlib.import_module("lie_diffusion.integrations.forge")
    calls = []
    networks = ModuleType("networks")
    networks.load_lora_for_models = lambda *args, **kwargs: calls.append(("forge", kwargs["filename"])) or "forge"
    backend_lora = ModuleType("backend.patcher.lora")
    backend_lora.extra_weight_calculators = {}
    monkeypatch.setitem(sys.modules, "networks", networks)
    monkeypatch.setitem(sys.modules, "backend.patcher.lora", backend_lora)
    monkeypatch.setattr(forge, "load_lie_for_models", lambda *args: calls.append(("lie", args[2])) or "lie")
    for _ in range(2):  # idempotent: a second start-up does not wrap the wrapper
        forge.install_hooks()
    assert backend_lora.extra_weight_calculators == {"lie": forge.calculate}
    kohya = tmp_path / "kohya.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(1, 4, 3, 3)}, str(kohya))
    for path in (host.adapted.path, kohya, tmp_path / "old.ckpt"):
        networks.load_lora_for_models(None, None, {}, 1.0, 1.0, filename=str(path))
    assert calls == [("lie", str(host.adapted.path)), ("forge", str(kohya)), ("forge", str(tmp_path / "old.ckpt"))]

    weight = host.weights[model_key(host.file.section("lie")[0])].clone()
    patch = forge.lie_patch(host.file.section("lie")[0])
    assert patch[0] == "lie" and torch.allclose(
        forge.calculate(weight.clone(), 0.5, patch[1]), reference(weight, patch[1].entry, 0.5).float())


def test_a1111_reads_a_file_by_kohya_names_with_sgm_unet_names(host):
    """Each Lie module is one `<name>.lie_diffusion` entry (the extension's module type claims these only), each
    LoRA module kohya LoRA tensors for A1111's own type; UNet layers by SGM name, which A1111 maps for any layout."""
    a1111 = importlib.import_module("lie_diffusion.integrations.a1111")
    state = a1111.a1111_state_dict(host.adapted.path)
    names, _ = kohya_names(host.file, a1111.COMPONENTS, sgm_unet=True)
    assert len(names) == len(host.file.modules)
    for name, entry in names.items():
        if entry.section == "lie":
            read = state[f"{name}.lie_diffusion"]
            assert read.ref == entry.ref and torch.equal(read.A, entry.A) and torch.equal(read.B, entry.B)
        else:
            assert torch.equal(state[f"{name}.lora_down.weight"], entry.A)
            assert torch.equal(state[f"{name}.lora_up.weight"], entry.B)
            assert state[f"{name}.alpha"].item() == entry.alpha
    unet = [key for key in state if key.startswith("lora_unet_")]
    assert unet and not any("down_blocks" in key or "up_blocks" in key for key in unet)
    assert "lora_unet_input_blocks_1_0_in_layers_2.lie_diffusion" in state  # down_blocks.0.resnets.0.conv1


@pytest.fixture
def a1111_stand_ins(monkeypatch):
    """Stand-ins for the A1111 modules the extension touches, with the behaviour it relies on: `network`'s base
    classes and multiplier rule, `networks`' module types and loader, `modules.patches` / `sd_models` / `errors`."""
    network = ModuleType("network")

    class NetworkModule:
        def __init__(self, net, weights):
            self.network, self.network_key, self.sd_key, self.sd_module = net, weights.network_key, weights.sd_key, \
                weights.sd_module

        def multiplier(self):
            return self.network.te_multiplier if "transformer" in self.sd_key[:20] else self.network.unet_multiplier

    network.NetworkModule, network.ModuleType = NetworkModule, type("ModuleType", (), {})
    networks = ModuleType("networks")
    networks.module_types, networks.loaded_networks = ["lora type"], []
    networks.load_networks = lambda names: networks.loaded_networks.extend(names)
    originals = {}
    patches = SimpleNamespace(
        original=lambda key, obj, field: originals.get((key, id(obj), field)),
        patch=lambda key, obj, field, new: originals.setdefault((key, id(obj), field), getattr(obj, field)) and
        setattr(obj, field, new))
    sd_models = SimpleNamespace(read_state_dict=lambda path, *args, **kwargs: ("A1111's reader", path))
    errors = SimpleNamespace(reported=[], report=lambda message: errors.reported.append(message))
    hijack = SimpleNamespace(model_hijack=SimpleNamespace(comments=[]))
    modules = ModuleType("modules")
    modules.patches, modules.sd_models, modules.errors, modules.sd_hijack = patches, sd_models, errors, hijack
    for name, module in (("network", network), ("networks", networks), ("modules", modules)):
        monkeypatch.setitem(sys.modules, name, module)
    a1111 = importlib.import_module("lie_diffusion.integrations.a1111")
    a1111.module_type.cache_clear()
    yield SimpleNamespace(networks=networks, sd_models=sd_models, errors=errors, hijack=hijack, extension=a1111)
    a1111.module_type.cache_clear()


def a1111_network(host, path, multiplier, skip=None):
    """A network as A1111's load_network would build it from `path`: one stand-in module per file module, on the
    layer `host` holds for it."""
    a1111 = importlib.import_module("lie_diffusion.integrations.a1111")
    net = SimpleNamespace(network_on_disk=SimpleNamespace(filename=str(path)), modules={},
                          te_multiplier=multiplier, unet_multiplier=multiplier)
    names, _ = kohya_names(host.file, a1111.COMPONENTS, sgm_unet=True)
    for name, entry in names.items():
        if name != skip:
            layer = SimpleNamespace(weight=host.weights[model_key(entry)])
            net.modules[name] = SimpleNamespace(network_key=f"{name}.lora_down.weight", sd_key=name, sd_module=layer,
                                                multiplier=lambda: multiplier)
    return net


def test_a1111_hooks_with_stand_ins(host, a1111_stand_ins, tmp_path, monkeypatch):
    """install_hooks (run by A1111 at start-up): the module type goes first, once; lie-diffusion files are read by
    kohya names and every other file by A1111; a lie-diffusion network that does not fit is dropped, reported."""
    hooks, networks = a1111_stand_ins.extension, a1111_stand_ins.networks
    for _ in range(2):
        hooks.install_hooks()
    lie_type = hooks.module_type()
    assert len(networks.module_types) == 2 and isinstance(networks.module_types[0], lie_type)
    kohya = tmp_path / "kohya.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(1, 4, 3, 3)}, str(kohya))
    assert a1111_stand_ins.sd_models.read_state_dict(kohya) == ("A1111's reader", kohya)
    state = a1111_stand_ins.sd_models.read_state_dict(host.adapted.path)
    assert state.keys() == hooks.a1111_state_dict(host.adapted.path).keys()

    entry = host.file.section("lie")[0]
    weights = SimpleNamespace(w={"lie_diffusion": entry}, network_key="k.lie_diffusion", sd_key="diffusion_model_k",
                              sd_module=None)
    net = SimpleNamespace(te_multiplier=1.0, unet_multiplier=0.5)
    module = networks.module_types[0].create_module(net, weights)
    assert networks.module_types[0].create_module(net, SimpleNamespace(w={"lora_down.weight": entry.A})) is None
    weight = host.weights[model_key(entry)]
    update, bias = module.calc_updown(weight)
    assert bias is None and update.dtype == torch.float32
    assert torch.allclose(weight + update, reference(weight, entry, 0.5).float(), rtol=1e-5, atol=1e-7)

    huge = _rewrite(host.adapted.path, tmp_path / "huge.safetensors", edit_info=lambda i: i.update(alpha=1e30))
    good, bad = a1111_network(host, host.adapted.path, 0.5), a1111_network(host, huge, 1.0)
    other = SimpleNamespace(network_on_disk=SimpleNamespace(filename=str(kohya)), modules={})
    networks.load_networks([good, bad, other])
    assert networks.loaded_networks == [good, other]
    assert len(a1111_stand_ins.errors.reported) == 1 and "huge.safetensors" in a1111_stand_ins.errors.reported[0]
    assert a1111_stand_ins.hijack.model_hijack.comments == a1111_stand_ins.errors.reported  # console and image info

    # A1111 checks a prompt's networks at every generation; the file is read once per network object
    reads = []
    monkeypatch.setattr(hooks, "as_lie_file", lambda path: reads.append(path) or read_lie_file(path))
    fresh = a1111_network(host, host.adapted.path, 0.5)
    for multiplier in (0.5, 1e30):
        fresh.unet_multiplier = fresh.te_multiplier = multiplier
        for module in fresh.modules.values():
            module.multiplier = lambda: multiplier
        networks.loaded_networks[:] = []
        networks.load_networks([fresh])
    assert reads == [str(host.adapted.path)]
    assert networks.loaded_networks == [] and "NaN/inf" in a1111_stand_ins.errors.reported[-1]  # still checked


def test_a1111_check_names_missing_layers_and_reads_unpatched_weights(host):
    a1111 = importlib.import_module("lie_diffusion.integrations.a1111")
    stem = "lora_unet_input_blocks_1_0_in_layers_2"
    with pytest.raises(ValueError, match=rf"{host.adapted.path}: does not fit .*conv1: the model has no layer {stem}"):
        a1111.check_network(a1111_network(host, host.adapted.path, 1.0, skip=stem))

    attention = torch.nn.MultiheadAttention(4, 1)
    q, k, v = attention.in_proj_weight.chunk(3)
    for part, expected in zip("qkv", (q, k, v)):
        assert torch.equal(a1111.unpatched_weight(SimpleNamespace(sd_module=attention, sd_key=f"x_attn_{part}_proj")),
                           expected)
    attention.network_weights_backup = (torch.zeros(12, 4), torch.zeros(4, 4))  # A1111 patched it: the backup counts
    assert not a1111.unpatched_weight(SimpleNamespace(sd_module=attention, sd_key="x_attn_v_proj")).any()
    linear = torch.nn.Linear(2, 2)
    assert a1111.unpatched_weight(SimpleNamespace(sd_module=linear, sd_key="x")) is linear.weight
