"""Extract a Lie adapter from a fully fine-tuned model: the reverse of merging.

Conv targets get Lie adapters. Their algebra element is the log-ratio L = log(W_tuned / W_base)
(exp mode) or W_tuned / W_base − 1 (taylor mode), which a low-rank Δ = BA approximates. Entries
without a logarithm (the sign flipped, W_base = 0, or W_tuned = 0 in exp mode) are masked out of
L, counted and reported: no multiplicative update reaches them exactly. The weight-space fit below
still sees them, where its error is smooth and bounded below (exp(Δ) → 0 is the best it can do
for a sign flip), so the error it reports and minimises is the real one.

What matters is the weight-space error ‖W_base ⊙ exp(Δ) − W_tuned‖, not the log-space one. The
truncated SVD of L minimises the log-space error, where every entry counts alike; in weight space
entry i counts about |W_i|² as much, so tiny weights, whose log-ratios are large and noisy, steer the
SVD but barely matter. So the SVD is only the start: L-BFGS (full batch, smooth objective, few
parameters) then minimises the weight-space error itself for up to `steps` iterations, and the best
iterate is kept, so the result is never worse than the SVD start. When the tuned model really is
W_base ⊙ exp(BA) at rank r, the SVD start is already exact and stays so.

On a Flux/SD3 transformer the Linear targets of its default preset (diffusers' DreamBooth targets) are
Lie targets too, fitted the same way: a Linear weight is the 2-D case of the group.

Attention projections of UNets and text encoders get additive LoRA from the truncated SVD of
W_tuned − W_base, the optimum for a plain difference; a LoCon extracted the same way from the conv layers (what kohya/LyCORIS do) is
the reference the Lie fit is compared against, at an equal parameter count (same rank, same shapes).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .export import load_models, low_rank_factors, text_table, truncation_errors
from .functional import MODES
from .inject import CONV_TARGETS, LieConfig, find_targets
from .io import COMPONENTS, DENOISERS, WEIGHT_NAME, ModuleEntry, model_fingerprint, write_lie_file

DEFAULT_STEPS = 200


@dataclass
class LayerFit:
    """One extracted module and how well it reproduces the tuned weight."""

    module: str  # <component>.<module>
    kind: str  # "lie" (conv) or "lora" (attention)
    rank: int
    rel_error: float  # ‖W_fit − W_tuned‖_F / ‖W_tuned − W_base‖_F
    abs_error: float
    update_norm: float  # ‖W_tuned − W_base‖_F
    locon_rel_error: float  # the same for a LoCon/LoRA of equal size from the SVD of W_tuned − W_base
    masked: dict = field(default_factory=dict)  # entries without a logarithm, by reason
    svd_start_rel_error: float | None = None  # Lie only: before the weight-space refinement


def check_architectures(base: dict[str, nn.Module], tuned: dict[str, nn.Module]) -> None:
    """Same components, parameter names and shapes, or one error naming the first difference."""
    if sorted(base) != sorted(tuned):
        raise ValueError(f"the base model has {sorted(base)} but the tuned model has {sorted(tuned)}.")
    for component in base:
        a, b = dict(base[component].named_parameters()), dict(tuned[component].named_parameters())
        only = sorted(set(a) ^ set(b))
        if only:
            side = "base" if only[0] in a else "tuned"
            raise ValueError(f"architectures differ: {component}.{only[0]} exists only in the {side} model.")
        for name, param in a.items():
            if param.shape != b[name].shape:
                raise ValueError(
                    f"architectures differ: {component}.{name} is {tuple(param.shape)} in the base model but "
                    f"{tuple(b[name].shape)} in the tuned model."
                )


def _max_rank(weight: torch.Tensor) -> int:
    return min(weight.shape[0], weight[0].numel())


def _check_rank(ref: str, weight: torch.Tensor, rank: int) -> None:
    if rank > _max_rank(weight):
        raise ValueError(
            f"rank {rank} is larger than {ref} allows (weight {tuple(weight.shape)}: rank at most {_max_rank(weight)})."
        )


def _truncated(matrix: torch.Tensor, rank: int, shape):
    """(A, B, singular values) of the best rank-`rank` approximation, in peft factor shapes."""
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    down, up = low_rank_factors(U, S, Vh, rank, shape)
    return down, up, S


def _multiplier(delta: torch.Tensor, mode: str) -> torch.Tensor:
    return delta.exp() if mode == "exp" else 1 + delta


def fit_lie(base: torch.Tensor, tuned: torch.Tensor, rank: int, mode: str = "exp", steps: int = DEFAULT_STEPS):
    """(A, B, masked counts, SVD-start error, final error) with W_base ⊙ m(BA) ≈ W_tuned; the errors are
    ‖W_base ⊙ m(BA) − W_tuned‖_F over every entry."""
    shape = base.shape
    wb, wt = base.double().reshape(shape[0], -1), tuned.double().reshape(shape[0], -1)
    if mode == "exp":
        valid = (wb * wt) > 0
        masked = {
            "sign_flips": int(((wb * wt) < 0).sum()),
            "zero_base": int(((wb == 0) & (wt != 0)).sum()),
            "zero_tuned": int(((wt == 0) & (wb != 0)).sum()),
        }
        target = torch.where(valid, torch.log(wt / torch.where(valid, wb, 1.0)), 0.0)
    else:
        valid = wb != 0
        masked = {"zero_base": int(((wb == 0) & (wt != 0)).sum())}
        target = torch.where(valid, wt / torch.where(valid, wb, 1.0) - 1, 0.0)
    A, B, _ = _truncated(target, rank, (shape[0], wb.shape[1]))
    A, B = A.contiguous().requires_grad_(), B.contiguous().requires_grad_()

    def error(A, B):  # every entry: at a masked one the error is smooth in Δ and bounded below
        return (wb * _multiplier(B @ A, mode) - wt).square().sum()

    scale = (wt - wb).square().sum().clamp_min(1e-300)
    with torch.no_grad():
        start = error(A, B)
    best = (start, A.detach().clone(), B.detach().clone())
    if steps > 0:
        optimizer = torch.optim.LBFGS([A, B], lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe",
                                      tolerance_grad=1e-12, tolerance_change=1e-14)

        def closure():
            optimizer.zero_grad()
            loss = error(A, B) / scale
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            final = error(A, B)
        if torch.isfinite(final) and final < best[0]:
            best = (final, A.detach().clone(), B.detach().clone())
    A = best[1].reshape(rank, *shape[1:])
    B = best[2].reshape(shape[0], rank, *([1] * (len(shape) - 2)))
    return A, B, masked, start.sqrt().item(), best[0].sqrt().item()


def locon_error(base: torch.Tensor, tuned: torch.Tensor, rank: int) -> float:
    """Frobenius error of the best rank-`rank` additive update (a LoCon/LoRA by SVD of W_tuned − W_base)."""
    S = torch.linalg.svdvals((tuned.double() - base.double()).reshape(base.shape[0], -1))
    return truncation_errors(S)[rank].item()


def extract_adapter(
    base: dict[str, nn.Module],
    tuned: dict[str, nn.Module],
    rank: int = 4,
    attn_rank: int | None = None,
    mode: str = "exp",
    steps: int = DEFAULT_STEPS,
    conv_targets=CONV_TARGETS,
    log=lambda message: None,
) -> tuple[list[ModuleEntry], list[LayerFit], dict]:
    """Lie adapters on the conv targets (and a transformer's Linear targets) and LoRA on the attention
    projections of every component that changed.

    Returns the file entries, one fit report per module, and what the adapter cannot hold: the other
    parameters that changed (norms, biases, embeddings, ...), their count and size.
    """
    if mode not in MODES:
        raise ValueError(f"unknown --mode {mode!r}; choose from {', '.join(MODES)}.")
    attn_rank = attn_rank or rank
    for name, value, least in (("--rank", rank, 1), ("--attn-rank", attn_rank, 1), ("--steps", steps, 0)):
        if not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer of at least {least}, got {value}.")
    check_architectures(base, tuned)
    config = LieConfig(rank=rank, attn_rank=attn_rank, conv_targets=tuple(conv_targets))
    entries, fits, other = [], [], {"tensors": 0, "norm_sq": 0.0}
    total_sq = 0.0
    for component in (c for c in COMPONENTS if c in base):
        convs, attns = find_targets(base[component], config)
        lie_linears = config.resolved(base[component]).attn_adapter == "lie"  # a transformer's preset group
        targeted = set()
        tuned_modules = dict(tuned[component].named_modules())
        for name in convs + attns:
            layer_rank = rank if name in convs or lie_linears else attn_rank
            _check_rank(f"{component}.{name}", base[component].get_submodule(name).weight, layer_rank)
        for name in convs + attns:
            wb = base[component].get_submodule(name).weight.detach()
            wt = tuned_modules[name].weight.detach()
            targeted.add(f"{name}.weight")
            if torch.equal(wb, wt):
                continue
            ref = f"{component}.{name}"
            update_norm = (wt.double() - wb.double()).norm().item()
            if name in convs or lie_linears:
                A, B, masked, start, error = fit_lie(wb, wt, rank, mode, steps)
                entry = ModuleEntry(component, name, "lie", A.float(), B.float(), alpha=float(rank), mode=mode)
                fit = LayerFit(ref, "lie", rank, error / update_norm, error, update_norm,
                               locon_error(wb, wt, rank) / update_norm, masked, start / update_norm)
            else:
                shape = wb.shape
                A, B, S = _truncated(wt.double() - wb.double(), attn_rank, shape)
                entry = ModuleEntry(component, name, "lora", A.float(), B.float(), alpha=float(attn_rank), mode=None)
                error = truncation_errors(S)[attn_rank].item()
                fit = LayerFit(ref, "lora", attn_rank, error / update_norm, error, update_norm, error / update_norm)
            entries.append(entry)
            fits.append(fit)
            total_sq += update_norm**2
            log(f"{ref}: {fit.kind} rank {fit.rank}, relative error {fit.rel_error:.2e}")
        tuned_params = dict(tuned[component].named_parameters())
        for name, param in base[component].named_parameters():
            if name not in targeted and not torch.equal(param, tuned_params[name]):
                other["tensors"] += 1
                other["norm_sq"] += (tuned_params[name].double() - param.double()).square().sum().item()
    if not entries:
        raise ValueError("the tuned model's targeted layers equal the base model's: there is nothing to extract.")
    whole = total_sq + other["norm_sq"]
    other = {"tensors": other["tensors"], "share_of_change": math.sqrt(other["norm_sq"] / whole) if whole else 0.0}
    return entries, fits, other


def totals(fits: list[LayerFit]) -> dict:
    """Whole-adapter errors √Σerr² / √Σ‖W_tuned − W_base‖²: all modules; the conv (Lie) modules, before and
    after the weight-space refinement; a LoCon of equal size on the same modules."""
    lie = [f for f in fits if f.kind == "lie"]

    def total(modules, relative_errors):
        norm = math.sqrt(sum(f.update_norm**2 for f in modules))
        return math.sqrt(sum((e * f.update_norm) ** 2 for f, e in zip(modules, relative_errors))) / norm

    masked = {}
    for f in lie:
        for reason, count in f.masked.items():
            masked[reason] = masked.get(reason, 0) + count
    return {
        "modules": len(fits),
        "lie_modules": len(lie),
        "lora_modules": len(fits) - len(lie),
        "rel_error": total(fits, [f.rel_error for f in fits]),
        "conv_rel_error_lie": total(lie, [f.rel_error for f in lie]) if lie else None,
        "conv_rel_error_lie_svd_start": total(lie, [f.svd_start_rel_error for f in lie]) if lie else None,
        "conv_rel_error_locon": total(lie, [f.locon_rel_error for f in lie]) if lie else None,
        "masked": masked,
    }


def format_report(fits: list[LayerFit], total: dict, other: dict) -> str:
    table = [("module", "adapter", "rank", "rel. error", "LoCon same size", "masked")]
    for f in fits:
        masked = ", ".join(f"{k} {v}" for k, v in f.masked.items() if v) or "-"
        table.append((f.module, f.kind, str(f.rank), f"{f.rel_error:.2e}",
                      f"{f.locon_rel_error:.2e}" if f.kind == "lie" else "-", masked))
    lines = text_table(table)
    lines.append(f"Total relative weight-space error: {total['rel_error']:.3e} over {total['modules']} modules "
                 f"({total['lie_modules']} Lie, {total['lora_modules']} LoRA).")
    if total["lie_modules"]:
        lines.append(f"Conv layers: Lie {total['conv_rel_error_lie']:.3e} (log-ratio SVD start "
                     f"{total['conv_rel_error_lie_svd_start']:.3e}) vs a LoCon of equal size "
                     f"{total['conv_rel_error_locon']:.3e}.")
        masked = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in total["masked"].items())
        lines.append(f"Entries without a logarithm (masked from the fit): {masked}.")
    if other["tensors"]:
        lines.append(f"Not captured: {other['tensors']} other changed tensors (norms, biases, embeddings, ...), "
                     f"{other['share_of_change']:.1%} of the whole change's Frobenius norm.")
    return "\n".join(lines)


def extract_file(base, tuned, output, rank=4, attn_rank=None, mode="exp", steps=DEFAULT_STEPS, overwrite=False,
                 log=lambda message: None):
    """Load both models, extract, and write `output/pytorch_lora_weights.safetensors`; nothing on failure."""
    output = Path(output)
    if output.is_file():
        raise ValueError(f"{output} is a file; --output takes a folder.")
    path = output / WEIGHT_NAME
    if path.exists() and not overwrite:
        raise ValueError(f"{path} exists; pass --overwrite to replace it.")
    base_models = load_models(base, role="base")
    tuned_models = load_models(tuned, role="tuned")
    entries, fits, other = extract_adapter(base_models, tuned_models, rank, attn_rank, mode, steps, log=log)
    total = totals(fits)
    denoiser = next(c for c in DENOISERS if c in base_models)
    report = {"total": total, "not_captured": other, "steps": steps,
              "base_fingerprint": model_fingerprint(base_models[denoiser]), "modules": [asdict(f) for f in fits]}
    write_lie_file(path, entries, {denoiser: report["base_fingerprint"]}, extra={"lie_diffusion_extract": report})
    return path, fits, total, other
