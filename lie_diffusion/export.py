"""Export a lie-diffusion file to the kohya/LyCORIS format that ComfyUI, A1111, Forge and diffusers read.

None of those tools applies a multiplicative update: every format they read ends as W += t·ΔW.
A Lie adapter is exactly such an update at strength t = 1, tied to the base weights:

    exp:    ΔW = W ⊙ expm1(sΔ)          taylor: ΔW = W ⊙ sΔ

so the export needs the base model. ΔW is full size and in general full rank, so it is written
either whole (`<name>.diff`, exact, large) or as a LoCon (`lora_down`/`lora_up`/`alpha`) from its
truncated SVD, whose per-layer Frobenius error is exactly √(Σ_{i>k} σᵢ²). Plain LoRA parts of the
file are already additive: they are copied with their true alpha.

At strength t those tools apply W(1 + t·expm1(sΔ)), not the Lie model's W ⊙ exp(t·sΔ); the two agree
at t = 1 only.

Names: `naming.kohya_name` (SD1/2 diffusers-style, SDXL SGM); for Flux.1 and SD3/SD3.5, `naming.dit_host_name`:
diffusers' own names, which ComfyUI (Flux, SD3) and Forge (Flux) map onto rows of their fused weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .functional import LieFactor, lie_delta, lie_update
from .io import COMPONENTS, DENOISERS, LieFile, ModuleEntry, _atomic_write, _fingerprint_diff, _plan, read_lie_file
from .naming import dit_family, dit_host_name, kohya_name

FORMATS = ("kohya",)
CONV_MODES = ("exact", "lowrank", "auto")
DEFAULT_MAX_REL_ERROR = 0.01
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
STRENGTH_CAVEAT = (
    "Strength: ComfyUI, A1111, Forge and diffusers apply W + t·ΔW, so at strength t the exported Lie part is "
    "W(1 + t·expm1(sΔ)), not the "
    "Lie model's W ⊙ exp(t·sΔ); the two agree at t = 1 only."
)


# ------------------------------------------------------------------------------------------------ models


def load_models(path, components=COMPONENTS, role: str = "base") -> dict[str, nn.Module]:
    """The denoiser (UNet, or Flux/SD3 transformer) / text encoders of a diffusers pipeline folder (or a UNet
    folder), in float32."""
    import diffusers

    path = Path(path)
    index = path / "model_index.json"
    if not index.is_file():
        if (path / "config.json").is_file() and "unet" in components:
            return {"unet": diffusers.UNet2DConditionModel.from_pretrained(str(path), torch_dtype=torch.float32)}
        raise ValueError(f"{path}: the {role} model is not a diffusers pipeline folder (no model_index.json).")
    listed = json.loads(index.read_text())
    models = {}
    for component in components:
        library, class_name = (listed.get(component) or [None, None])[:2]
        if class_name is None:
            continue
        if component in DENOISERS:
            model_class = getattr(diffusers, class_name, None) if library == "diffusers" else None
            if model_class is None:
                raise ValueError(f"{path}: {component} is a {library}.{class_name}; expected a diffusers model.")
            models[component] = model_class.from_pretrained(str(path), subfolder=component, torch_dtype=torch.float32)
            continue
        import transformers

        model_class = getattr(transformers, class_name, None)
        if library != "transformers" or model_class is None:
            raise ValueError(f"{path}: {component} is a {library}.{class_name}; expected a transformers CLIP model.")
        models[component] = model_class.from_pretrained(str(path), subfolder=component, torch_dtype=torch.float32)
    if not any(c in models for c in DENOISERS):
        raise ValueError(f"{path}: the {role} pipeline has no {' or '.join(DENOISERS)}.")
    return models


def check_base(adapter: LieFile, models: dict[str, nn.Module]) -> dict[str, dict[str, ModuleEntry]]:
    """Refuse a base whose UNet / transformer config differs from the one the adapter was saved for, or whose
    modules do not fit it; return, per component, the model's module name -> file entry."""
    diff = "; ".join(filter(None, (_fingerprint_diff(adapter, models.get(c), c) for c in DENOISERS)))
    if diff:
        raise ValueError(f"{adapter.path}: was saved for another base model ({diff}).")
    missing = [c for c in adapter.components if c not in models]
    if missing:
        raise ValueError(f"{adapter.path}: holds adapters for {missing}, which the base model lacks.")
    plans = _plan(adapter, models, adapter_name="lie-diffusion-export")  # names and shapes, or one clear error
    return {component: plan.entries for component, plan in plans.items()}


