"""Lie layers (peft LoRA tuner layers) on single nn.Conv2d / nn.Linear modules, against the formula."""

import copy
import warnings

import pytest
import torch
from peft import LoraConfig
from torch import nn
from torch.func import functional_call

from lie_diffusion.layers import LieConv2d, LieLinear, LieLoraConfig


def lie_config(r=2, alpha=None, mode="exp", dropout=0.0, **kwargs):
    return LieLoraConfig(r=r, lora_alpha=r if alpha is None else alpha, lora_dropout=dropout, lie_mode=mode,
                         target_modules=["layer"], **kwargs)


def wrap(base, r=2, alpha=None, mode="exp", dropout=0.0, name="a"):
    cls = LieConv2d if isinstance(base, nn.Conv2d) else LieLinear
    alpha = r if alpha is None else alpha
    return cls(base, name, config=lie_config(r, alpha, mode, dropout), r=r, lora_alpha=alpha, target_name="blk.layer")


def add(layer, name, r=2, alpha=None, mode="exp", dropout=0.0):
    alpha = r if alpha is None else alpha
    layer.update_layer(name, r, lora_alpha=alpha, config=lie_config(r, alpha, mode, dropout), target_name="blk.layer")


def randomize(layer, std=0.3):
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "lora_" in name:
                p.normal_(0, std)
    return layer


def ref_weight(W, layer, adapters):
    """W ⊙ exp(Σ exp-Δ) ⊙ Π (1 + taylor-Δ) from the layer's factors and current scalings."""
    W = W.double()
    exp_sum, out = torch.zeros_like(W), W
    for a in adapters:
        A, B = layer.lora_A[a].weight.double(), layer.lora_B[a].weight.double()
        delta = (B.flatten(1) @ A.flatten(1)).reshape(W.shape) * layer.scaling[a]
        if layer.lie_mode[a] == "exp":
            exp_sum = exp_sum + delta
        else:
            out = out * (1 + delta)
    return out * exp_sum.exp()


def ref_forward(base, weight, x):
    """The base module's own forward (its padding mode and all) with the weight replaced."""
    ref = copy.deepcopy(base).double()
    with torch.no_grad():
        ref.weight.copy_(weight)
    return ref(x.double())


CONVS = {
    "3x3_pad1": lambda: nn.Conv2d(6, 8, 3, padding=1),
    "1x1_shortcut": lambda: nn.Conv2d(6, 8, 1),
    "3x3_stride2_downsampler": lambda: nn.Conv2d(6, 6, 3, stride=2, padding=1),
    "dilation2": lambda: nn.Conv2d(6, 8, 3, padding=2, dilation=2),
    "reflect_padding": lambda: nn.Conv2d(6, 8, 3, padding=1, padding_mode="reflect"),
    "circular_padding_stride2": lambda: nn.Conv2d(6, 8, 3, stride=2, padding=(1, 2), padding_mode="circular"),
    "valid_padding": lambda: nn.Conv2d(6, 8, 3, padding="valid", bias=False),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("geometry", sorted(CONVS))
@pytest.mark.parametrize("mode", ["exp", "taylor"])
def test_conv_identity_at_init_and_reference(geometry, mode):
    base = CONVS[geometry]()
    layer = wrap(copy.deepcopy(base), r=3, alpha=6, mode=mode)
    x = torch.randn(2, 6, 9, 9)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=1e-6)  # B = 0: the group identity
    randomize(layer)
    expected = ref_forward(base, ref_weight(base.weight, layer, ["a"]), x)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["exp", "taylor"])
def test_linear_identity_at_init_and_reference(mode):
    base = nn.Linear(7, 5)
    layer = wrap(copy.deepcopy(base), r=2, alpha=1, mode=mode)
    x = torch.randn(3, 4, 7)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=1e-6)
    randomize(layer)
    expected = ref_forward(base, ref_weight(base.weight, layer, ["a"]), x)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_parameter_counts_and_factor_shapes():
    conv = wrap(nn.Conv2d(6, 8, (3, 5), padding=1), r=3)
    assert conv.lora_A["a"].weight.shape == (3, 6, 3, 5) and conv.lora_B["a"].weight.shape == (8, 3, 1, 1)
    assert sum(p.numel() for n, p in conv.named_parameters() if "lora_" in n) == 3 * (6 * 3 * 5) + 8 * 3
    linear = wrap(nn.Linear(7, 5), r=4)
    assert linear.lora_A["a"].weight.shape == (4, 7) and linear.lora_B["a"].weight.shape == (5, 4)
    assert sum(p.numel() for n, p in linear.named_parameters() if "lora_" in n) == 4 * (7 + 5)


