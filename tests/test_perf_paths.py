"""The speed paths: the single-adapter backward, the W' cache of unfused inference, keeping W' for
backward, and gradient checkpointing. Each is checked against float64 references written from the
formula (W' = W ⊙ exp(sBA) or W + W ⊙ sBA, then a plain conv / linear differentiated by autograd)."""

import copy
import gc
import weakref
from unittest import mock

import pytest
import torch
from torch import nn

import lie_diffusion.functional as functional
from lie_diffusion import LieConfig, add_lie_adapters
from lie_diffusion.functional import LieFactor, lie_conv2d, lie_linear
from lie_diffusion.layers import LieConv2d, LieLinear, LieLoraConfig, set_lie_speed_options
from lie_diffusion.tiny import tiny_unet


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def reference_weight(W, A, B, s, mode):
    delta = (B.flatten(1) @ A.flatten(1)).reshape(W.shape) * s
    return W * torch.exp(delta) if mode == "exp" else W + W * delta


CASES = {  # name: (op, W shape, A shape, B shape, x shape, op kwargs)
    "conv3x3": (lie_conv2d, (5, 3, 3, 3), (2, 3, 3, 3), (5, 2, 1, 1), (2, 3, 6, 6), dict(padding=1)),
    "conv_stride2": (lie_conv2d, (4, 3, 3, 3), (2, 3, 3, 3), (4, 2, 1, 1), (2, 3, 7, 7), dict(stride=2, padding=1)),
    "linear": (lie_linear, (5, 4), (2, 4), (5, 2), (2, 3, 4), {}),
}


def plain(op, x, W, b, kwargs):
    return nn.functional.conv2d(x, W, b, **kwargs) if op is lie_conv2d else nn.functional.linear(x, W, b)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("mode", ["exp", "taylor"])
@pytest.mark.parametrize("keep_adapted", [False, True])
def test_single_adapter_path_gradcheck_and_reference(case, mode, keep_adapted):
    """Frozen W (the training case) takes the one-buffer path: finite differences in float64, and the
    same gradients as autograd through the formula and as the general path (W requiring grad)."""
    op, w_shape, a_shape, b_shape, x_shape, kwargs = CASES[case]
    f64 = dict(dtype=torch.float64)
    x, W, b = torch.randn(x_shape, **f64, requires_grad=True), torch.randn(w_shape, **f64) * 0.3, torch.randn(w_shape[0], **f64)
    A, B = (torch.randn(a_shape, **f64) * 0.4).requires_grad_(), (torch.randn(b_shape, **f64) * 0.4).requires_grad_()

    def fn(x, A, B):
        return op(x, W, b, [LieFactor(A, B, 0.7, mode)], keep_adapted=keep_adapted, **kwargs)

    assert torch.autograd.gradcheck(fn, (x, A, B))
    grad_out = torch.randn_like(fn(x, A, B))
    fast = torch.autograd.grad(fn(x, A, B), (x, A, B), grad_out)
    reference = torch.autograd.grad(plain(op, x, reference_weight(W, A, B, 0.7, mode), b, kwargs), (x, A, B), grad_out)
    W_grad = W.clone().requires_grad_()  # needs dL/dW too: the general path
    general = torch.autograd.grad(op(x, W_grad, b, [LieFactor(A, B, 0.7, mode)], **kwargs), (x, A, B), grad_out)
    for got, ref, gen in zip(fast, reference, general):
        torch.testing.assert_close(got, ref)
        torch.testing.assert_close(gen, ref)


def test_single_adapter_path_does_not_take_the_general_one(monkeypatch):
    def refuse(*args):
        raise AssertionError("one adapter on a frozen W went through the general backward")

    monkeypatch.setattr(functional, "_general_delta_grads", refuse)
    W = torch.randn(5, 3, 3, 3)
    A, B = torch.randn(2, 3, 3, 3, requires_grad=True), torch.randn(5, 2, 1, 1, requires_grad=True)
    lie_conv2d(torch.randn(1, 3, 5, 5), W, None, [LieFactor(A, B, 1.0, "exp")], padding=1).sum().backward()
    assert A.grad is not None and B.grad is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["exp", "taylor"])