# ------------------------------------------------------------------------------------------------- math


def lora_update(entry: ModuleEntry, shape) -> torch.Tensor:
    """ΔW of an additive LoRA: (alpha/rank)·B@A, in float64."""
    return lie_delta(entry.A.double(), entry.B.double(), entry.scaling, shape)


def truncation_errors(singular_values: torch.Tensor) -> torch.Tensor:
    """errors[k] = √(Σ_{i≥k} σᵢ²): the Frobenius error of keeping the first k singular triplets (k = 0..n)."""
    squares = singular_values.double().square()
    tails = torch.cat([squares.flip(0).cumsum(0).flip(0), squares.new_zeros(1)])
    return tails.clamp_min(0).sqrt()


def smallest_rank(errors: torch.Tensor, max_rel_error: float) -> int:
    """The smallest k whose truncation error is at most `max_rel_error`·‖ΔW‖ (errors[0] = ‖ΔW‖)."""
    ok = torch.nonzero(errors <= max_rel_error * errors[0]).squeeze(1)
    return int(ok[0])


def low_rank_factors(U, S, Vh, k: int, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_down, lora_up) of rank k, √σ on each side, in kohya/LoCon shapes (conv: up is 1x1)."""
    root = S[:k].sqrt()
    down = (root[:, None] * Vh[:k]).reshape(k, *shape[1:])
    up = U[:, :k] * root
    return down, up.reshape(shape[0], k, *([1] * (len(shape) - 2)))


@dataclass
class ExportRow:
    """One exported module: what was written and how far it is from the exact update."""

    name: str  # kohya key stem
    module: str  # <component>.<module> in the source file
    source: str  # "lie" or "lora"
    written: str  # "lora" (LoRA copied), "locon" (low-rank Lie update) or "diff" (full Lie update)
    rank: int | None  # None for diff
    max_rank: int
    rel_error: float  # ‖ΔW_written − ΔW‖_F / ‖ΔW‖_F, measured on the written tensors
    abs_error: float
    update_norm: float  # ‖ΔW‖_F
    bytes: int


def export_kohya(
    adapter: LieFile,
    models: dict[str, nn.Module],
    conv: str = "auto",
    rank: int | None = None,
    max_rel_error: float | None = None,
    dtype: torch.dtype = torch.float16,
) -> tuple[dict[str, torch.Tensor], list[ExportRow]]:
    """The kohya state dict of `adapter` applied to the base `models`, and one report row per module."""
    if conv not in CONV_MODES:
        raise ValueError(f"unknown --conv {conv!r}; choose from {', '.join(CONV_MODES)}.")
    if rank is not None and max_rel_error is not None:
        raise ValueError("give --rank or --max-rel-error, not both.")
    if rank is not None and conv != "lowrank":
        raise ValueError(f"--rank applies to --conv lowrank; --conv {conv} chooses ranks from --max-rel-error.")
    if rank is not None and rank < 1:
        raise ValueError(f"--rank must be a positive integer, got {rank}.")
    if max_rel_error is None:
        max_rel_error = DEFAULT_MAX_REL_ERROR
    if not 0 <= max_rel_error < 1:
        raise ValueError(f"--max-rel-error must be in [0, 1), got {max_rel_error}.")
    entries = check_base(adapter, models)
    host_name = host_namer(models)
    tensors, rows, names = {}, [], set()
    for component in (c for c in COMPONENTS if c in entries):
        for module_name, entry in sorted(entries[component].items()):
            weight = models[component].get_submodule(module_name).weight.detach()
            name = host_name(component, module_name)
            if name in names:
                raise ValueError(f"{entry.ref}: kohya name {name} is given twice.")
            names.add(name)
            written = _export_module(name, entry, weight, conv, rank, max_rel_error, dtype)
            tensors.update(written[0])
            rows.append(written[1])
    return tensors, rows


def host_namer(models: dict[str, nn.Module]):
    """(component, module) → the name the hosts read: kohya's for SD UNets, diffusers' for Flux/SD3."""
    if "transformer" in models:
        config = models["transformer"].config
        return lambda component, module: dit_host_name(component, module, config)
    return lambda component, module: kohya_name(component, module, models["unet"].config)


def dit_readers(models: dict[str, nn.Module]) -> str | None:
    """The hosts that read an export for a Flux/SD3 transformer (A1111 runs neither, Forge no SD3); None for SD."""
    if "transformer" not in models:
        return None
    return "ComfyUI, Forge" if dit_family(models["transformer"].config) == "flux" else "ComfyUI"


def _export_module(name, entry, weight, conv, rank, max_rel_error, dtype):
    shape, max_rank = weight.shape, min(weight.shape[0], weight[0].numel())
    if entry.section == "lora":
        update = lora_update(entry, shape)
        out = {f"{name}.lora_down.weight": entry.A.to(dtype), f"{name}.lora_up.weight": entry.B.to(dtype),
               f"{name}.alpha": torch.tensor(entry.alpha, dtype=torch.float32)}
        return out, _row(name, entry, "lora", entry.rank, max_rank, update, out)
    update = lie_update(weight.double(), LieFactor(entry.A.double(), entry.B.double(), entry.scaling, entry.mode))
    if conv != "exact":
        if rank is not None and rank > max_rank:
            raise ValueError(
                f"--rank {rank} is larger than {entry.ref} allows (weight {tuple(shape)}: rank at most {max_rank})."
            )
        U, S, Vh = torch.linalg.svd(update.reshape(shape[0], -1), full_matrices=False)
        k = rank if rank is not None else smallest_rank(truncation_errors(S), max_rel_error)
        k = max(k, 1)
        locon_size = k * (shape[0] + weight[0].numel())
        if conv == "lowrank" or locon_size < weight.numel():
            down, up = low_rank_factors(U, S, Vh, k, shape)
            out = {f"{name}.lora_down.weight": down.to(dtype), f"{name}.lora_up.weight": up.to(dtype),
                   f"{name}.alpha": torch.tensor(float(k), dtype=torch.float32)}
            return out, _row(name, entry, "locon", k, max_rank, update, out)
    out = {f"{name}.diff": update.to(dtype)}
    return out, _row(name, entry, "diff", None, max_rank, update, out)


def _row(name, entry, written, rank, max_rank, update, out) -> ExportRow:
    if written == "diff":
        applied = out[f"{name}.diff"].double()
    else:
        down, up = out[f"{name}.lora_down.weight"].double(), out[f"{name}.lora_up.weight"].double()
        applied = lie_delta(down, up, out[f"{name}.alpha"].item() / down.shape[0], update.shape)
    error, norm = (applied - update).norm().item(), update.norm().item()
    return ExportRow(
        name=name, module=entry.ref, source=entry.section, written=written, rank=rank, max_rank=max_rank,
        rel_error=error / norm if norm > 0 else 0.0, abs_error=error, update_norm=norm,
        bytes=sum(t.numel() * t.element_size() for t in out.values()),
    )


def summary(rows: list[ExportRow], read_by: str | None = None) -> dict:
    """Totals over all modules; `rel_error` is the error of the whole update: √Σerr² / √Σ‖ΔW‖². `read_by`: who
    reads the file, if not the SD hosts and diffusers."""
    norms = sum(r.update_norm**2 for r in rows)
    errors = sum(r.abs_error**2 for r in rows)
    counts = {kind: sum(r.written == kind for r in rows) for kind in ("lora", "locon", "diff")}
    return {
        "modules": len(rows),
        "bytes": sum(r.bytes for r in rows),
        "rel_error": math.sqrt(errors / norms) if norms > 0 else 0.0,
        "max_rel_error": max((r.rel_error for r in rows), default=0.0),
        **{f"{kind}_modules": n for kind, n in counts.items()},
        "read_by": read_by or "ComfyUI, Forge, A1111" + ("" if counts["diff"] else ", diffusers load_lora_weights"),
    }


def text_table(rows: list[tuple[str, ...]]) -> list[str]:
    """Left-aligned columns, the first row a header underlined with dashes."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def format_report(rows: list[ExportRow], total: dict) -> str:
    table = [("module", "source", "written", "rank", "rel. error", "bytes")]
    for r in rows:
        rank = "-" if r.rank is None else f"{r.rank}/{r.max_rank}"
        table.append((r.name, r.source, r.written, rank, f"{r.rel_error:.2e}", f"{r.bytes:,}"))
    table.append(("total", "", f"{total['modules']} modules", "", f"{total['rel_error']:.2e}", f"{total['bytes']:,}"))
    lines = text_table(table)
    lines.append(
        f"{total['lora_modules']} LoRA copied, {total['locon_modules']} Lie as LoCon, {total['diff_modules']} Lie "
        f"as .diff; largest per-module error {total['max_rel_error']:.2e} (relative to that module's ΔW)."
    )
    lines.append(f"Read by: {total['read_by']}" + (
        "." if not total["diff_modules"] or "diffusers" in total["read_by"] or "A1111" not in total["read_by"]
        else "; stock diffusers refuses .diff keys (use --conv lowrank for it)."
    ))
    lines.append(STRENGTH_CAVEAT)
    return "\n".join(lines)


