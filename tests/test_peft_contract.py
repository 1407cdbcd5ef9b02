"""The peft internals lie_diffusion builds on. peft marks its custom-module API experimental: if any of
these fail after a peft upgrade, fix lie_diffusion/layers.py and inject.py before widening the pin."""

import copy
import dataclasses
import inspect
from importlib.metadata import version

import pytest
import torch
from packaging.version import Version
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer, LoraModel
from peft.tuners.lora import layer as lora_layer
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from lie_diffusion.layers import LieConv2d, LieLinear, LieLoraConfig, LoraConv2d, LoraLinear

PINNED = (Version("0.21"), Version("0.22"))


def broken(what: str) -> str:
    return (f"peft {version('peft')} changed an internal that lie_diffusion relies on: {what}. "
            f"lie_diffusion is tested with peft>={PINNED[0]},<{PINNED[1]}; update lie_diffusion/layers.py / inject.py.")


def params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_peft_version_in_pinned_range():
    installed = Version(version("peft"))
    assert PINNED[0] <= installed < PINNED[1], broken(f"installed peft {installed} is outside the pinned range")


def test_register_custom_module():
    config = LoraConfig(r=2, target_modules=["x"])
    assert hasattr(config, "_register_custom_module"), broken("LoraConfig._register_custom_module is gone")
    config._register_custom_module({nn.Conv2d: LieConv2d})
    assert getattr(config, "_custom_modules", None) == {nn.Conv2d: LieConv2d}, broken(
        "LoraConfig._register_custom_module no longer fills LoraConfig._custom_modules")


def test_create_new_module_dispatches_custom_class_with_expected_call():
    calls = []

    class Recorder(nn.Module):
        def __init__(self, target, adapter_name, **kwargs):
            super().__init__()
            calls.append((target, adapter_name, kwargs))

    assert isinstance(inspect.getattr_static(LoraModel, "_create_new_module"), staticmethod), broken(
        "LoraModel._create_new_module is no longer a staticmethod")
    assert params(LoraModel._create_new_module)[:3] == ["lora_config", "adapter_name", "target"], broken(
        f"LoraModel._create_new_module signature is now {params(LoraModel._create_new_module)}")
    config = LoraConfig(r=2, target_modules=["x"])
    config._register_custom_module({nn.Conv2d: Recorder})
    conv = nn.Conv2d(3, 4, 3)
    new = LoraModel._create_new_module(config, "adapter", conv, r=2, lora_alpha=2, target_name="blk.conv")
    assert isinstance(new, Recorder) and len(calls) == 1, broken("custom modules are no longer dispatched")
    target, adapter_name, kwargs = calls[0]
    assert target is conv and adapter_name == "adapter", broken("custom_cls(target, adapter_name, ...) changed")
    assert kwargs.get("config") is config, broken("custom_cls no longer receives config=...")
    assert kwargs.get("r") == 2 and kwargs.get("lora_alpha") == 2, broken("custom_cls no longer receives r/lora_alpha")
    assert kwargs.get("target_name") == "blk.conv", broken("custom_cls no longer receives target_name")


@pytest.mark.parametrize("cls", [lora_layer.Conv2d, lora_layer.Linear])
def test_update_layer_signature(cls):
    expected = ["self", "adapter_name", "r", "lora_alpha", "config", "kwargs"]
    assert params(cls.update_layer) == expected, broken(f"{cls.__name__}.update_layer is now {params(cls.update_layer)}")
    assert params(cls.merge)[:3] == ["self", "safe_merge", "adapter_names"], broken(f"{cls.__name__}.merge changed")
    assert params(cls.unmerge) == ["self"], broken(f"{cls.__name__}.unmerge changed")


def test_conv_init_calls_update_layer_and_creates_factors():
    seen = []

    class Spy(lora_layer.Conv2d):
        def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
            seen.append((adapter_name, r, lora_alpha))
            super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    layer = Spy(nn.Conv2d(6, 8, (3, 5)), "a", config=LoraConfig(r=3, lora_alpha=6, target_modules=["x"]),
                r=3, lora_alpha=6)
    assert seen == [("a", 3, 6)], broken("lora.Conv2d.__init__ no longer calls self.update_layer(name, r, lora_alpha)")
    A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    assert A.shape == (3, 6, 3, 5) and B.shape == (8, 3, 1, 1), broken(f"conv factor shapes are {A.shape}, {B.shape}")
    assert torch.count_nonzero(B) == 0 and torch.count_nonzero(A) > 0, broken("LoRA init is no longer A random, B 0")
    assert layer.scaling["a"] == 2.0, broken("scaling is no longer lora_alpha / r")
    assert isinstance(layer.lora_dropout["a"], nn.Identity), broken("lora_dropout is no longer a per-adapter module")
    assert isinstance(layer._caches, dict), broken("LoraLayer._caches is gone (Lie layers keep merge scales there)")


