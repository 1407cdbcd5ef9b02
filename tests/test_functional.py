"""The pure math (`lie_diffusion.functional`) against references written from the formula.

Reference: Δ = reshape(B_flat @ A_flat, W.shape) · s; exp: W' = W ⊙ exp(Σ Δ); taylor: W' = W + W ⊙ Δ;
then plain F.conv2d / F.linear with W', differentiated by ordinary autograd.
"""

import pytest
import torch
import torch.nn.functional as F

from lie_diffusion.functional import (BALANCE_MIN_RMS, LieFactor, balance_factor, lie_conv2d, lie_delta, lie_linear,
                                     lie_multiplier, lie_weight)

# (in, out, kernel, stride, padding, dilation): the geometries SD's UNet uses, plus dilation and a rectangle.
CONV_GEOMETRIES = {
    "3x3_pad1": (6, 8, 3, 1, 1, 1),
    "1x1_shortcut": (6, 8, 1, 1, 0, 1),
    "3x3_stride2_downsampler": (6, 6, 3, 2, 1, 1),
    "3x3_dilation2": (6, 8, 3, 1, 2, 2),
    "1x3_rect": (6, 8, (1, 3), 1, (0, 1), 1),
}


def ref_delta(A, B, s, shape):
    return (B.flatten(1) @ A.flatten(1)).reshape(shape) * s


def ref_weight(W, factors):
    """W ⊙ exp(Σ exp-Δ) ⊙ Π (1 + taylor-Δ), straight from the formula."""
    out = W
    exp_deltas = [ref_delta(f.A, f.B, f.scaling, W.shape) for f in factors if f.mode == "exp"]
    if exp_deltas:
        out = out * torch.exp(sum(exp_deltas))
    for f in factors:
        if f.mode == "taylor":
            out = out + out * ref_delta(f.A, f.B, f.scaling, W.shape)
    return out


def conv_factor(out_ch, in_ch, k, r, scaling, mode, dtype=torch.float32, std=0.3):
    kh, kw = (k, k) if isinstance(k, int) else k
    A = torch.randn(r, in_ch, kh, kw, dtype=dtype) * std
    B = torch.randn(out_ch, r, 1, 1, dtype=dtype) * std
    return LieFactor(A, B, scaling, mode)


def linear_factor(out_f, in_f, r, scaling, mode, dtype=torch.float32, std=0.3):
    return LieFactor(torch.randn(r, in_f, dtype=dtype) * std, torch.randn(out_f, r, dtype=dtype) * std, scaling, mode)


def make_conv(geometry, dtype=torch.float64):
    in_ch, out_ch, k, stride, padding, dilation = CONV_GEOMETRIES[geometry]
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(2, in_ch, 9, 9, dtype=dtype)
    W = torch.randn(out_ch, in_ch, kh, kw, dtype=dtype) * 0.2
    b = torch.randn(out_ch, dtype=dtype)
    return x, W, b, dict(stride=stride, padding=padding, dilation=dilation)


def with_grads(factors):
    return [LieFactor(f.A.clone().requires_grad_(), f.B.clone().requires_grad_(), f.scaling, f.mode) for f in factors]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- the math -------------------------------------------------------------------------------------


def test_delta_matches_formula_and_shapes():
    f = conv_factor(8, 6, 3, r=2, scaling=0.5, mode="exp")
    delta = lie_delta(f.A, f.B, 0.5, (8, 6, 3, 3))
    assert delta.shape == (8, 6, 3, 3) and delta.dtype == torch.float32
    torch.testing.assert_close(delta, ref_delta(f.A, f.B, 0.5, (8, 6, 3, 3)))
    half = lie_delta(f.A.half(), f.B.bfloat16(), 0.5, (8, 6, 3, 3))
    assert half.dtype == torch.float32, "the exponent must be computed in float32 for half-precision factors"


