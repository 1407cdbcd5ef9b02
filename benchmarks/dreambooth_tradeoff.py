#!/usr/bin/env python
"""Subject fidelity at equal prior preservation: the trade-off curves behind `benchmarks/dreambooth.py`.

A learning rate moves a method along a curve: more subject likeness, more forgetting. Comparing
methods each at one chosen lr compares two points of different curves, so this script runs every
method at every lr of a grid on the test subjects (each lr is one `dreambooth.py` invocation with
`--lr-grid LR --val-subjects 0`), then reads each method's subject similarity at the same prior
similarity, interpolated linearly between its neighbouring lrs:

    python benchmarks/dreambooth_tradeoff.py --lrs 1e-3 3e-3 1e-2 3e-2 --methods lie-default lie-attn-lie lora-conv-attn

Each method runs at the lrs of its own grid in `dreambooth.LR_GRIDS` that are among `--lrs`.
Results: results/dreambooth_tradeoff.{json,md} and the README section.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from benchmarks import benchlib as B  # noqa: E402
from benchmarks import dreambooth as D  # noqa: E402


def curves(runs: list[dict]) -> dict[str, list[tuple[float, float, float]]]:
    """method -> [(lr, mean prior similarity, mean subject similarity)], by lr."""
    groups: dict[str, dict[float, list[dict]]] = {}
    for r in runs:
        groups.setdefault(r["method"], {}).setdefault(r["lr"], []).append(r)
    return {method: [(lr, statistics.mean(r["prior_similarity"] for r in mine),
                      statistics.mean(r["subject_similarity"] for r in mine)) for lr, mine in sorted(by_lr.items())]
            for method, by_lr in sorted(groups.items())}


def subject_at(points: list[tuple[float, float, float]], prior: float) -> float | None:
    """Subject similarity at this prior similarity, linear between the two lrs around it; None outside."""
    priors = [p for _, p, _ in points]
    if not min(priors) <= prior <= max(priors):
        return None
    order = np.argsort(priors)
    return float(np.interp(prior, np.array(priors)[order], np.array([s for _, _, s in points])[order]))


def markdown(results: dict) -> str:
    levels, table = results["prior_levels"], results["curves"]
    lines = ["### DreamBooth: subject fidelity at equal prior preservation",
             f"`{results['command']}`: {results['runs']} runs, {results['subjects']} subjects × seed 0, "
             f"{results['steps']} steps, the settings of the table above; about {results['minutes']:.0f} min of runs "
             f"with {results['jobs']} job(s) (finished runs in `--workdir` are reused). Each "
             "method at every lr of its grid; cells: mean over the subjects (subject similarity / prior similarity).",
             "", "| method | " + " | ".join(f"lr {lr:g}" for lr in results["lrs"]) + " |",
             "|---|" + "---|" * len(results["lrs"])]
    for method, points in table.items():
        by_lr = {lr: f"{s:.3f} / {p:.3f}" for lr, p, s in points}
        lines.append(f"| {method} | " + " | ".join(by_lr.get(lr, "—") for lr in results["lrs"]) + " |")
    lines += ["", "Subject similarity read at equal prior similarity (linear between neighbouring lrs; "
              "— where a method's lrs do not reach that level):", "",
              "| prior similarity | " + " | ".join(table) + " |", "|---|" + "---|" * len(table)]
    for level in levels:
        cells = [subject_at(points, level) for points in table.values()]
        lines.append(f"| {level:.2f} | " + " | ".join("—" if c is None else f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2])
    parser.add_argument("--methods", nargs="+", default=["lie-default", "lie-attn-lie", "lora-conv-attn"],
                        choices=[m.name for m in D.METHODS])
    parser.add_argument("--subjects", type=int, default=6)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--prior-levels", type=float, nargs="+", default=[0.60, 0.65, 0.70, 0.75])
    parser.add_argument("--workdir", required=True, help="one subfolder per lr; finished runs are reused")
    parser.add_argument("--out", default=str(B.RESULTS_DIR))
    parser.add_argument("--readme", default=str(B.README))
    args = parser.parse_args(argv)
    runs = []
    for lr in args.lrs:
        methods = [m for m in args.methods if lr in D.LR_GRIDS[m]]
        if not methods:
            continue
        folder = Path(args.workdir)
        results = D.main(["--subjects", str(args.subjects), "--seeds", "1", "--val-subjects", "0", "--steps",
                          str(args.steps), "--jobs", str(args.jobs), "--lr-grid", str(lr), "--methods", *methods,
                          "--workdir", str(folder / f"lr{lr:g}"), "--out", str(folder / f"out-lr{lr:g}"),
                          "--readme", "none"])
        runs += results["runs"]
    command = "python benchmarks/dreambooth_tradeoff.py " + " ".join(sys.argv[1:] if argv is None else argv)
    data = {"command": command, "lrs": args.lrs, "subjects": args.subjects, "steps": args.steps,
            "runs": len(runs), "jobs": args.jobs,
            "minutes": sum(r["train_s"] + r["eval_s"] for r in runs) / 60 / args.jobs,
            "prior_levels": args.prior_levels, "curves": curves(runs), "records": runs, "env": B.environment()}
    B.publish("dreambooth_tradeoff", data, markdown(data), Path(args.out), args.readme)
    return data


if __name__ == "__main__":
    main()