def test_unsupported_convs_name_the_module():
    with pytest.raises(ValueError, match=r"blk\.layer.*groups=2"):
        wrap(nn.Conv2d(6, 8, 3, groups=2))
    with pytest.raises(ValueError, match=r"blk\.layer.*padding='same'"):
        wrap(nn.Conv2d(6, 8, 3, padding="same"))


def test_unsupported_configs_are_refused():
    layer = wrap(nn.Conv2d(6, 8, 3))
    with pytest.raises(ValueError, match="Plain LoRA and Lie adapters cannot share"):
        layer.update_layer("plain", 2, lora_alpha=2, config=LoraConfig(r=2, target_modules=["x"]), target_name="blk")
    for bad in (dict(use_dora=True), dict(lora_bias=True), dict(init_lora_weights="pissa")):
        with pytest.raises(ValueError, match="do not support"):
            layer.update_layer("bad", 2, lora_alpha=2, config=lie_config(**bad), target_name="blk")
    assert list(layer.lora_A) == ["a"]
    with pytest.raises(ValueError, match="adapter_names"):
        layer(torch.randn(1, 6, 5, 5), adapter_names=["a"])


def test_layer_gradients_match_finite_differences():
    """Through the layer (dropout, scaling, factor lookup): float64 gradcheck in the adapter parameters."""
    layer = randomize(wrap(nn.Conv2d(3, 4, 3, stride=2, padding=1), r=2, alpha=3)).double()
    add(layer, "b", mode="taylor")
    randomize(layer)
    layer.set_adapter(["a", "b"])
    names = [n for n, _ in layer.named_parameters() if "lora_" in n]
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)

    def fn(*params):
        return functional_call(layer, dict(zip(names, params)), (x,))

    params = tuple(dict(layer.named_parameters())[n].detach().clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(fn, params)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_forward_saves_no_adapted_weight(dropout):
    """The memory claim: the graph of a training forward holds W itself (the parameter) but no W'-sized copy."""
    layer = randomize(wrap(nn.Conv2d(6, 8, 3, padding=1), r=2, dropout=dropout)).train()
    W = layer.get_base_layer().weight
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(torch.randn(2, 6, 7, 7, requires_grad=True))
    assert [t for t in saved if t.shape == W.shape and t.data_ptr() != W.data_ptr()] == []
    assert any(t.data_ptr() == W.data_ptr() for t in saved)
    out.sum().backward()  # and it still trains
    assert layer.lora_A["a"].weight.grad is not None and layer.lora_B["a"].weight.grad is not None


def test_dropout_is_stochastic_in_train_and_identity_in_eval():
    base = nn.Conv2d(6, 8, 3, padding=1)
    layer = randomize(wrap(copy.deepcopy(base), dropout=0.5))
    x = torch.randn(2, 6, 7, 7)
    layer.train()
    first, second = layer(x), layer(x)
    assert not torch.allclose(first, second), "dropout should make training forwards differ"
    layer.eval()
    expected = ref_forward(base, ref_weight(base.weight, layer, ["a"]), x)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)