@pytest.mark.parametrize("modes", [("exp",), ("taylor",), ("exp", "exp"), ("exp", "taylor", "exp"), ("taylor", "taylor")])
def test_weight_matches_reference(modes):
    W = torch.randn(8, 6, 3, 3, dtype=torch.float64)
    factors = [conv_factor(8, 6, 3, 2, s, m, torch.float64) for s, m in zip((0.7, -1.3, 0.4), modes)]
    torch.testing.assert_close(lie_weight(W, factors), ref_weight(W, factors), rtol=1e-12, atol=1e-12)


def test_exp_adapters_compose_exactly_in_any_order():
    W = torch.randn(8, 6, 3, 3, dtype=torch.float64)
    f1, f2, f3 = (conv_factor(8, 6, 3, 2, s, "exp", torch.float64) for s in (0.7, -0.4, 1.1))
    expected = W * torch.exp(ref_delta(*f1[:3], W.shape) + ref_delta(*f2[:3], W.shape) + ref_delta(*f3[:3], W.shape))
    for order in ([f1, f2, f3], [f3, f1, f2], [f2, f3, f1]):
        torch.testing.assert_close(lie_weight(W, order), expected, rtol=1e-12, atol=1e-12)
    # Composition is the group law: applying one after the other equals applying the sum.
    torch.testing.assert_close(lie_weight(lie_weight(W, [f1]), [f2]), lie_weight(W, [f1, f2]), rtol=1e-12, atol=0)


def test_scale_minus_one_is_the_exact_inverse():
    W = torch.randn(8, 6, 3, 3)
    f = conv_factor(8, 6, 3, 2, 0.9, "exp")
    inverse = f._replace(scaling=-0.9)
    assert torch.equal(lie_weight(W, [f, inverse]), W), "Δ + (-Δ) = 0 exactly, so exp gives exactly 1"
    torch.testing.assert_close(lie_weight(lie_weight(W, [f]), [inverse]), W, rtol=1e-6, atol=0)
    assert torch.equal(lie_weight(W, [f._replace(scaling=0.0)]), W)


def test_exp_never_flips_signs_and_keeps_zeros():
    W = torch.randn(8, 6, 3, 3)
    W[0, :, 1, 1] = 0.0
    f = conv_factor(8, 6, 3, 2, 3.0, "exp", std=1.0)  # a large update
    adapted = lie_weight(W, [f])
    assert torch.equal(torch.sign(adapted), torch.sign(W))
    assert torch.equal(adapted[0, :, 1, 1], W[0, :, 1, 1])


@pytest.mark.parametrize("shape", [(8, 6, 3, 3), (7, 5)])
def test_taylor_agrees_with_exp_to_first_order(shape):
    W = torch.randn(shape, dtype=torch.float64)
    make = conv_factor if len(shape) == 4 else linear_factor
    args = (shape[0], shape[1], 3) if len(shape) == 4 else (shape[0], shape[1])
    base = make(*args, 2, 1.0, "exp", torch.float64)
    errors = []
    for t in (1e-1, 1e-2, 1e-3):
        exp_w = lie_weight(W, [base._replace(scaling=t)])
        taylor_w = lie_weight(W, [base._replace(scaling=t, mode="taylor")])
        delta = ref_delta(base.A, base.B, t, shape)
        errors.append((exp_w - taylor_w).abs().max().item())
        # |W(e^Δ - 1 - Δ)| <= |W| Δ² e^|Δ| / 2 entry-wise.
        bound = (W.abs() * delta.square() * delta.abs().exp() / 2).max().item()
        assert errors[-1] <= bound * (1 + 1e-6)
    assert errors[1] / errors[0] < 0.02 and errors[2] / errors[1] < 0.02, f"error is not O(|Δ|²): {errors}"