def test_single_adapter_path_half_precision_weight(dtype, mode):
    """A half-precision frozen W with float32 factors: W' is built in float32, the op runs in W's dtype."""
    W = torch.randn(6, 4, 3, 3) * 0.3
    A, B = torch.randn(2, 4, 3, 3) * 0.3, torch.randn(6, 2, 1, 1) * 0.3
    x = torch.randn(2, 4, 6, 6)
    got_A, got_B = A.clone().requires_grad_(), B.clone().requires_grad_()
    out = lie_conv2d(x.to(dtype), W.to(dtype), None, [LieFactor(got_A, got_B, 0.5, mode)], padding=1)
    assert out.dtype == dtype
    out.float().square().sum().backward()
    ref_A, ref_B = A.double().requires_grad_(), B.double().requires_grad_()
    ref = nn.functional.conv2d(x.to(dtype).double(), reference_weight(W.to(dtype).double(), ref_A, ref_B, 0.5, mode), padding=1)
    ref.square().sum().backward()
    tol = dict(rtol=5e-2, atol=5e-2 * ref_A.grad.abs().max().item())
    torch.testing.assert_close(got_A.grad.double(), ref_A.grad, **tol)
    torch.testing.assert_close(got_B.grad.double(), ref_B.grad, **tol)


# --- The W' cache of unfused inference ------------------------------------------------------------


def lie_layer(base, name="a", mode="exp", r=2, dropout=0.0):
    cls = LieConv2d if isinstance(base, nn.Conv2d) else LieLinear
    config = LieLoraConfig(r=r, lora_alpha=r, lora_dropout=dropout, lie_mode=mode, target_modules=["layer"])
    layer = cls(base, name, config=config, r=r, lora_alpha=r, target_name="layer")
    randomize(layer)
    return layer.eval()


def add_adapter(layer, name, mode="exp", r=2):
    config = LieLoraConfig(r=r, lora_alpha=r, lie_mode=mode, target_modules=["layer"])
    layer.update_layer(name, r, lora_alpha=r, config=config, target_name="layer")
    randomize(layer)


def randomize(layer):
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "lora_B" in name and not p.any():
                p.normal_(0, 0.3)


def expected(layer, x):
    """The layer's output from the formula in float64: the active, unmerged adapters on the base weight."""
    base = layer.get_base_layer()
    W = base.weight.double()
    for a in layer.active_adapters:
        if a in layer.lora_A and a not in layer.merged_adapters:
            A, B = layer.lora_A[a].weight.double(), layer.lora_B[a].weight.double()
            W = reference_weight(W, A, B, layer.scaling[a], layer.lie_mode[a])
    ref = copy.deepcopy(base).double()
    with torch.no_grad():
        ref.weight.copy_(W)
        return ref(x.double())


def cached(layer):
    return None if layer._lie_cache is None else layer._lie_cache[2]


def check(layer, x):
    """Run without grad twice; both match the formula, the second reuses the first's W'. Returns that W'."""
    with torch.no_grad():
        first = layer(x)
        built = cached(layer)
        second = layer(x)
    assert built is not None and cached(layer) is built, "a no-grad call rebuilt W' although nothing changed"
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first.double(), expected(layer, x), **tol)
    torch.testing.assert_close(second, first)
    return built


@pytest.fixture(params=["conv", "linear"])
def layer_and_input(request):
    if request.param == "conv":
        return lie_layer(nn.Conv2d(4, 6, 3, padding=1)), torch.randn(2, 4, 5, 5)
    return lie_layer(nn.Linear(4, 6)), torch.randn(2, 3, 4)


def rebuilt(layer, x, before):
    """After a change: the next no-grad call matches the formula with a newly built W'."""
    after = check(layer, x)
    assert after is not before, "the cache served a stale W'"
    return after


def test_cache_is_invalidated_by_factor_and_weight_updates(layer_and_input):
    layer, x = layer_and_input
    w = check(layer, x)
    with torch.no_grad():
        layer.lora_A["a"].weight.add_(0.1)  # an optimizer step: in place, version bumped
    w = rebuilt(layer, x, w)
    layer.lora_B["a"].weight.data.mul_(1.5)  # through .data: no version bump, seen by value
    w = rebuilt(layer, x, w)
    layer.lora_B["a"].weight.data = layer.lora_B["a"].weight.data * 0.5  # a new tensor
    w = rebuilt(layer, x, w)
    with torch.no_grad():
        layer.get_base_layer().weight.mul_(1.1)  # the base weight changes
    rebuilt(layer, x, w)