def test_linear_update_layer_creates_factors():
    layer = lora_layer.Linear(nn.Linear(7, 5), "a", config=LoraConfig(r=2, lora_dropout=0.1, target_modules=["x"]),
                              r=2, lora_alpha=4)
    layer.update_layer("b", 3, lora_alpha=3, config=LoraConfig(r=3, target_modules=["x"]), target_name="blk")
    assert layer.lora_A["a"].weight.shape == (2, 7) and layer.lora_B["a"].weight.shape == (5, 2), broken(
        "linear factor shapes changed")
    assert layer.lora_A["b"].weight.shape == (3, 7) and layer.lora_B["b"].weight.shape == (5, 3), broken(
        "update_layer no longer adds a second adapter's factors")
    assert isinstance(layer.lora_dropout["a"], nn.Dropout), broken("lora_dropout is no longer nn.Dropout")
    layer.set_scale("a", -1.0)
    assert layer.scaling["a"] == -2.0, broken("set_scale(adapter, w) no longer sets w * lora_alpha / r")


def test_layer_name_tuples():
    for name in ("lora_A", "lora_B"):
        assert name in LoraLayer.adapter_layer_names, broken(f"{name} left LoraLayer.adapter_layer_names")
    for name in ("r", "lora_alpha", "scaling", "lora_dropout"):
        assert name in LoraLayer.other_param_names, broken(f"{name} left LoraLayer.other_param_names")
    assert set(LoraLayer.other_param_names) < set(LieConv2d.other_param_names), broken(
        "Lie layers must extend LoraLayer.other_param_names (with lie_mode)")


@pytest.mark.filterwarnings("ignore:Adapter a was active which is now deleted")
def test_delete_adapter_removes_lie_mode():
    assert callable(getattr(BaseTunerLayer, "delete_adapter", None)), broken("BaseTunerLayer.delete_adapter is gone")
    config = LieLoraConfig(r=2, lora_alpha=2, target_modules=["x"])
    layer = LieConv2d(nn.Conv2d(3, 4, 3), "a", config=config, r=2, lora_alpha=2)
    layer.update_layer("b", 2, lora_alpha=2, config=config)
    layer.delete_adapter("a")
    assert list(layer.lora_A) == ["b"] and "a" not in layer.scaling, broken("delete_adapter no longer clears layers")
    assert layer.lie_mode == {"b": "exp"}, broken("delete_adapter no longer clears entries named in other_param_names")


def test_add_weighted_adapter_arguments_that_lie_layers_read():
    """Lie layers read the arguments of the add_weighted_adapter call that is building an adapter on them."""
    names = params(LoraModel.add_weighted_adapter)
    assert names[:2] == ["self", "adapters"] and "combination_type" in names, broken(
        f"LoraModel.add_weighted_adapter signature is now {names}")


def test_check_adapters_to_merge():
    assert params(check_adapters_to_merge) == ["module", "adapter_names"], broken("check_adapters_to_merge signature")
    config = LieLoraConfig(r=2, lora_alpha=2, target_modules=["x"])
    layer = LieConv2d(nn.Conv2d(3, 4, 3), "a", config=config, r=2, lora_alpha=2)
    layer.update_layer("b", 2, lora_alpha=2, config=config)
    layer.set_adapter(["a", "b"])
    assert check_adapters_to_merge(layer, None) == ["a", "b"], broken("check_adapters_to_merge(None) != active")
    layer.merged_adapters.append("a")
    with pytest.warns(UserWarning):
        assert check_adapters_to_merge(layer, None) == ["b"], broken("merged adapters are no longer filtered out")


# --- peft's own routes on a small custom model (items of issue 8: none may give a different model silently) ---------


