"""The peft internals lie_diffusion builds on. peft marks its custom-module API experimental: if any of
these fail after a peft upgrade, fix lie_diffusion/layers.py and inject.py before widening the pin."""

import inspect
from importlib.metadata import version

import pytest
import torch
from packaging.version import Version
from peft import LoraConfig
from peft.tuners.lora import LoraLayer, LoraModel
from peft.tuners.lora import layer as lora_layer
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from lie_diffusion.layers import LieConv2d, LieLoraConfig

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