def test_cache_is_invalidated_by_adapter_set_and_scale(layer_and_input):
    layer, x = layer_and_input
    add_adapter(layer, "b", mode="taylor")
    w = check(layer, x)  # only "a" active
    layer.set_adapter(["a", "b"])
    w = rebuilt(layer, x, w)
    layer.set_scale("b", 0.5)
    w = rebuilt(layer, x, w)
    layer.scale_layer(2.0)
    w = rebuilt(layer, x, w)
    layer.set_adapter(["b"])
    rebuilt(layer, x, w)


def test_cache_is_released_by_disable_merge_delete_and_moves(layer_and_input):
    layer, x = layer_and_input
    check(layer, x)
    layer.enable_adapters(False)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.get_base_layer()(x))
    assert layer._lie_cache is None
    layer.enable_adapters(True)
    w = check(layer, x)

    layer.merge()
    assert layer._lie_cache is None
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), expected(layer, x), rtol=1e-5, atol=1e-5)
    layer.unmerge()
    w = rebuilt(layer, x, w)

    layer.double()
    assert layer._lie_cache is None
    assert check(layer, x.double()).dtype == torch.float64
    layer.float()
    w = check(layer, x)

    ref = weakref.ref(w)
    del w
    layer.delete_adapter("a")
    gc.collect()
    assert layer._lie_cache is None and ref() is None


def test_cache_is_freed_when_adapters_are_unloaded():
    unet = tiny_unet()
    add_lie_adapters(unet, LieConfig(rank=2))
    randomize(unet)
    inputs = dict(sample=torch.randn(1, 4, 8, 8), timestep=torch.tensor([3]), encoder_hidden_states=torch.randn(1, 5, 32))
    with torch.no_grad():
        unet(**inputs)
    refs = [weakref.ref(m._lie_cache[2]) for m in unet.modules() if isinstance(m, LieConv2d)]
    assert refs and all(r() is not None for r in refs)
    unet.unload_lora()
    gc.collect()
    assert all(r() is None for r in refs)


def test_cache_is_never_used_while_grad_is_needed(layer_and_input):
    layer, x = layer_and_input
    out = layer(x)  # factors require grad: the op, with its backward
    assert layer._lie_cache is None and out.requires_grad
    out.sum().backward()
    assert layer.lora_A["a"].weight.grad is not None

    layer.requires_grad_(False)
    xg = x.clone().requires_grad_()
    out = layer(xg)  # only the input needs grad: still no cache, and the gradient flows to x
    assert layer._lie_cache is None
    out.sum().backward()
    base = layer.get_base_layer()
    A, B = layer.lora_A["a"].weight.double(), layer.lora_B["a"].weight.double()
    ref_x = x.double().requires_grad_()
    weight = reference_weight(base.weight.double(), A, B, layer.scaling["a"], "exp")
    op = lie_conv2d if isinstance(base, nn.Conv2d) else lie_linear
    plain(op, ref_x, weight, base.bias.double(), dict(padding=base.padding) if op is lie_conv2d else {}).sum().backward()
    torch.testing.assert_close(xg.grad.double(), ref_x.grad, rtol=1e-5, atol=1e-5)

    out = layer(x)  # grad mode on, nothing requires grad: the cache may serve
    assert cached(layer) is not None and not out.requires_grad

    layer.requires_grad_(True)
    layer(x)  # training again after a no-grad pass: the kernel is released, not held through training
    assert layer._lie_cache is None


def test_cache_off_switch_dropout_and_inference_mode():
    layer, x = lie_layer(nn.Conv2d(4, 6, 3, padding=1), dropout=0.5), torch.randn(2, 4, 5, 5)
    layer.train()
    with torch.no_grad():
        layer(x)
    assert layer._lie_cache is None  # dropout acts in training: each call differs
    layer.eval()
    with torch.inference_mode():
        w = check(layer, x)
    with torch.no_grad():  # built under inference_mode, reused outside it
        layer(x)
    assert cached(layer) is w

    assert set_lie_speed_options(layer, weight_cache=False) == 1
    assert layer._lie_cache is None
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), expected(layer, x), rtol=1e-5, atol=1e-5)
    assert layer._lie_cache is None