def test_disable_adapters():
    base = nn.Conv2d(6, 8, 3, padding=1)
    layer = randomize(wrap(copy.deepcopy(base)))
    x = torch.randn(1, 6, 5, 5)
    adapted = layer(x)
    layer.enable_adapters(False)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=1e-6)
    layer.enable_adapters(True)
    torch.testing.assert_close(layer(x), adapted, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:Already following adapters were merged")
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_merge_unmerge_with_several_adapters_and_changed_scales(kind):
    base = nn.Conv2d(6, 8, 3, padding=1) if kind == "conv" else nn.Linear(7, 5)
    x = torch.randn(2, 6, 7, 7) if kind == "conv" else torch.randn(3, 7)
    layer = wrap(copy.deepcopy(base), r=2)
    add(layer, "b", r=3, alpha=1.5, mode="taylor")
    add(layer, "c", r=1, mode="exp")
    randomize(layer)
    layer.set_adapter(["a", "b", "c"])
    layer.set_scale("a", 0.7)
    layer.set_scale("c", -1.3)
    W0 = base.weight.detach().clone()
    unmerged = layer(x)
    expected_w = ref_weight(W0, layer, ["a", "b", "c"])

    layer.merge()
    torch.testing.assert_close(layer.get_base_layer().weight.double(), expected_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    layer.set_scale("a", -2.0)  # changing the scale while merged must not break unmerge
    layer.unmerge()
    torch.testing.assert_close(layer.get_base_layer().weight, W0, rtol=1e-6, atol=1e-7)

    # Partly merged: "a" in W, "b" and "c" still applied by the op; the result is the same adapted layer.
    layer.set_scale("a", 0.7)
    layer.merge(adapter_names=["a"])
    assert layer.merged_adapters == ["a"]
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    layer.merge(adapter_names=["c"])
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.get_base_layer().weight, W0, rtol=1e-6, atol=1e-7)
    assert not layer.merged


def test_unmerge_after_deleting_a_merged_adapter_keeps_it_baked_in():
    """As with peft's LoRA layers: an adapter deleted while merged stays in W; the others unmerge exactly."""
    layer = wrap(nn.Conv2d(6, 8, 3))
    add(layer, "b", mode="taylor")
    randomize(layer)
    layer.set_adapter(["a", "b"])
    only_b = ref_weight(layer.get_base_layer().weight.detach(), layer, ["b"])
    layer.merge()
    layer.delete_adapter("b")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.get_base_layer().weight.double(), only_b, rtol=1e-5, atol=1e-6)


def test_merged_weight_is_w_times_exp_of_low_rank():
    """Acceptance: W_fused / W = exp(rank-r tensor) (exp) or 1 + rank-r tensor (taylor); exp never flips signs."""
    for mode in ("exp", "taylor"):
        base = nn.Conv2d(16, 12, 3, padding=1)
        with torch.no_grad():
            base.weight[0, :3] = 0.0
        W0 = base.weight.detach().clone()
        layer = randomize(wrap(base, r=2, mode=mode), std=1.0)
        layer.merge()
        fused = layer.get_base_layer().weight.detach()
        nonzero = W0 != 0
        assert torch.equal(fused[~nonzero], W0[~nonzero]), "zeros stay zero"
        ratio = (fused.double() / W0.double()).masked_fill(~nonzero, 1.0)
        algebra = ratio.log() if mode == "exp" else ratio - 1
        algebra[~nonzero] = 0.0
        # Rows with zeroed kernels are outside the support; the rest is a low-rank matrix.
        flat = algebra[1:].flatten(1)
        assert torch.linalg.matrix_rank(flat, rtol=1e-4).item() <= 2
        assert flat.abs().max() > 0.5, "the test needs a large update to mean anything"
        if mode == "exp":
            assert torch.equal(torch.sign(fused), torch.sign(W0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_layer(dtype):
    base = nn.Conv2d(6, 8, 3, padding=1)
    layer = randomize(wrap(copy.deepcopy(base)))
    layer.get_base_layer().to(dtype)
    x = torch.randn(2, 6, 7, 7, dtype=dtype)
    out = layer(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    expected = ref_forward(base, ref_weight(base.weight.to(dtype), layer, ["a"]), x)
    torch.testing.assert_close(out.double(), expected, rtol=0.05, atol=0.05)
    out.float().square().mean().backward()
    for name, p in layer.named_parameters():
        if "lora_" in name:
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.merge(safe_merge=True)
    assert layer.get_base_layer().weight.dtype == dtype


def test_safe_merge_refuses_non_finite():
    layer = wrap(nn.Linear(7, 5))
    with torch.no_grad():
        layer.lora_A["a"].weight.fill_(30.0)
        layer.lora_B["a"].weight.fill_(30.0)
    W0 = layer.get_base_layer().weight.detach().clone()
    with pytest.raises(ValueError, match="'a'"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, W0) and not layer.merged


def test_get_delta_weight_is_the_additive_equivalent():
    base = nn.Conv2d(6, 8, 3)
    layer = randomize(wrap(copy.deepcopy(base)))
    expected = ref_weight(base.weight, layer, ["a"]) - base.weight.double()
    torch.testing.assert_close(layer.get_delta_weight("a").double(), expected, rtol=1e-5, atol=1e-6)