def test_math_errors():
    f = conv_factor(8, 6, 3, 2, 1.0, "exp")
    with pytest.raises(ValueError, match="at least one factor"):
        lie_multiplier([], (8, 6, 3, 3))
    with pytest.raises(ValueError, match="'cayley'"):
        lie_weight(torch.randn(8, 6, 3, 3), [f._replace(mode="cayley")])
    with pytest.raises(ValueError, match="at least one adapter factor"):
        lie_conv2d(torch.randn(1, 6, 4, 4), torch.randn(8, 6, 3, 3), None, [])


# --- the ops: forward and backward against plain F.conv2d / F.linear on the reference W' ------------


@pytest.mark.parametrize("geometry", sorted(CONV_GEOMETRIES))
@pytest.mark.parametrize("modes", [("exp",), ("taylor",), ("exp", "taylor")])
def test_conv2d_matches_reference(geometry, modes):
    x, W, b, geo = make_conv(geometry)
    out_ch, in_ch, kh, kw = W.shape
    factors = [conv_factor(out_ch, in_ch, (kh, kw), 3, s, m, torch.float64) for s, m in zip((0.8, -0.5), modes)]
    x, W, b = (t.requires_grad_() for t in (x, W, b))
    mine, ref = with_grads(factors), with_grads(factors)

    out = lie_conv2d(x, W, b, mine, **geo)
    expected = F.conv2d(x, ref_weight(W, ref), b, **geo)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)

    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, W, b] + [t for f in mine for t in (f.A, f.B)], grad)
    want = torch.autograd.grad(expected, [x, W, b] + [t for f in ref for t in (f.A, f.B)], grad)
    for name, g, w in zip(["x", "W", "bias"] + [f"{n}{i}" for i in range(len(modes)) for n in "AB"], got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10, msg=lambda m: f"grad of {name} ({geometry}): {m}")


@pytest.mark.parametrize("modes", [("exp",), ("taylor",), ("taylor", "exp", "exp")])
def test_linear_matches_reference(modes):
    x = torch.randn(3, 4, 7, dtype=torch.float64, requires_grad=True)  # extra leading dims, like attention
    W = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    factors = [linear_factor(5, 7, 2, s, m, torch.float64) for s, m in zip((0.6, -0.9, 1.2), modes)]
    mine, ref = with_grads(factors), with_grads(factors)
    out = lie_linear(x, W, None, mine)
    expected = F.linear(x, ref_weight(W, ref))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, W] + [t for f in mine for t in (f.A, f.B)], grad)
    want = torch.autograd.grad(expected, [x, W] + [t for f in ref for t in (f.A, f.B)], grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(
    "geo,modes",
    [
        (dict(stride=1, padding=1), ("exp",)),
        (dict(stride=2, padding=1), ("exp", "taylor")),
        (dict(stride=1, padding=2, dilation=2), ("taylor", "exp", "exp")),
    ],
)
def test_conv2d_gradcheck(geo, modes):
    """Finite differences in float64 for every input: x, W, bias and each adapter's A and B."""
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    W = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    factors = [conv_factor(4, 3, 3, 2, s, m, torch.float64) for s, m in zip((0.7, -0.4, 0.3), modes)]
    tensors = [t.requires_grad_() for f in factors for t in (f.A, f.B)]

    def fn(x, W, b, *ab):
        fs = [LieFactor(ab[2 * i], ab[2 * i + 1], f.scaling, f.mode) for i, f in enumerate(factors)]
        return lie_conv2d(x, W, b, fs, **geo)

    assert torch.autograd.gradcheck(fn, (x, W, b, *tensors))


def test_linear_gradcheck():
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    W = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    factors = [linear_factor(4, 5, 2, s, m, torch.float64) for s, m in ((0.7, "exp"), (-0.5, "taylor"))]
    tensors = [t.requires_grad_() for f in factors for t in (f.A, f.B)]

    def fn(x, W, b, *ab):
        fs = [LieFactor(ab[2 * i], ab[2 * i + 1], f.scaling, f.mode) for i, f in enumerate(factors)]
        return lie_linear(x, W, b, fs)

    assert torch.autograd.gradcheck(fn, (x, W, b, *tensors))


def test_only_requested_grads_are_computed():
    """A frozen W and bias (the training case) get no gradient; the factors and x do."""
    x, W, b, geo = make_conv("3x3_pad1", torch.float32)
    x.requires_grad_()
    factors = with_grads([conv_factor(8, 6, 3, 2, 1.0, "exp")])
    lie_conv2d(x, W, b, factors, **geo).sum().backward()
    assert W.grad is None and b.grad is None
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for f in factors for t in (f.A, f.B))
    assert x.grad is not None


