#!/usr/bin/env python
"""Subject fidelity at equal prior preservation: the trade-off curves behind `benchmarks/dreambooth.py`.

A learning rate moves a method along a curve: more subject likeness, more forgetting. Comparing
methods each at one chosen lr compares two points of different curves, so this script runs every
method at every lr of its grid (each lr is one `dreambooth.py` invocation with `--lr-grid LR
--val-subjects 0`), then reads each method's metrics at the same prior similarity, linear between
its neighbouring lrs:

    python benchmarks/dreambooth_tradeoff.py --split validation --subjects 2 --workdir W-val   # choose
    python benchmarks/dreambooth_tradeoff.py --subjects 6 --seeds 3 --workdir W-test            # report

- curves: per method and lr, the mean over subjects × seeds (subject similarity / prior similarity);
- subject similarity at each prior level, on the mean curves;
- paired win rates at a matched prior level: per (subject, seed), each method's own curve is read at
  that level, and the reference method wins a pair when its subject similarity there is higher;
- the other judge metrics at that level (subject named, colour prompt, held-out loss), same reading;
- NaN stops: runs the training script stopped on a non-finite loss, per method and lr.

Each method runs at the lrs of its own grid (`--grid METHOD=LR,LR,...`, default `dreambooth.LR_GRIDS`).
Finished runs in `--workdir` are reused (split a long run over several invocations, add seeds later).
Results: results/dreambooth_tradeoff[-validation].{json,md,png} and, for the test split, the section of
docs/benchmarks.md. `--plot-only` redraws the figure from the saved JSON without running anything.

`--kind flux` runs it on the tiny emoji Flux model (`--pipeline DIR` for another folder): target presets
(attention only, diffusers' targets, every Linear incl. modulations) × Lie with / without the balancing rule and
LoRA (`dreambooth.FLUX_METHODS`, grids `dreambooth.FLUX_LR_GRIDS`, all of them by default), the reference being
the script's default (`flux-lie`). Results: results/dreambooth_tradeoff_flux[-validation].{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from benchmarks import benchlib as B  # noqa: E402
from benchmarks import dreambooth as D  # noqa: E402

READ_METRICS = ("subject_similarity", "subject_top1", "colour_accuracy", "heldout_loss")
SD_METHODS = ("lie-default", "lie-unbalanced", "lora-conv-attn", "lycoris-locon")
# dreambooth.py flags passed on as they are when given (smaller for a smoke run)
PASSED = ("batch", "class_images", "subject_images", "prior_prompts", "sample_steps", "threads")


def finished(runs: list[dict]) -> list[dict]:
    return [r for r in runs if "stopped" not in r]


def curve(runs: list[dict], metric: str) -> list[tuple[float, float, float]]:
    """[(lr, mean prior similarity, mean metric)] by lr, over the given runs (NaN stops left out)."""
    by_lr: dict[float, list[dict]] = {}
    for r in finished(runs):
        by_lr.setdefault(r["lr"], []).append(r)
    return [(lr, statistics.mean(r["prior_similarity"] for r in mine), statistics.mean(r[metric] for r in mine))
            for lr, mine in sorted(by_lr.items())]


def read_at(points: list[tuple[float, float, float]], prior: float) -> float | None:
    """The metric at this prior similarity, linear between the two lrs around it; None outside the curve."""
    if not points:
        return None
    priors = np.array([p for _, p, _ in points])
    if not priors.min() <= prior <= priors.max():
        return None
    order = np.argsort(priors)
    return float(np.interp(prior, priors[order], np.array([m for _, _, m in points])[order]))


def by_method(runs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in runs:
        out.setdefault(r["method"], []).append(r)
    return out


def paired(runs: list[dict], reference: str, level: float) -> dict[str, dict]:
    """Per peer: over (subject, seed) pairs where both curves reach `level`, the reference's win rate and mean
    difference in subject similarity there."""
    cases = {(r["subject"], r["seed"]) for r in runs}
    read = {method: {case: read_at(curve([r for r in mine if (r["subject"], r["seed"]) == case],
                                         "subject_similarity"), level) for case in cases}
            for method, mine in by_method(runs).items()}
    out = {}
    for method in read:
        if method == reference or reference not in read:
            continue
        diffs = [read[reference][c] - read[method][c] for c in sorted(cases)
                 if read[reference][c] is not None and read[method][c] is not None]
        out[method] = {"pairs": len(diffs), "of": len(cases),
                       "win_rate": (sum(1.0 if d > 0 else 0.5 if d == 0 else 0.0 for d in diffs) / len(diffs)
                                    if diffs else None),
                       "mean_diff": statistics.mean(diffs) if diffs else None}
    return out


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def seed_spread(runs: list[dict]) -> dict[float, tuple[float, float, float, float]]:
    """Per lr: the (prior, subject) similarity of each seed, averaged over subjects, as their means and stds
    (the seeds' spread; 0 with one seed)."""
    out = {}
    for lr in sorted({r["lr"] for r in finished(runs)}):
        per_seed = {}
        for r in finished(runs):
            if r["lr"] == lr:
                per_seed.setdefault(r["seed"], []).append((r["prior_similarity"], r["subject_similarity"]))
        priors = [statistics.mean(p for p, _ in v) for v in per_seed.values()]
        subjects = [statistics.mean(s for _, s in v) for v in per_seed.values()]
        out[lr] = (statistics.mean(priors), spread(priors), statistics.mean(subjects), spread(subjects))
    return out


def plot(results: dict, path: Path) -> Path:
    """Subject similarity against prior similarity, one curve per method through its lrs, with the seeds'
    spread as error bars: up and right is better, and a method is better where its curve lies above."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.add_subplot()
    for k, (method, mine) in enumerate(by_method(results["records"]).items()):
        points = seed_spread(mine)
        lrs = list(points)
        prior, prior_sd, subject, subject_sd = (np.array([points[lr][i] for lr in lrs]) for i in range(4))
        line = ax.errorbar(prior, subject, xerr=prior_sd, yerr=subject_sd, marker="o", capsize=3, label=method)
        for lr, x, y in zip(lrs, prior, subject):
            ax.annotate(f"lr {lr:g}", (x, y), textcoords="offset points", xytext=(5, 5 - 14 * (k % 2)), fontsize=7,
                        color=line.lines[0].get_color())
    ax.set_xlabel("prior similarity (pretrained emoji after fine-tuning; higher = less forgetting)")
    ax.set_ylabel("subject similarity (higher = more like the subject)")
    seeds = results["seeds"]
    model = "" if results.get("kind", "sd") == "sd" else f" ({results['kind']})"
    ax.set_title(f"DreamBooth trade-off{model}, {results['split']} subjects: {len(results['subjects'])} subjects × "
                 f"{seeds} seed{'s' if seeds != 1 else ''}, {results['steps']} steps", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return B.save_figure(fig, path)


def markdown(results: dict) -> str:
    methods, levels, level = results["methods"], results["prior_levels"], results["win_level"]
    runs = results["records"]
    grouped = by_method(runs)
    lrs = sorted({r["lr"] for r in runs})
    model = "" if results.get("kind", "sd") == "sd" else f" on the tiny emoji {results['kind'].capitalize()} model"
    lines = [f"### DreamBooth: subject fidelity at equal prior preservation{model} ({results['split']} subjects)",
             f"`{results['command']}`: {len(runs)} runs, {len(results['subjects'])} {results['split']} subjects "
             f"({', '.join(results['subjects'])}) × {results['seeds']} seed(s), {results['steps']} steps, "
             f"rank {results['rank']}; about {results['minutes']:.0f} min of runs with {results['jobs']} job(s). "
             "Cells: mean over subjects × seeds (subject similarity / prior similarity); ✗n: n runs stopped on a "
             "NaN loss.", "",
             "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for method in methods:
        mine = grouped.get(method, [])
        cells = {lr: f"{s:.3f} / {p:.3f}" for lr, p, s in curve(mine, "subject_similarity")}
        for lr in lrs:
            stops = sum(1 for r in mine if r["lr"] == lr and "stopped" in r)
            if stops:
                cells[lr] = f"{cells.get(lr, '—')} ✗{stops}"
        lines.append(f"| {method} | " + " | ".join(cells.get(lr, "—") for lr in lrs) + " |")
    lines += ["", "Subject similarity at equal prior similarity (on the mean curves; — where a method's lrs do not "
              "reach that level):", "", "| prior similarity | " + " | ".join(methods) + " |",
              "|---|" + "---|" * len(methods)]
    for prior in levels:
        cells = [read_at(curve(grouped.get(m, []), "subject_similarity"), prior) for m in methods]
        lines.append(f"| {prior:.2f} | " + " | ".join("—" if c is None else f"{c:.3f}" for c in cells) + " |")
    titles = {k: D.METRIC_TITLES[k] for k in READ_METRICS}
    lines += ["", f"All judge metrics at prior similarity {level:.2f} (mean curves):", "",
              "| method | " + " | ".join(titles.values()) + " |", "|---|" + "---|" * len(titles)]
    for method in methods:
        cells = [read_at(curve(grouped.get(method, []), k), level) for k in READ_METRICS]
        lines.append(f"| {method} | " + " | ".join("—" if c is None else f"{c:.3f}" for c in cells) + " |")
    reference = results["reference"]
    lines += ["", f"Paired at prior similarity {level:.2f}: per (subject, seed), each method's own curve read at "
              f"that level; {reference} wins a pair when its subject similarity there is higher:", "",
              f"| {reference} vs | pairs reaching {level:.2f} | {reference} win rate | mean difference |",
              "|---|---|---|---|"]
    for method, v in results["paired"].items():
        rate = "—" if v["win_rate"] is None else f"{v['win_rate']:.0%}"
        diff = "—" if v["mean_diff"] is None else f"{v['mean_diff']:+.3f}"
        lines.append(f"| {method} | {v['pairs']} of {v['of']} | {rate} | {diff} |")
    return "\n".join(lines) + "\n"


def parse_grids(specs: list[str] | None, kind: str = "sd") -> dict[str, tuple[float, ...]]:
    grids = dict(D.FAMILIES[kind].lr_grids)
    for spec in specs or []:
        name, sep, values = spec.partition("=")
        if not sep or name not in grids:
            raise ValueError(f"--grid {spec!r}: write METHOD=LR,LR,... with a method of {sorted(grids)}")
        grids[name] = tuple(float(v) for v in values.split(","))
    return grids


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=sorted(D.FAMILIES), default="sd",
                        help="the emoji pipeline: the Stable Diffusion one, or the tiny Flux one")
    parser.add_argument("--pipeline", help="pipeline folder (default: the shipped one of --kind)")
    parser.add_argument("--methods", nargs="+", choices=D.ALL_METHOD_NAMES,
                        help=f"default on sd: {' '.join(SD_METHODS)}; on flux: every method of dreambooth.FLUX_METHODS")
    parser.add_argument("--grid", action="append", metavar="METHOD=LR,LR,...", help="replace a method's lr grid")
    parser.add_argument("--split", choices=["test", "validation"], default="test")
    parser.add_argument("--subjects", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=1)
    for flag in PASSED:
        parser.add_argument("--" + flag.replace("_", "-"), type=int, help="dreambooth.py's flag (default: its own)")
    parser.add_argument("--prior-levels", type=float, nargs="+", default=[0.60, 0.65, 0.70, 0.75, 0.80])
    parser.add_argument("--win-level", type=float, default=0.70, help="prior similarity of the paired comparison")
    parser.add_argument("--out", default=str(B.RESULTS_DIR))
    B.add_page_argument(parser, "dreambooth_tradeoff")
    parser.add_argument("--plot-only", action="store_true",
                        help="redraw the figure from --out's saved JSON of this --split; run nothing")
    parser.add_argument("--workdir", help="one subfolder per lr; finished runs are reused (required to run)")
    args = parser.parse_args(argv)
    family = D.FAMILIES[args.kind]
    args.methods = args.methods or list(SD_METHODS if args.kind == "sd" else family.by_name)
    if set(args.methods) - set(family.by_name):
        parser.error(f"--methods: {sorted(set(args.methods) - set(family.by_name))} are not methods of --kind "
                     f"{args.kind}; choose from {list(family.by_name)}")
    name = "dreambooth_tradeoff" + D.result_suffix(args.kind) + ("" if args.split == "test" else "-validation")
    if args.plot_only:
        return plot(json.loads((Path(args.out) / f"{name}.json").read_text()), Path(args.out) / f"{name}.png")
    if not args.workdir:
        parser.error("--workdir is required (unless --plot-only)")
    grids = parse_grids(args.grid, args.kind)
    model = ["--kind", args.kind] + (["--pipeline", args.pipeline] if args.pipeline else [])
    passed = [x for flag in PASSED if getattr(args, flag) is not None
              for x in ("--" + flag.replace("_", "-"), str(getattr(args, flag)))]
    runs = []
    for lr in sorted({lr for m in args.methods for lr in grids[m]}):
        methods = [m for m in args.methods if lr in grids[m]]
        results = D.main([*model, "--split", args.split, "--subjects", str(args.subjects), "--seeds", str(args.seeds),
                          "--val-subjects", "0", "--steps", str(args.steps), "--rank", str(args.rank),
                          "--jobs", str(args.jobs), "--lr-grid", str(lr), "--methods", *methods, *passed,
                          "--workdir", str(Path(args.workdir) / f"lr{lr:g}"),
                          "--out", str(Path(args.workdir) / f"out-lr{lr:g}"), "--page", "none"])
        runs += results["runs"]
    command = "python benchmarks/dreambooth_tradeoff.py " + " ".join(sys.argv[1:] if argv is None else argv)
    data = {"command": command, "kind": args.kind, "split": args.split, "subjects": sorted({r["subject"] for r in runs}),
            "seeds": args.seeds, "steps": args.steps, "rank": args.rank, "jobs": args.jobs,
            "methods": args.methods, "grids": {m: grids[m] for m in args.methods}, "reference": family.reference,
            "minutes": sum(r["train_s"] + r["eval_s"] for r in runs) / 60 / args.jobs,
            "prior_levels": args.prior_levels, "win_level": args.win_level,
            "paired": paired(runs, family.reference, args.win_level),
            "stopped": [r for r in runs if "stopped" in r], "records": runs, "env": B.environment()}
    B.publish(name, data, markdown(data), Path(args.out), args.page if args.split == "test" else "none")
    plot(data, Path(args.out) / f"{name}.png")
    return data


if __name__ == "__main__":
    main()