def export_file(
    adapter_path,
    base,
    output,
    format: str = "kohya",
    conv: str = "auto",
    rank: int | None = None,
    max_rel_error: float | None = None,
    dtype: str = "fp16",
    overwrite: bool = False,
) -> tuple[Path, list[ExportRow], dict]:
    """Read, check, convert and atomically write; nothing is written when any step fails."""
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; this version writes: {', '.join(FORMATS)}.")
    if dtype not in DTYPES:
        raise ValueError(f"unknown --dtype {dtype!r}; choose from {', '.join(DTYPES)}.")
    output = Path(output)
    if output.suffix != ".safetensors":
        raise ValueError(f"{output}: the output must be a .safetensors file.")
    if output.exists() and not overwrite:
        raise ValueError(f"{output} exists; pass --overwrite to replace it.")
    if not output.parent.is_dir():
        raise ValueError(f"{output.parent}: no such directory.")
    adapter = read_lie_file(adapter_path)
    if adapter.info is None:
        raise ValueError(f"{adapter.path}: not a lie-diffusion file (no 'lie_diffusion' metadata).")
    models = load_models(base, [c for c in COMPONENTS if c in DENOISERS or c in adapter.components])
    tensors, rows = export_kohya(adapter, models, conv, rank, max_rel_error, DTYPES[dtype])
    total = summary(rows, dit_readers(models))
    from . import __version__

    report = {"writer": f"lie-diffusion {__version__}", "source": adapter.path.name, "conv": conv,
              "dtype": dtype, "strength_caveat": STRENGTH_CAVEAT, "total": total,
              "modules": [asdict(r) for r in rows]}
    metadata = {"format": "pt", "lie_diffusion_export": json.dumps(report, sort_keys=True)}
    _atomic_write(output, safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))
    return output, rows, total