def test_backward_does_not_keep_the_adapted_weight():
    """The memory claim: the op saves x, W (the parameter itself) and the factors, never a W'-sized tensor."""
    x, W, b, geo = make_conv("3x3_pad1", torch.float32)
    factors = with_grads([conv_factor(8, 6, 3, 2, 1.0, "exp")])

    def saved_weight_sized(fn):
        saved = []

        def pack(t):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return [t for t in saved if t.shape == W.shape and t.data_ptr() != W.data_ptr()]

    assert saved_weight_sized(lambda: lie_conv2d(x, W, b, factors, **geo)) == []
    # The naive formula keeps W'-sized tensors for backward; the hook does see them, so the check above bites.
    assert saved_weight_sized(lambda: F.conv2d(x, ref_weight(W, factors), b, **geo))


# --- precision ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_with_float32_factors(dtype):
    x, W, b, geo = make_conv("3x3_pad1", torch.float32)
    factors = with_grads([conv_factor(8, 6, 3, 2, 1.0, "exp"), conv_factor(8, 6, 3, 2, 0.5, "taylor")])
    xh, Wh, bh = x.to(dtype).requires_grad_(), W.to(dtype), b.to(dtype)
    out = lie_conv2d(xh, Wh, bh, factors, **geo)
    assert out.dtype == dtype and torch.isfinite(out).all()
    expected = F.conv2d(xh.float(), ref_weight(Wh.float(), factors), bh.float(), **geo)
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)
    out.float().square().sum().backward()
    assert xh.grad.dtype == dtype and torch.isfinite(xh.grad).all()
    for f in factors:
        for t in (f.A, f.B):
            assert t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all()


@pytest.mark.parametrize(
    "x_dtype,w_dtype,a_dtype,b_dtype",
    [
        (torch.float32, torch.bfloat16, torch.float32, torch.float32),
        (torch.bfloat16, torch.float32, torch.float32, torch.float32),
        (torch.float16, torch.float16, torch.bfloat16, torch.float32),
        (torch.float32, torch.float32, torch.bfloat16, torch.bfloat16),
        (torch.float64, torch.float64, torch.float32, torch.float32),
    ],
)
def test_mixed_dtypes(x_dtype, w_dtype, a_dtype, b_dtype):
    """The op runs in W's dtype; every gradient comes back in its input's dtype."""
    x = torch.randn(2, 6, 5, 5).to(x_dtype).requires_grad_()
    W = (torch.randn(8, 6, 3, 3) * 0.2).to(w_dtype).requires_grad_()
    f = conv_factor(8, 6, 3, 2, 1.0, "exp")
    A, B = f.A.to(a_dtype).requires_grad_(), f.B.to(b_dtype).requires_grad_()
    out = lie_conv2d(x, W, None, [LieFactor(A, B, 1.0, "exp")], padding=1)
    assert out.dtype == w_dtype and torch.isfinite(out).all()
    ref = F.conv2d(x.double(), ref_weight(W.double(), [LieFactor(A.double(), B.double(), 1.0, "exp")]), padding=1)
    tol = 1e-5 if {x_dtype, w_dtype} <= {torch.float32, torch.float64} and a_dtype == torch.float32 else 0.05
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    out.sum().backward()
    for t in (x, W, A, B):
        assert t.grad.dtype == t.dtype and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("op", ["conv", "linear"])
