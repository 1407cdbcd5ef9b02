"""The math of Lie-group adapters, as pure functions of tensors (no modules, no files).

A frozen kernel W is a point of the Abelian group of nowhere-zero tensors under the element-wise
product. An adapter is a low-rank element of its Lie algebra,

    Δ = reshape(B_flat @ A_flat, W.shape) * s,

and acts on W through a multiplier M, W' = W ⊙ M, with M = exp(Δ) ("exp", the exact group update)
or M = 1 + Δ ("taylor", the first-order form). Several adapters multiply their multipliers; exp
adapters therefore compose exactly as exp(Σ Δᵢ), in any order, and scale -1 is the inverse.

`lie_linear` / `lie_conv2d` run ONE linear / convolution with W'. Their backward recomputes W' from
(W, A, B) instead of keeping it alive, so the full-size temporaries exist for one layer at a time
(`keep_adapted=True` saves W' instead: no rebuild, one extra kernel held from forward to backward).
Under torch.utils.checkpoint W' is always saved: the first pass drops what it saves, and the
recomputation holds W' only until this layer's backward, so the rebuild is saved at no memory cost
(two builds per step with checkpointing, as without, instead of three).

The backward is written out. With G = dL/dW', dL/dΔ = G ⊙ W' for one exp adapter and G ⊙ W for one
taylor adapter, so the single-adapter case (training) needs one weight-sized buffer for W' and turns G
into dL/dΔ in place; several adapters take the general formula. Nothing in it calls autograd, so
torch.compile traces the op, forward and backward, without a graph break.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

MODES = ("exp", "taylor")
BALANCES = ("rms", "none")
# The "rms" rule treats a kernel as no smaller than this: a near-zero kernel (which a multiplicative update
# cannot move far anyway) would otherwise get a huge factor and an exponent that overflows after a few steps.
BALANCE_MIN_RMS = 1e-3
LOG2_E = math.log2(math.e)


class LieFactor(NamedTuple):
    """One adapter on one kernel: factors in peft LoRA shapes, its scaling s, and its mode."""

    A: torch.Tensor  # (r, in/groups, kh, kw) for a conv, (r, in) for a linear
    B: torch.Tensor  # (out, r, 1, 1) for a conv, (out, r) for a linear
    scaling: float
    mode: str


def lie_delta(A: torch.Tensor, B: torch.Tensor, scaling: float, shape: Sequence[int]) -> torch.Tensor:
    """Δ = reshape(B_flat @ A_flat, shape) * scaling, in float32 (or float64 when the factors are)."""
    dtype = torch.promote_types(torch.promote_types(A.dtype, B.dtype), torch.float32)
    product = B.reshape(B.shape[0], -1).to(dtype) @ A.reshape(A.shape[0], -1).to(dtype)
    return product.reshape(shape) * scaling


def balance_factor(weight: torch.Tensor, balance: str) -> float:
    """What a Lie adapter's alpha is multiplied by under the balancing rule `balance` (see `BALANCES`).

    "rms": 1 / RMS(W). A factor step dΔ moves W' = W ⊙ M(Δ) by W ⊙ dΔ, whose RMS is about RMS(W)·RMS(dΔ),
    while the same step moves a LoRA's W + Δ by dΔ itself. Dividing by RMS(W) makes one learning rate move
    a Lie kernel as far as a LoRA one, on any model, whatever the size of its weights (which differ
    between layers and between SD1.5, SDXL and small models). RMS(W) counts as at least `BALANCE_MIN_RMS`.
    "none": 1, the plain alpha / rank of LoRA.
    """
    if balance not in BALANCES:
        raise ValueError(f"Unknown Lie balance {balance!r}; expected one of {BALANCES}.")
    if balance == "none":
        return 1.0
    # dequantize(): a plain tensor returns its values; torchao's quantized tensors, which implement few ops, too.
    # Quantized weights are refused by the layers with the module's name (`layers.weight_quantization`); this
    # only keeps the rule from failing first with a less helpful error.
    rms = weight.detach().dequantize().double().pow(2).mean().sqrt().item()
    if not math.isfinite(rms):
        raise ValueError(f"Lie balance: the kernel {tuple(weight.shape)} holds NaN/inf values.")
    return 1.0 / max(rms, BALANCE_MIN_RMS)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"Unknown Lie mode {mode!r}; expected one of {MODES}.")


def lie_multiplier(factors: Sequence[LieFactor], shape: Sequence[int]) -> torch.Tensor:
    """The element-wise multiplier M of W' = W ⊙ M for several adapters (float32 at least).

    exp adapters are summed in the algebra and exponentiated once; each taylor adapter multiplies
    by (1 + Δ). Both products commute, so the order of `factors` never matters.
    """
    algebra_sum, multiplier = None, None
    for factor in factors:
        _check_mode(factor.mode)
        delta = lie_delta(factor.A, factor.B, factor.scaling, shape)
        if factor.mode == "exp":
            algebra_sum = delta if algebra_sum is None else algebra_sum + delta
        else:
            multiplier = 1 + delta if multiplier is None else multiplier * (1 + delta)
    if algebra_sum is not None:
        multiplier = algebra_sum.exp() if multiplier is None else multiplier * algebra_sum.exp()
    if multiplier is None:
        raise ValueError("lie_multiplier needs at least one factor.")
    return multiplier


def lie_update(weight: torch.Tensor, factor: LieFactor) -> torch.Tensor:
    """ΔW = W' − W of one adapter: W ⊙ expm1(Δ) (exp) or W ⊙ Δ (taylor), in float32 at least.

    The additive form, for hosts that apply patches as W + ΔW; expm1 keeps the digits of a small Δ that
    exp(Δ) − 1 would cancel away.
    """
    _check_mode(factor.mode)
    delta = lie_delta(factor.A, factor.B, factor.scaling, weight.shape)
    return weight * (torch.expm1(delta) if factor.mode == "exp" else delta)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t.to(dtype)` without a dispatch when it is already there (the op runs per layer per step)."""
    return t if t.dtype == dtype else t.to(dtype)


