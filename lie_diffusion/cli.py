"""`lie-diffusion merge | inspect | combine | export | extract | install`: bake an adapter into a pipeline,
describe one, stack several into one file, convert one to the kohya format other tools read, extract one from
a fully fine-tuned model, or install the loader that applies the files exactly inside an SD host (ComfyUI,
Forge, A1111).

Errors go to stderr as one line and exit with status 1, so the commands compose in shell scripts; a closed
output pipe ends a command quietly with status 141, as it does other Unix tools.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import uuid
from pathlib import Path

DTYPES = ("fp32", "fp16", "bf16")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="lie-diffusion",
        description="Tools for lie-diffusion adapter files (LoRA-compatible safetensors with a Lie section).",
    )
    parser.add_argument("--version", action="version", version=f"lie-diffusion {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    merge = commands.add_parser(
        "merge",
        help="fold an adapter into a base pipeline and write a standalone pipeline folder",
        description="Load a diffusers pipeline (SD 1.x/2.x, SDXL, Flux.1, SD3/SD3.5), fold an adapter file into "
        "its UNet or transformer and text encoder(s) "
        "(W ⊙ exp(sΔ) for Lie, W + sBA for LoRA) and save a pipeline folder that stock diffusers loads.",
    )
    merge.add_argument("--base", required=True, help="base diffusers pipeline folder (or hub id)")
    merge.add_argument("--weights", required=True, help="adapter .safetensors file, or a folder holding one")
    merge.add_argument("--output", required=True, help="folder to write the merged pipeline to")
    merge.add_argument("--scale", type=float, default=1.0, help="adapter strength (default: 1.0)")
    merge.add_argument("--dtype", choices=DTYPES, default="fp32", help="dtype of the saved weights (default: fp32)")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    merge.set_defaults(func=merge_command)

    inspect = commands.add_parser(
        "inspect",
        help="describe an adapter file: sections, modules, ranks, mode, alpha, parameter counts",
        description="Check an adapter file and describe it, including what stock diffusers would load from it.",
    )
    inspect.add_argument("file", help="adapter .safetensors file, or a folder holding one")
    inspect.set_defaults(func=inspect_command)
    _add_combine_parser(commands)
    _add_export_parser(commands)
    _add_extract_parser(commands)
    _add_install_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
        sys.stdout.flush()  # a closed pipe shows up here, inside the handler, not at interpreter exit
    except BrokenPipeError:
        # The reader went away (`lie-diffusion inspect FILE | head`): stop quietly like any Unix filter. Point
        # stdout at devnull so Python's own flush at exit does not report the same error again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # killed by SIGPIPE, as the shell reports it for other tools
    except KeyboardInterrupt:
        print(f"lie-diffusion {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the CLI's contract is one line on stderr, not a traceback
        kind = "" if isinstance(error, (ValueError, OSError)) else f"{type(error).__name__}: "
        print(f"lie-diffusion {args.command}: error: {kind}{' '.join(str(error).split())}", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------------ merge


def merge_command(args: argparse.Namespace) -> None:
    import torch
    from diffusers import DiffusionPipeline
    from tqdm.auto import tqdm

    from .inject import merge_lie_weights
    from .io import load_lie_weights, read_lie_file

    output = Path(args.output)
    if output.exists() and (output.is_file() or any(output.iterdir())) and not args.overwrite:
        raise ValueError(f"{output} exists and is not empty; pass --overwrite to replace it.")
    if not math.isfinite(args.scale):
        raise ValueError(f"--scale must be a finite number, got {args.scale}.")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]

    with tqdm(total=4, desc="lie-diffusion merge", unit="step") as progress:
        progress.set_postfix_str("reading adapter")
        adapter = read_lie_file(args.weights)  # checked before the (slow) base load
        progress.update()
        progress.set_postfix_str("loading base")
        pipeline = DiffusionPipeline.from_pretrained(args.base, torch_dtype=torch.float32)
        progress.update()
        progress.set_postfix_str("merging")
        load_lie_weights(pipeline, adapter, adapter_name="merge", scale=args.scale)
        merge_lie_weights(pipeline)
        pipeline.to(dtype=dtype)
        progress.update()
        progress.set_postfix_str("saving")
        _save_atomically(pipeline, output)
        progress.update()
    print(f"Merged {adapter.path} (scale {args.scale:g}) into {args.base}; wrote {output} ({args.dtype}).")


def _save_atomically(pipeline, output: Path) -> None:
    """Build the folder beside `output`, then swap it in: a failure never leaves a half-written pipeline."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    staging = output.parent / f".{output.name}.tmp-{tag}"
    staging.mkdir()
    try:
        pipeline.save_pretrained(str(staging))
        if output.exists():
            retired = output.parent / f".{output.name}.old-{tag}"
            os.replace(output, retired)
            os.replace(staging, output)
            if retired.is_dir():
                shutil.rmtree(retired)
            else:
                retired.unlink()
        else:
            os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------- inspect


