"""Combine adapter files into one: the file that equals loading them together at given weights.

Loaded together, adapters on one layer act as W ⊙ exp(Σ wᵢsᵢΔᵢ) (Lie, exp mode) and W + Σ wᵢsᵢBᵢAᵢ (LoRA),
and both sums are one low-rank product again: stacking the factors, A = [A₁; A₂; …] and
B = [w₁s₁B₁, w₂s₂B₂, …], gives Σ wᵢsᵢBᵢAᵢ with scaling 1. So the combined file stores every module with
alpha = its rank and each input's weight and scaling folded into its rows of lora_B: exact, to one float32
rounding per factor. The rank of a module is the sum of its inputs' ranks.

What has no exact single-adapter form is refused: taylor adapters on one layer multiply, (1 + Δ₁)(1 + Δ₂),
and their cross term is not low rank; one layer cannot carry LoRA from one file and Lie from another; files
made for different base models do not share layers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from .io import WEIGHT_NAME, LieFile, ModuleEntry, read_lie_file, write_lie_file

METADATA_SOURCES_KEY = "lie_diffusion_combined"  # the inputs and their weights, informative


def combine_lie_files(inputs: Sequence, weights: Sequence[float] | None, output, overwrite: bool = False
                      ) -> tuple[Path, list[ModuleEntry]]:
    """Write the adapter equal to `inputs` loaded together at `weights` (default: 1 each) to `output` (a
    .safetensors path, or a folder for pytorch_lora_weights.safetensors). Everything is checked before writing.
    Returns the path and the combined modules."""
    if len(inputs) < 2:
        raise ValueError("combine needs at least two adapter files.")
    weights = [1.0] * len(inputs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(inputs):
        raise ValueError(f"{len(inputs)} adapter files but {len(weights)} weights; give one weight per file.")
    bad = [w for w in weights if not math.isfinite(w)]
    if bad:
        raise ValueError(f"weights must be finite numbers, got {bad[0]}.")
    path = output_path(output)
    if path.exists() and not overwrite:
        raise ValueError(f"{path} exists; pass --overwrite to replace it.")
    files = [read_lie_file(p) for p in inputs]
    fingerprints = common_fingerprints(files)
    entries = [combined_entry(group) for group in groups(files, weights).values()]
    sources = [{"file": f"{f.path.parent.name}/{f.path.name}", "weight": w, "balance": (f.info or {}).get("balance", "none")}
               for f, w in zip(files, weights)]
    write_lie_file(path, entries, fingerprints, "none", extra={METADATA_SOURCES_KEY: sources})
    return path, entries


def combined_sources(adapter: LieFile) -> list[dict] | None:
    """The inputs and weights a `combine` output lists in its metadata; None for any other file."""
    sources = adapter.header.get(METADATA_SOURCES_KEY)
    return None if sources is None else json.loads(sources)


def output_path(output) -> Path:
    output = Path(output)
    return output / WEIGHT_NAME if output.is_dir() else output


def common_fingerprints(files: list[LieFile]) -> dict:
    """The base denoiser fingerprint the files share (`{"unet" | "transformer": ...}`, empty when no file records
    one); refuses files made for different base models: other configs, or a UNet and a transformer."""
    saved = [(f, (f.info or {}).get("fingerprint") or {}) for f in files]
    saved = [(f, fingerprints) for f, fingerprints in saved if fingerprints]
    if not saved:
        return {}
    first, reference = saved[0]
    for other, fingerprints in saved[1:]:
        if fingerprints.keys() != reference.keys():
            raise ValueError(f"{first.path} ({', '.join(reference)}) and {other.path} ({', '.join(fingerprints)}) were "
                             "made for different base models; only adapters of one base model combine.")
        for component, fingerprint in fingerprints.items():
            ref = reference[component]
            differ = sorted(k for k in ref.keys() | fingerprint.keys() if ref.get(k) != fingerprint.get(k))
            if differ:
                shown = "; ".join(f"{k} {ref.get(k)} vs {fingerprint.get(k)}" for k in differ[:3])
                raise ValueError(f"{first.path} and {other.path} were made for different base models ({shown}); "
                                 "only adapters of one base model combine.")
    return reference


def groups(files: list[LieFile], weights: list[float]) -> dict[str, list[tuple[LieFile, ModuleEntry, float]]]:
    """The inputs' modules by layer. CLIP text encoders are named with or without a leading `text_model.`
    (transformers 4 / 5), so that prefix does not tell layers apart."""
    found: dict[str, list] = {}
    for file, weight in zip(files, weights):
        for entry in file.modules:
            layer = f"{entry.component}.{entry.module.removeprefix('text_model.')}"
            found.setdefault(layer, []).append((file, entry, weight))
    return found


def combined_entry(group: list[tuple[LieFile, ModuleEntry, float]]) -> ModuleEntry:
    """One module holding Σ wᵢsᵢBᵢAᵢ at scaling 1, from every input that adapts this layer."""
    first_file, first, _ = group[0]
    for file, entry, _ in group[1:]:
        where = f"{first.ref} ({first_file.path.name}: {first.section}, {file.path.name}: {entry.section})"
        if entry.section != first.section:
            raise ValueError(f"{where}: one layer carries either LoRA or Lie adapters, so these files cannot be "
                             "loaded together or combined.")
        if entry.A.shape[1:] != first.A.shape[1:] or entry.B.shape[0] != first.B.shape[0]:
            raise ValueError(f"{first.ref}: factors lora_A {tuple(first.A.shape)} / lora_B {tuple(first.B.shape)} in "
                             f"{first_file.path} do not fit lora_A {tuple(entry.A.shape)} / lora_B "
                             f"{tuple(entry.B.shape)} in {file.path}; the files were made for different base models.")
    modes = {entry.mode for _, entry, _ in group}
    if len(group) > 1 and modes != {None} and modes != {"exp"}:
        names = ", ".join(f"{file.path.name}: {entry.mode}" for file, entry, _ in group)
        raise ValueError(f"{first.ref} ({names}): only exp-mode Lie adapters sum exactly (W ⊙ exp(Σ sΔ)); taylor "
                         "adapters on one layer multiply, (1 + Δ₁)(1 + Δ₂), which no single adapter holds.")
    A = torch.cat([entry.A.float() for _, entry, _ in group])
    B = torch.cat([entry.B.float() * (weight * entry.scaling) for _, entry, weight in group], dim=1)
    return ModuleEntry(first.component, first.module, first.section, A, B, alpha=float(A.shape[0]), mode=first.mode)
