"""The math of Lie-group adapters, as pure functions of tensors (no modules, no files).

A frozen kernel W is a point of the Abelian group of nowhere-zero tensors under the element-wise
product. An adapter is a low-rank element of its Lie algebra,

    Δ = reshape(B_flat @ A_flat, W.shape) * s,

and acts on W through a multiplier M, W' = W ⊙ M, with M = exp(Δ) ("exp", the exact group update)
or M = 1 + Δ ("taylor", the first-order form). Several adapters multiply their multipliers; exp
adapters therefore compose exactly as exp(Σ Δᵢ), in any order, and scale -1 is the inverse.

`lie_linear` / `lie_conv2d` run ONE linear / convolution with W'. Their backward recomputes W' from
(W, A, B) instead of keeping it alive, so the full-size temporaries exist for one layer at a time.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

MODES = ("exp", "taylor")


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


def lie_multiplier(factors: Sequence[LieFactor], shape: Sequence[int]) -> torch.Tensor:
    """The element-wise multiplier M of W' = W ⊙ M for several adapters (float32 at least).

    exp adapters are summed in the algebra and exponentiated once; each taylor adapter multiplies
    by (1 + Δ). Both products commute, so the order of `factors` never matters.
    """
    algebra_sum, multiplier = None, None
    for factor in factors:
        if factor.mode not in MODES:
            raise ValueError(f"Unknown Lie mode {factor.mode!r}; expected one of {MODES}.")
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


def lie_weight(weight: torch.Tensor, factors: Sequence[LieFactor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """W' = W ⊙ M, computed in float32 at least (float64 when W or the factors are) and returned in `dtype`
    (default: W's). Type promotion does the upcast, so a half-precision W never meets M in half precision."""
    return (weight * lie_multiplier(factors, weight.shape)).to(dtype or weight.dtype)


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
    """One op on W' = W ⊙ M(A, B) that saves (x, W, A, B) and recomputes W' in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, op, modes, scalings, *factor_tensors):
        dtype = _compute_dtype(x, weight)
        factors = _factors(factor_tensors, scalings, modes)
        with torch.autocast(x.device.type, enabled=False):
            x_c = x.to(dtype)
            out = op.forward(x_c, lie_weight(weight, factors, dtype), None if bias is None else bias.to(dtype))
        ctx.save_for_backward(x_c, weight, *factor_tensors)
        ctx.op, ctx.modes, ctx.scalings, ctx.dtype = op, modes, scalings, dtype
        ctx.x_dtype, ctx.bias_dtype = x.dtype, None if bias is None else bias.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, *factor_tensors = ctx.saved_tensors
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        needs_factors = ctx.needs_input_grad[6:]
        with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            leaves = [t.detach().requires_grad_(need) for t, need in zip(factor_tensors, needs_factors)]
            multiplier = lie_multiplier(_factors(leaves, ctx.scalings, ctx.modes), weight.shape)
            with torch.no_grad():
                adapted = (weight * multiplier).to(ctx.dtype)
                needs_grad_w = needs_w or any(needs_factors)
                grad_x, grad_adapted, grad_b = ctx.op.backward(
                    grad_out.to(ctx.dtype), x, adapted, (needs_x, needs_grad_w, needs_b)
                )
                del adapted
            grad_w, grad_factors = None, [None] * len(leaves)
            if needs_grad_w:
                # G = dL/dW' in (at least) M's precision; dL/dW = G ⊙ M and dL/dM = G ⊙ W.
                grad_adapted = grad_adapted.to(torch.promote_types(grad_adapted.dtype, multiplier.dtype))
                if needs_w:
                    grad_w = (grad_adapted * multiplier).to(weight.dtype)
                if any(needs_factors):
                    # dL/dM pulled back through M(A, B) by autograd on the small graph.
                    wanted = [leaf for leaf in leaves if leaf.requires_grad]
                    grad_m = (grad_adapted * weight).to(multiplier.dtype)
                    grads = iter(torch.autograd.grad(multiplier, wanted, grad_m))
                    grad_factors = [next(grads) if leaf.requires_grad else None for leaf in leaves]
        if grad_x is not None:
            grad_x = grad_x.to(ctx.x_dtype)
        if grad_b is not None:
            grad_b = grad_b.to(ctx.bias_dtype)
        return (grad_x, grad_w, grad_b, None, None, None, *grad_factors)


def _factors(tensors, scalings, modes) -> list[LieFactor]:
    return [LieFactor(tensors[2 * i], tensors[2 * i + 1], s, m) for i, (s, m) in enumerate(zip(scalings, modes))]


def _apply(x, weight, bias, factors: Sequence[LieFactor], op):
    if not factors:
        raise ValueError("A Lie op needs at least one adapter factor.")
    tensors = [t for f in factors for t in (f.A, f.B)]
    modes = tuple(f.mode for f in factors)
    scalings = tuple(float(f.scaling) for f in factors)
    return _LieOp.apply(x, weight, bias, op, modes, scalings, *tensors)


def lie_linear(x, weight, bias, factors: Sequence[LieFactor]) -> torch.Tensor:
    """F.linear(x, W ⊙ M, b) with the memory-lean backward."""
    return _apply(x, weight, bias, factors, _LinearOp)


def lie_conv2d(x, weight, bias, factors: Sequence[LieFactor], stride=1, padding=0, dilation=1, groups=1):
    """F.conv2d(x, W ⊙ M, b, ...) with the memory-lean backward. `padding` must be numeric."""
    pair = torch.nn.modules.utils._pair
    return _apply(x, weight, bias, factors, _Conv2dOp(pair(stride), pair(padding), pair(dilation), groups))