def inspect_command(args: argparse.Namespace) -> None:
    from .combine import combined_sources
    from .io import read_lie_file

    adapter = read_lie_file(args.file)
    print(describe(adapter, combined_sources(adapter)))


def describe(adapter, sources: list[dict] | None = None) -> str:
    """A human-readable report of a `LieFile`; `sources`: the inputs `combine` made it from."""
    from .io import HASH_KEY
    from .naming import KOHYA_SECTIONS

    info = adapter.info
    lines = [f"File: {adapter.path} ({adapter.path.stat().st_size / 1024:.1f} KiB)"]
    if info is None:
        lines.append("Format: plain LoRA file (no lie_diffusion metadata)")
    else:
        lines.append(
            f"Format: lie_diffusion format_version {info['format_version']} ({info.get('writer', 'unknown writer')})"
        )
        lines.append(
            f"Defaults: mode {info.get('mode') or '-'}, rank {info.get('rank')}, alpha {info.get('alpha')}; "
            f"{len(info.get('overrides') or {})} module(s) override them"
        )
        if info.get("balance", "none") != "none":
            lines.append(f"Balance: {info['balance']} (each Lie module's alpha was set by this rule when it was "
                         "trained; the stored alphas are what applies)")
        fingerprints = info.get("fingerprint") or {}
        if fingerprints.get("unet"):
            fingerprint = fingerprints["unet"]
            family = "SDXL" if fingerprint.get("addition_embed_type") == "text_time" else "SD 1.x/2.x"
            lines.append(f"Base UNet ({family}): " + ", ".join(f"{k}={v}" for k, v in sorted(fingerprint.items())))
        if fingerprints.get("transformer"):
            fingerprint = dict(fingerprints["transformer"])
            model_class = fingerprint.pop("_class_name", "transformer")
            lines.append(f"Base {model_class}: " + ", ".join(f"{k}={v}" for k, v in sorted(fingerprint.items())))
    if adapter.kohya_names:
        lines.append("Names: kohya (lora_unet_…, lora_te…_…; LoRA as .lora_down/.lora_up, Lie as .lie_down/.lie_up, "
                     "every module with .alpha), as lie_diffusion.kohya writes them for sd-scripts")
    stored = adapter.header.get(HASH_KEY)
    lines.append(f"Content hash: sha256 {stored} (matches the tensors)" if stored else
                 "Content hash: none (a file written before lie-diffusion stored one: not checked)")
    if sources:
        lines.append("Combined from: " + ", ".join(f"{s['file']} × {s['weight']:g}" for s in sources)
                     + " (lie-diffusion combine; weights and scalings are folded into lora_B, alpha = rank)")

    lines += ["", "Sections:"]
    for section, title, prefix in (("lora", "LoRA", ""), ("lie", "Lie", "lie.")):
        modules = adapter.section(section)
        if not modules:
            lines.append(f"  {title:<5} absent")
            continue
        per_component = ", ".join(
            f"{c} {len(adapter.section(section, c))}" for c in adapter.components if adapter.section(section, c)
        )
        keys = ", ".join(f"{prefix}{c}.*" for c in adapter.components if adapter.section(section, c))
        if adapter.kohya_names:
            keys = f"*.{KOHYA_SECTIONS[section][0]}/{KOHYA_SECTIONS[section][1]}.weight"
        params = sum(m.num_parameters for m in modules)
        lines.append(f"  {title:<5} {len(modules)} modules ({per_component}), {params:,} parameters, keys {keys}")
    lines.append(
        f"  Total {len(adapter.modules)} modules, {sum(m.num_parameters for m in adapter.modules):,} parameters"
    )

    lora, lie = adapter.section("lora"), adapter.section("lie")
    if adapter.kohya_names:
        stock = "pipe.load_lora_weights() refuses the file (it cannot rename the Lie keys); use lie_diffusion."
    elif lora:
        stock = f"pipe.load_lora_weights() loads the LoRA section ({len(lora)} modules)"
        stock += f" and ignores the Lie section ({len(lie)} modules)." if lie else "; this is the whole adapter."
    else:
        stock = "sees no LoRA part: pipe.load_lora_weights() loads nothing from this file (use lie_diffusion)."
    lines += ["", f"Stock diffusers: {stock}", "", "Modules:"]
    rows = [("section", "kind", "rank", "alpha", "mode", "params", "module")]
    for m in sorted(adapter.modules, key=lambda m: (m.section != "lie", m.ref)):
        kind = "conv" if m.A.ndim == 4 else "linear"
        rows.append((m.section, kind, str(m.rank), f"{m.alpha:g}", m.mode or "-", f"{m.num_parameters:,}", m.ref))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        lines.append(
            "  " + "  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- combine


def _add_combine_parser(commands) -> None:
    combine = commands.add_parser(
        "combine",
        help="stack adapter files into one file, equal to loading them together at given weights",
        description="Write one adapter file equal to loading the inputs together at --weights (a subject plus a "
        "style, two subjects): Lie parts sum in the algebra, W ⊙ exp(Σ wᵢsᵢΔᵢ), LoRA parts add, both exactly, "
        "by stacking the factors (a module's rank is the sum of its inputs' ranks). Refuses inputs for different "
        "base models, LoRA and Lie on one layer, and taylor-mode adapters on one layer (their product has no exact "
        "single-adapter form).",
    )
    combine.add_argument("inputs", nargs="+", metavar="FILE", help="two or more adapter files (or folders holding one)")
    combine.add_argument("--weights", type=float, nargs="+", metavar="W",
                         help="one strength per input, as set_adapters(names, weights) would use (default: 1 each)")
    combine.add_argument("--output", required=True,
                         help="the .safetensors file to write (a folder: pytorch_lora_weights.safetensors in it)")
    combine.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    combine.set_defaults(func=combine_command)


def combine_command(args: argparse.Namespace) -> None:
    from .combine import combine_lie_files

    path, entries = combine_lie_files(args.inputs, args.weights, args.output, overwrite=args.overwrite)
    weights = f" at weights {' '.join(f'{w:g}' for w in args.weights)}" if args.weights else ""
    print(f"Combined {', '.join(args.inputs)}{weights}: {len(entries)} modules, "
          f"{sum(e.num_parameters for e in entries):,} parameters, ranks "
          f"{min(e.rank for e in entries)}–{max(e.rank for e in entries)}.")
    print(f"Wrote {path} ({path.stat().st_size / 1024:.1f} KiB).")


# ----------------------------------------------------------------------------------------------- export


def _add_export_parser(commands) -> None:
    from .export import CONV_MODES, DEFAULT_MAX_REL_ERROR, STRENGTH_CAVEAT

    export = commands.add_parser(
        "export",
        help="write an adapter as a kohya/LyCORIS file for ComfyUI, A1111/Forge and diffusers",
        description="Convert a lie-diffusion file into kohya names and formats. LoRA parts are copied with their "
        "alpha; each Lie part becomes its additive update ΔW = W ⊙ expm1(sΔ) on the base weights, written whole "
        "(.diff, exact) or as a LoCon from its truncated SVD. " + STRENGTH_CAVEAT,
    )
    export.add_argument("adapter", help="lie-diffusion .safetensors file, or a folder holding one")
    export.add_argument("--base", required=True, help="the base diffusers pipeline folder the adapter was trained on")
    export.add_argument("--output", required=True, help="the .safetensors file to write")
    export.add_argument("--format", default="kohya", help="output format (default and only one: kohya)")
    export.add_argument(
        "--conv", choices=CONV_MODES, default="auto",
        help="Lie parts as .diff (exact; ComfyUI/A1111/Forge, not diffusers), lowrank LoCon (every tool), or auto: "
        "LoCon where it meets --max-rel-error with fewer bytes, .diff elsewhere (default: auto)",
    )
    export.add_argument("--rank", type=int, help="one LoCon rank for every Lie layer (--conv lowrank)")
    export.add_argument(
        "--max-rel-error", type=float,
        help="per layer, the smallest rank whose Frobenius error is at most this fraction of ‖ΔW‖ "
        f"(default: {DEFAULT_MAX_REL_ERROR})",
    )
    export.add_argument("--dtype", choices=DTYPES, default="fp16", help="dtype of the written tensors (default: fp16)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    export.set_defaults(func=export_command)


def _quiet_loading() -> None:
    """No per-file progress bars from diffusers / transformers: these commands print their own report."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def export_command(args: argparse.Namespace) -> None:
    from .export import export_file, format_report

    _quiet_loading()
    output, rows, total = export_file(
        args.adapter, args.base, args.output, format=args.format, conv=args.conv, rank=args.rank,
        max_rel_error=args.max_rel_error, dtype=args.dtype, overwrite=args.overwrite,
    )
    print(format_report(rows, total))
    print(f"Wrote {output} ({output.stat().st_size / 1024:.1f} KiB); the report is in its metadata.")


# ---------------------------------------------------------------------------------------------- extract


def _add_extract_parser(commands) -> None:
    from .extract import DEFAULT_STEPS

    extract = commands.add_parser(
        "extract",
        help="extract a Lie adapter (plus attention LoRA) from a fully fine-tuned model",
        description="Fit Lie adapters on the conv layers (from log(W_tuned / W_base), refined on the weight-space "
        "error) and LoRA on the attention projections (SVD of W_tuned - W_base) of every component that changed; "
        "report per-layer and total relative errors next to a LoCon of equal size.",
    )
    extract.add_argument("--base", required=True, help="the base diffusers pipeline folder")
    extract.add_argument("--tuned", required=True, help="the fully fine-tuned pipeline folder (same architecture)")
    extract.add_argument("--output", required=True, help="folder to write pytorch_lora_weights.safetensors to")
    extract.add_argument("--rank", type=int, default=4, help="rank of the Lie conv adapters (default: 4)")
    extract.add_argument("--attn-rank", type=int, help="rank of the attention LoRA (default: --rank)")
    extract.add_argument("--mode", default="exp", help="Lie mode: exp (W ⊙ exp Δ) or taylor (W + W ⊙ Δ)")
    extract.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS,
        help=f"L-BFGS iterations on the weight-space error per conv layer (default: {DEFAULT_STEPS}; 0: SVD only)",
    )
    extract.add_argument("--overwrite", action="store_true", help="replace an existing adapter file in --output")
    extract.set_defaults(func=extract_command)


def extract_command(args: argparse.Namespace) -> None:
    from .extract import extract_file, format_report

    _quiet_loading()
    path, fits, total, other = extract_file(
        args.base, args.tuned, args.output, rank=args.rank, attn_rank=args.attn_rank, mode=args.mode,
        steps=args.steps, overwrite=args.overwrite,
    )
    print(format_report(fits, total, other))
    print(f"Wrote {path}.")


# ---------------------------------------------------------------------------------------------- install


def _add_install_parser(commands) -> None:
    from .integrations import HOSTS

    install = commands.add_parser(
        "install",
        help="install the native lie-diffusion loader into an SD host (" + ", ".join(HOSTS) + ")",
        description="Link the lie-diffusion loader into a host's plugin folder (ComfyUI: custom_nodes/, Forge and "
        "A1111: extensions/), so the host applies lie-diffusion files exactly at every strength. Safe to run again. "
        "The host's Python needs lie-diffusion installed (pip install lie-diffusion).",
    )
    install.add_argument("host", choices=sorted(HOSTS), help="the host to install into")
    install.add_argument("path", help="the host's folder (the ComfyUI, Forge or stable-diffusion-webui checkout)")
    install.add_argument("--copy", action="store_true", help="copy the files instead of linking them")
    install.set_defaults(func=install_command)


def install_command(args: argparse.Namespace) -> None:
    from .integrations import HOSTS, install

    target, changed = install(args.host, args.path, copy=args.copy)
    title = HOSTS[args.host].title
    if changed:
        print(f"Installed the lie-diffusion loader for {title}: {target}. Restart {title} to load it.")
    else:
        print(f"Already installed: {target}.")