def _without_autocast(device_type: str):
    """A context with autocast off, so the op casts once, itself; a plain no-op when autocast is not on."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _work_dtype(weight: torch.Tensor, factors: Sequence[LieFactor]) -> torch.dtype:
    """The dtype W' is built in: float32 at least, float64 when W or any factor is."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    for factor in factors:
        dtype = torch.promote_types(dtype, torch.promote_types(factor.A.dtype, factor.B.dtype))
    return dtype


def _single_adapted(weight: torch.Tensor, factor: LieFactor) -> torch.Tensor:
    """W ⊙ M for ONE adapter in one weight-sized buffer: Δ by one matmul with s folded into the small
    B, then exp (or + 1) and ⊙ W in place. exp(Δ) is taken as exp2(Δ log₂e) with log₂e folded into B
    too: exp2 is about 3× cheaper than exp on CPUs. Builds no autograd graph: callers run it without grad."""
    _check_mode(factor.mode)
    dtype = _work_dtype(weight, [factor])
    scale = factor.scaling * (LOG2_E if factor.mode == "exp" else 1.0)
    buffer = ((_as(_flat(factor.B), dtype) * scale) @ _as(_flat(factor.A), dtype)).view(weight.shape)
    (buffer.exp2_() if factor.mode == "exp" else buffer.add_(1)).mul_(weight)
    return buffer


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def lie_weight(weight: torch.Tensor, factors: Sequence[LieFactor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """W' = W ⊙ M, computed in float32 at least (float64 when W or the factors are) and returned in `dtype`
    (default: W's). Type promotion does the upcast, so a half-precision W never meets M in half precision.
    Differentiable; without grad, one adapter takes the in-place single-buffer route."""
    if len(factors) == 1 and not _needs_grad(weight, *(t for f in factors for t in (f.A, f.B))):
        adapted = _single_adapted(weight, factors[0])
    else:
        adapted = weight * lie_multiplier(factors, weight.shape)
    return _as(adapted, dtype or weight.dtype)


class _LinearOp:
    """y = x @ Wᵀ + b, with its backward written out."""

    @staticmethod
    def forward(x, weight, bias):
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(grad_out, x, weight, needs):
        grad_x = grad_out @ weight if needs[0] else None
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
        grad_w = flat_grad.t() @ x.reshape(-1, x.shape[-1]) if needs[1] else None
        grad_b = flat_grad.sum(0) if needs[2] else None
        return grad_x, grad_w, grad_b


class _Conv2dOp:
    """A 2-D convolution with fixed geometry; backward through aten's convolution_backward."""

    def __init__(self, stride, padding, dilation, groups):
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

    def forward(self, x, weight, bias):
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def backward(self, grad_out, x, weight, needs):
        bias_sizes = [weight.shape[0]] if needs[2] else None
        return torch.ops.aten.convolution_backward(
            grad_out, x, weight, bias_sizes, list(self.stride), list(self.padding), list(self.dilation),
            False, [0, 0], self.groups, list(needs),
        )


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the op runs in: autocast's when it is on, else the frozen weight's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


class _LieOp(torch.autograd.Function):
    """One op on W' = W ⊙ M(A, B) that saves (x, W, A, B) and rebuilds W' in backward (or, with
    `keep_adapted`, saves W' too). Its backward is written out (no autograd inside), so torch.compile
    traces it whole."""

    @staticmethod
    def forward(ctx, x, weight, bias, spec, *factor_tensors):
        op, modes, scalings, keep_adapted = spec
        out, x_c, adapted = _forward(x, weight, bias, op, _factors(factor_tensors, scalings, modes))
        dtype = adapted.dtype
        ctx.save_for_backward(x_c, weight, adapted if keep_adapted else None, *factor_tensors)
        ctx.op, ctx.modes, ctx.scalings, ctx.dtype = op, modes, scalings, dtype
        ctx.x_dtype, ctx.bias_dtype = x.dtype, None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, kept, *factor_tensors = ctx.saved_tensors
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        needs_factors = ctx.needs_input_grad[4:]
        factors = _factors(factor_tensors, ctx.scalings, ctx.modes)
        needs_grad_w = needs_w or any(needs_factors)
        with _without_autocast(x.device.type):
            # W' in (at least) float32 where it is rebuilt; the op runs on its copy in the compute dtype.
            full = lie_weight(weight, factors, _work_dtype(weight, factors)) if kept is None else kept
            grad_x, grad_adapted, grad_b = ctx.op.backward(
                _as(grad_out, ctx.dtype), x, _as(full, ctx.dtype), (needs_x, needs_grad_w, needs_b)
            )
            grad_w, grad_factors = None, [None] * len(factor_tensors)
            if needs_grad_w:
                grad_w, grad_factors = _weight_grads(grad_adapted, weight, full, factors, needs_w, needs_factors)
        if grad_x is not None:
            grad_x = _as(grad_x, ctx.x_dtype)
        if grad_b is not None:
            grad_b = _as(grad_b, ctx.bias_dtype)
        return (grad_x, grad_w, grad_b, None, *grad_factors)


def _weight_grads(grad_adapted, weight, adapted, factors, needs_w, needs_factors):
    """(dL/dW, [dL/dA₁, dL/dB₁, ...]) from G = dL/dW'.

    Δᵢ = sᵢ BᵢAᵢ enters W' = W ⊙ M element-wise, so dL/dΔᵢ = G ⊙ ∂W'/∂Δᵢ and then
    dL/dBᵢ = sᵢ (dL/dΔᵢ)_flat Aᵢ_flatᵀ, dL/dAᵢ = sᵢ Bᵢ_flatᵀ (dL/dΔᵢ)_flat. For one adapter
    ∂W'/∂Δ is W' (exp) or W (taylor), so dL/dΔ is G multiplied in place: one weight-sized buffer.
    """
    dtype = _work_dtype(weight, factors)
    grad = _as(grad_adapted, dtype)  # G in (at least) float32; a fresh tensor of the op's, ours to overwrite
    if len(factors) == 1 and not needs_w:
        deltas_grads = [grad.mul_(adapted if factors[0].mode == "exp" else weight)]
        grad_w = None
    else:
        deltas_grads, grad_w = _general_delta_grads(grad, weight, factors, needs_w)
    grads = []
    for factor, d_delta, (needs_a, needs_b) in zip(factors, deltas_grads, zip(needs_factors[::2], needs_factors[1::2])):
        flat, A, B = _flat(d_delta), _as(_flat(factor.A), dtype), _as(_flat(factor.B), dtype)
        grad_a = None if not needs_a else (B.t() * factor.scaling) @ flat
        # (A (dL/dΔ)ᵀ)ᵀ, not (dL/dΔ) Aᵀ: the same product, about 2× faster on CPUs for a wide dL/dΔ.
        grad_b = None if not needs_b else (A @ flat.t()).t() * factor.scaling
        grads += [None if grad_a is None else _as(grad_a.reshape(factor.A.shape), factor.A.dtype),
                  None if grad_b is None else _as(grad_b.reshape(factor.B.shape), factor.B.dtype)]
    return grad_w, grads


def _general_delta_grads(grad, weight, factors, needs_w):
    """dL/dΔᵢ for several adapters, M = exp(Σ exp-Δ) ⊙ Π (1 + taylor-Δⱼ): dL/dM = G ⊙ W, then
    ⊙ M for every exp adapter and ⊙ exp(Σ exp-Δ) ⊙ Π_{k≠j} (1 + taylor-Δₖ) for taylor adapter j."""
    shape = weight.shape
    exp_deltas = [lie_delta(f.A, f.B, f.scaling, shape) for f in factors if f.mode == "exp"]
    exp_part = torch.stack(exp_deltas).sum(0).exp() if exp_deltas else None
    taylor = {i: 1 + lie_delta(f.A, f.B, f.scaling, shape) for i, f in enumerate(factors) if f.mode == "taylor"}

    def product(skip=None):
        out = exp_part
        for i, term in taylor.items():
            if i != skip:
                out = term if out is None else out * term
        return torch.ones((), dtype=grad.dtype, device=grad.device) if out is None else out

    multiplier = product()
    grad_m = grad * weight
    grad_exp = grad_m * multiplier if exp_deltas else None
    deltas_grads = [grad_exp if f.mode == "exp" else grad_m * product(skip=i) for i, f in enumerate(factors)]
    grad_w = (grad * multiplier).to(weight.dtype) if needs_w else None
    return deltas_grads, grad_w


def _factors(tensors, scalings, modes) -> list[LieFactor]:
    return [LieFactor(tensors[2 * i], tensors[2 * i + 1], s, m) for i, (s, m) in enumerate(zip(scalings, modes))]


def _forward(x, weight, bias, op, factors):
    """(op(x, W', b), x, W'), all in the compute dtype (autocast's, else W's)."""
    dtype = _compute_dtype(x, weight)
    with _without_autocast(x.device.type):
        x_c = _as(x, dtype)
        adapted = lie_weight(weight, factors, dtype)
        return op.forward(x_c, adapted, None if bias is None else _as(bias, dtype)), x_c, adapted


# torch's own accessor for the saved-tensor hooks in force (private; without it, W' is simply rebuilt).
_TOP_SAVED_TENSOR_HOOKS = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def _under_checkpoint() -> bool:
    """Whether tensors saved for backward now go through torch.utils.checkpoint's hooks (its first pass,
    which drops them, or its recomputation, which holds them until the segment's backward)."""
    if _TOP_SAVED_TENSOR_HOOKS is None or torch.compiler.is_compiling():
        return False
    hooks = _TOP_SAVED_TENSOR_HOOKS(False)
    pack = None if hooks is None else hooks[0]
    return (getattr(pack, "__module__", None) == "torch.utils.checkpoint"
            and pack.__qualname__.split(".")[0] in ("_checkpoint_hook", "_recomputation_hook"))


def _apply(x, weight, bias, factors: Sequence[LieFactor], op, keep_adapted: bool):
    if not factors:
        raise ValueError("A Lie op needs at least one adapter factor.")
    for factor in factors:
        _check_mode(factor.mode)
    tensors = [t for f in factors for t in (f.A, f.B)]
    if not _needs_grad(x, weight, bias, *tensors):  # inference: the op alone, no autograd.Function
        return _forward(x, weight, bias, op, factors)[0]
    modes = tuple(f.mode for f in factors)
    scalings = tuple(float(f.scaling) for f in factors)
    keep = bool(keep_adapted) or _under_checkpoint()
    return _LieOp.apply(x, weight, bias, (op, modes, scalings, keep), *tensors)


def lie_linear(x, weight, bias, factors: Sequence[LieFactor], keep_adapted: bool = False) -> torch.Tensor:
    """F.linear(x, W ⊙ M, b) with the memory-lean backward (`keep_adapted`: see the module docstring)."""
    return _apply(x, weight, bias, factors, _LinearOp, keep_adapted)


def lie_conv2d(x, weight, bias, factors: Sequence[LieFactor], stride=1, padding=0, dilation=1, groups=1,
               keep_adapted: bool = False):
    """F.conv2d(x, W ⊙ M, b, ...) with the memory-lean backward. `padding` must be numeric."""
    pair = torch.nn.modules.utils._pair
    op = _Conv2dOp(pair(stride), pair(padding), pair(dilation), groups)
    return _apply(x, weight, bias, factors, op, keep_adapted)