def test_autocast_bf16(op):
    """Under CPU autocast the op computes in bf16 like F.conv2d / F.linear would; grads stay fp32."""
    if op == "conv":
        x, W, b, geo = make_conv("3x3_stride2_downsampler", torch.float32)
        factors = [conv_factor(6, 6, 3, 2, 1.0, "exp")]
        plain, lie = (lambda w: F.conv2d(x, w, b, **geo)), (lambda fs: lie_conv2d(x, W, b, fs, **geo))
    else:
        x, W, b = torch.randn(3, 7), torch.randn(5, 7) * 0.3, torch.randn(5)
        factors = [linear_factor(5, 7, 2, 1.0, "exp")]
        plain, lie = (lambda w: F.linear(x, w, b)), (lambda fs: lie_linear(x, W, b, fs))
    mine, ref = with_grads(factors), with_grads(factors)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lie(mine)
        expected = plain(ref_weight(W, ref))
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0.03, atol=0.03)
    out.float().sum().backward()
    expected.float().sum().backward()
    for got, want in zip(mine, ref):
        for g, w in ((got.A.grad, want.A.grad), (got.B.grad, want.B.grad)):
            assert g.dtype == torch.float32 and torch.isfinite(g).all()
            torch.testing.assert_close(g, w, rtol=0.05, atol=0.05 * w.abs().max().item())


# --- the balancing rule ----------------------------------------------------------------------------------


def test_balance_factor_is_one_over_the_kernel_rms():
    W = torch.randn(8, 6, 3, 3) * 0.05
    rms = (W.double() ** 2).sum().item() / W.numel()
    assert balance_factor(W, "rms") == pytest.approx(1 / rms**0.5, rel=1e-12)
    assert balance_factor(W.half(), "rms") == pytest.approx(1 / rms**0.5, rel=1e-3)  # read in float64 whatever W's dtype
    assert balance_factor(W, "none") == 1.0
    # a near-zero kernel counts as RMS 1e-3: no factor that would make exp overflow after a few steps
    assert balance_factor(torch.zeros(4, 4, 1, 1), "rms") == pytest.approx(1 / BALANCE_MIN_RMS)
    assert balance_factor(torch.full((4, 4), 1e-9), "rms") == pytest.approx(1 / BALANCE_MIN_RMS)


def test_balanced_factor_step_moves_the_kernel_as_far_as_a_lora_step():
    """The rule's promise, checked on a kernel: the same small B step, with alpha / rank × 1/RMS(W), moves
    W ⊙ exp(Δ) by about as much (RMS) as it moves W + Δ under plain LoRA scaling."""
    generator = torch.Generator().manual_seed(0)
    W = torch.randn(64, 32, 3, 3, generator=generator, dtype=torch.float64) * 0.03
    A = torch.randn(4, 32, 3, 3, generator=generator, dtype=torch.float64) / 10
    step = torch.randn(64, 4, 1, 1, generator=generator, dtype=torch.float64) * 1e-3
    lora_move = ref_delta(A, step, 1.0, W.shape)
    balanced = ref_weight(W, [LieFactor(A, step, balance_factor(W, "rms"), "exp")]) - W
    unbalanced = ref_weight(W, [LieFactor(A, step, 1.0, "exp")]) - W
    ratio = balanced.pow(2).mean().sqrt() / lora_move.pow(2).mean().sqrt()
    assert 0.9 < ratio < 1.1
    assert unbalanced.pow(2).mean().sqrt() / lora_move.pow(2).mean().sqrt() < 0.05  # |W| times less without it


def test_balance_rejects_unknown_rules_and_broken_kernels():
    with pytest.raises(ValueError, match="Unknown Lie balance 'max'"):
        balance_factor(torch.ones(2, 2), "max")
    with pytest.raises(ValueError, match=r"kernel \(2, 2\) holds NaN/inf"):
        balance_factor(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), "rms")