def test_cache_under_autocast_holds_the_autocast_dtype():
    layer, x = lie_layer(nn.Conv2d(4, 6, 3, padding=1)), torch.randn(2, 4, 5, 5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        uncached = layer(x)
        again = layer(x)
        assert cached(layer).dtype == torch.bfloat16
        cached_out = layer(x)
    set_lie_speed_options(layer, weight_cache=False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        direct = layer(x)
    assert uncached.dtype == cached_out.dtype == direct.dtype == torch.bfloat16
    torch.testing.assert_close(cached_out, direct)
    torch.testing.assert_close(again, direct)


# --- A whole UNet: cached inference, keeping W', gradient checkpointing ------------------------------


def adapted_unet(mode="exp"):
    unet = tiny_unet()
    add_lie_adapters(unet, LieConfig(rank=2, mode=mode, attn_adapter="lie"))
    randomize(unet)
    return unet


UNET_INPUTS = dict(sample=torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), timestep=torch.tensor([3, 700]),
                   encoder_hidden_states=torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2)))


def test_unet_cached_inference_matches_uncached_and_fused():
    unet = adapted_unet().eval()
    with torch.no_grad():
        first, second = unet(**UNET_INPUTS).sample, unet(**UNET_INPUTS).sample
        set_lie_speed_options(unet, weight_cache=False)
        uncached = unet(**UNET_INPUTS).sample
        unet.fuse_lora()
        fused = unet(**UNET_INPUTS).sample
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    torch.testing.assert_close(first, uncached)
    torch.testing.assert_close(first, fused, rtol=1e-4, atol=1e-5)


def grads(unet, checkpointing=False, keep_adapted=False, counts=None):
    """Adapter gradients of one step; `counts` (a dict) gets the number of Lie layer calls and W' builds."""
    unet = copy.deepcopy(unet).train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    set_lie_speed_options(unet, keep_adapted=keep_adapted)
    layers = [m for m in unet.modules() if isinstance(m, (LieConv2d, LieLinear))]
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in layers]
    build = functional.lie_weight

    builds = []

    def counted(*args, **kwargs):
        builds.append(1)
        return build(*args, **kwargs)

    with mock.patch.object(functional, "lie_weight", counted):
        unet(**UNET_INPUTS).sample.square().mean().backward()
    for hook in hooks:
        hook.remove()
    assert (len(calls) > len(layers)) == checkpointing  # checkpointed blocks ran their layers again in backward
    if counts is not None:
        counts.update(calls=len(calls), builds=len(builds))
    return {name: p.grad for name, p in unet.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["exp", "taylor"])
def test_gradient_checkpointing_and_keep_adapted_give_the_same_gradients(mode):
    unet = adapted_unet(mode)
    reference = grads(unet)
    assert len(reference) > 0 and all(g is not None for g in reference.values())
    for options in (dict(checkpointing=True), dict(keep_adapted=True), dict(checkpointing=True, keep_adapted=True)):
        got = grads(unet, **options)
        assert got.keys() == reference.keys()
        for name in reference:
            torch.testing.assert_close(got[name], reference[name], rtol=1e-4, atol=1e-7, msg=lambda m: f"{options} {name}: {m}")


def test_checkpointing_builds_each_kernel_twice_per_step_like_plain_training():
    """Checkpointed blocks run forward twice; the recomputation keeps its W' for backward (no memory held
    across the step), so a step still builds each W' twice: forward and recompute instead of forward and backward."""
    unet = adapted_unet()
    layers = sum(isinstance(m, (LieConv2d, LieLinear)) for m in unet.modules())
    plain, checkpointed, kept, both = {}, {}, {}, {}
    grads(unet, counts=plain)
    grads(unet, checkpointing=True, counts=checkpointed)
    grads(unet, keep_adapted=True, counts=kept)
    grads(unet, checkpointing=True, keep_adapted=True, counts=both)
    assert plain == dict(calls=layers, builds=2 * layers)
    assert kept == dict(calls=layers, builds=layers)
    assert checkpointed["calls"] > layers and checkpointed["builds"] == 2 * layers  # not 3 in checkpointed blocks
    assert both["builds"] < 2 * layers  # and keep_adapted saves the rebuild of the layers outside them