class ConvNet(nn.Module):
    """A small custom model in the style of peft's tests/test_custom_models.py: two convs and a linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 3)
        self.lin = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        return self.lin(torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1))


X = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
TARGETS = ["conv1", "conv2", "lin"]


def peft_lie(mode="exp", adapter="default", targets=TARGETS, seed=2, model=None, **kwargs):
    """A ConvNet under get_peft_model with a bare LieLoraConfig (no registration step), factors randomized."""
    config = LieLoraConfig(r=2, lora_alpha=3, target_modules=targets, lie_mode=mode, **kwargs)
    if model is None:
        model = get_peft_model(ConvNet(), config, adapter_name=adapter)
    else:
        model.add_adapter(adapter, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f"lora_B.{adapter}." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def lie_conv_reference(conv, factors, **conv_kwargs):
    """F.conv2d with W ⊙ Π M(sᵢΔᵢ), written from the formula: exp → exp(sΔ), taylor → 1 + sΔ."""
    multiplier = torch.ones_like(conv.weight)
    for A, B, s, mode in factors:
        delta = (B.flatten(1) @ A.flatten(1)).reshape(conv.weight.shape) * s
        multiplier = multiplier * (torch.exp(delta) if mode == "exp" else 1 + delta)
    return nn.functional.conv2d(X if not conv_kwargs else conv_kwargs.pop("x"), conv.weight * multiplier, conv.bias,
                                padding=conv.padding)


def test_bare_lie_lora_config_builds_lie_layers_and_survives_copies(tmp_path):
    """Item 2: a LieLoraConfig without any registration step still gives Lie layers, also after copies/JSON."""
    config = LieLoraConfig(r=2, target_modules=TARGETS, lie_mode="taylor")
    copies = [config, copy.deepcopy(config), dataclasses.replace(config), LieLoraConfig(**config.to_dict())]
    config.save_pretrained(tmp_path)
    copies.append(LieLoraConfig.from_pretrained(tmp_path))
    for each in copies:
        model = get_peft_model(ConvNet(), each)
        kinds = {name: type(model.base_model.model.get_submodule(name)) for name in TARGETS}
        assert kinds == {"conv1": LieConv2d, "conv2": LieConv2d, "lin": LoraLinear}, kinds
        assert model.base_model.model.conv1.lie_mode == {"default": "taylor"}
    model = get_peft_model(ConvNet(), LieLoraConfig(r=2, target_modules=TARGETS, lie_linear=True))
    assert isinstance(model.base_model.model.lin, LieLinear)


def test_lie_lora_config_on_an_existing_plain_lora_layer_fails_loudly():
    """Item 2: a plain peft LoRA layer must not take a Lie adapter as additive LoRA."""
    model = get_peft_model(ConvNet(), LoraConfig(r=2, target_modules=["conv1"]))
    with pytest.raises(ValueError, match="lie_mode"):
        model.add_adapter("lie", LieLoraConfig(r=2, target_modules=["conv1"]))


@pytest.mark.filterwarnings("ignore:Adapter default was active", "ignore:Adapter plain2 was active")
def test_deleted_lie_adapter_leaves_a_layer_that_takes_either_kind():
    """Item 1 at peft level: once its adapters are deleted, a Lie layer takes a plain LoRA adapter and back."""
    model = peft_lie()
    model.add_adapter("plain", LoraConfig(r=2, target_modules=["lin"]))
    model.delete_adapter("default")
    model.add_adapter("plain2", LoraConfig(r=2, lora_alpha=4, target_modules=["conv1"]))
    conv1 = model.base_model.model.conv1
    assert type(conv1) is LoraConv2d and list(conv1.lora_A) == ["plain2"] and not hasattr(conv1, "lie_mode")
    with torch.no_grad():
        conv1.lora_B["plain2"].weight.normal_()
        model.set_adapter("plain2")
        A, B = conv1.lora_A["plain2"].weight, conv1.lora_B["plain2"].weight
        base = conv1.get_base_layer()
        want = nn.functional.conv2d(X, base.weight + 2 * (B.flatten(1) @ A.flatten(1)).reshape(base.weight.shape),
                                    base.bias, padding=1)
        torch.testing.assert_close(conv1(X), want, rtol=0, atol=1e-5)  # W + sBA: plain LoRA, exactly
    model.delete_adapter("plain2")
    peft_lie("taylor", adapter="again", targets=["conv1"], model=model)
    assert model.base_model.model.conv1 is conv1 and type(conv1) is LieConv2d and conv1.lie_mode == {"again": "taylor"}


@pytest.mark.parametrize("mode", ["exp", "taylor"])
def test_peft_save_pretrained_round_trip_is_exact_or_loud(tmp_path, mode):
    """Item 3: PeftModel.save_pretrained → from_pretrained never rebuilds a Lie model as additive LoRA."""
    model = peft_lie(mode).eval()
    with torch.no_grad():
        want = model(X)
    model.save_pretrained(tmp_path)
    with pytest.raises(KeyError, match="lie-diffusion"):
        PeftModel.from_pretrained(ConvNet(), tmp_path)
    with pytest.raises(KeyError, match="lie-diffusion"):
        PeftConfig.from_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(ConvNet(), tmp_path, config=LieLoraConfig.from_pretrained(tmp_path)).eval()
    assert isinstance(loaded.base_model.model.conv1, LieConv2d) and loaded.base_model.model.conv1.lie_mode == {
        "default": mode}
    with torch.no_grad():
        assert torch.equal(loaded(X), want)


def test_lie_factors_in_a_state_dict_do_not_fit_plain_lora_layers():
    """Item 3/4: Lie factors taken for plain LoRA (peft or diffusers without the LieLoraConfig) fail on shapes."""
    state = get_peft_model_state_dict(peft_lie())
    assert state["base_model.model.conv1.lora_B.weight"].shape == (6, 2, 1, 1, 1)
    assert state["base_model.model.lin.lora_B.weight"].shape == (5, 2)  # attention-style LoRA stays plain LoRA
    plain = get_peft_model(ConvNet(), LoraConfig(r=2, target_modules=TARGETS))
    with pytest.raises(RuntimeError, match="size mismatch"):
        set_peft_model_state_dict(plain, state)
    again = peft_lie(seed=7)
    set_peft_model_state_dict(again, state)  # the Lie layers read their own layout
    with torch.no_grad():
        assert torch.equal(again(X), peft_lie()(X))


def weighted(model, adapters, weights):
    model.add_weighted_adapter(adapters, weights, "mix", combination_type="cat")
    model.set_adapter("mix")
    with torch.no_grad():
        return model(X)


def factors_of(layer, adapter, weight):
    return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, weight * layer.scaling[adapter], \
        layer.lie_mode[adapter]


def test_add_weighted_adapter_cat_of_exp_adapters_is_exact():
    """Item 5: exp + exp by cat is W ⊙ exp(w₁s₁Δ₁ + w₂s₂Δ₂), checked against the formula on conv1."""
    model = peft_lie("exp", "one", targets=["conv1"])
    peft_lie("exp", "two", targets=["conv1"], seed=3, model=model)
    conv1 = model.base_model.model.conv1
    want = lie_conv_reference(conv1.get_base_layer(), [factors_of(conv1, "one", 0.7), factors_of(conv1, "two", -0.4)])
    model.add_weighted_adapter(["one", "two"], [0.7, -0.4], "mix", combination_type="cat")
    model.set_adapter("mix")
    assert conv1.lie_mode["mix"] == "exp"
    with torch.no_grad():
        torch.testing.assert_close(conv1(X), want, rtol=0, atol=1e-5)


def test_add_weighted_adapter_on_different_layers_keeps_each_mode():
    """Item 5: adapters on different layers combine exactly, each layer keeping its adapter's mode."""
    model = peft_lie("exp", "one", targets=["conv1"])
    peft_lie("taylor", "two", targets=["conv2"], seed=3, model=model)
    base = model.base_model.model
    want_1 = lie_conv_reference(base.conv1.get_base_layer(), [factors_of(base.conv1, "one", 0.5)])
    h = torch.relu(want_1)
    want_2 = lie_conv_reference(base.conv2.get_base_layer(), [factors_of(base.conv2, "two", 2.0)], x=h)
    weighted(model, ["one", "two"], [0.5, 2.0])
    assert base.conv1.lie_mode["mix"] == "exp" and base.conv2.lie_mode["mix"] == "taylor"
    with torch.no_grad():
        torch.testing.assert_close(base.conv1(X), want_1, rtol=0, atol=1e-5)
        torch.testing.assert_close(base.conv2(h), want_2, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "modes,combination_type,match",
    [
        (("taylor", "taylor"), "cat", r"1 \+ Δ1 \+ Δ2"),
        (("exp", "taylor"), "cat", "one mode"),
        (("exp", "exp"), "svd", "combination_type='svd'"),
        (("exp", "exp"), "linear", "combination_type='linear'"),
    ],
)
def test_add_weighted_adapter_refuses_inexact_combinations(modes, combination_type, match):
    """Item 5: the other cases raise, name the layer, and leave no half-built adapter behind."""
    model = peft_lie(modes[0], "one", targets=["conv1", "lin"])
    peft_lie(modes[1], "two", targets=["conv1", "lin"], seed=3, model=model)
    with torch.no_grad():
        model.set_adapter("one")
        before = model(X)
    with pytest.raises(ValueError, match=rf"conv1: add_weighted_adapter cannot combine Lie adapters.*{match}"):
        model.add_weighted_adapter(["one", "two"], [1.0, 1.0], "mix", combination_type=combination_type)
    assert "mix" not in model.peft_config
    assert not any("mix" in getattr(m, "lora_A", {}) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(X), before)
