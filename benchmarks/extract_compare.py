"""Extracting an adapter from a real full fine-tune: Lie (exp, taylor) vs LoCon at an equal parameter count.

    python benchmarks/extract_compare.py    # writes results/extract.{json,md} and the section of docs/hosts.md

The full fine-tune is the quality benchmark's: a conv-only UNet2DModel pretrained on digits 0-4 and
fully fine-tuned on digits 5-9 (scikit-learn's real 8×8 scans). From (base, tuned) on the same conv
targets and at the same rank (so the same factor shapes and parameter count), it extracts:

* Lie exp / Lie taylor: `lie_diffusion.extract` (log-ratio SVD start, L-BFGS on the weight-space error);
* LoCon: the truncated SVD of W_tuned − W_base, what kohya's and LyCORIS' extract scripts do (the
  optimum for an additive low-rank update).

Reported: the relative weight-space error over the conv targets, ‖W_fit − W_tuned‖ / ‖W_tuned − W_base‖,
and the held-out denoising loss of the base model with each extracted adapter merged (parameters
outside the conv targets stay at the base: neither kind of adapter holds them).
"""

from __future__ import annotations

import argparse
import time

import torch

import benchlib as B
import quality as Q
from lie_diffusion.extract import extract_adapter, totals

KINDS = ("lie-exp", "lie-taylor", "locon")


def merged_copy(base, tuned, entries, kind, rank, targets):
    """The base model with one extracted adapter merged into its conv targets (float64 math, float32 weights)."""
    model = B.clone(base)
    with torch.no_grad():
        if kind == "locon":
            for name in targets:
                weight = model.get_submodule(name).weight
                change = (tuned.get_submodule(name).weight.double() - weight.double()).flatten(1)
                U, S, Vh = torch.linalg.svd(change, full_matrices=False)
                low = (U[:, :rank] * S[:rank]) @ Vh[:rank]
                weight.copy_((weight.double() + low.reshape(weight.shape)).float())
            return model
        for entry in entries:
            weight = model.get_submodule(entry.module).weight
            delta = (entry.B.double().flatten(1) @ entry.A.double().flatten(1)).reshape(weight.shape)
            delta = delta * (entry.alpha / entry.rank)
            weight.copy_((weight.double() * (delta.exp() if entry.mode == "exp" else 1 + delta)).float())
    return model


def run(args, log=print) -> dict:
    sched = Q.scheduler()
    data = Q.split(*Q.load_digits_16())
    evaluation = Q.fixed_eval(sched, data["test"], args.eval_draws, seed=1001)
    start = time.perf_counter()
    base = Q.build_model()
    Q.fit(base, list(base.parameters()), data["pretrain"], args.pretrain_steps, args.pretrain_lr, args.batch, seed=0,
          sched=sched)
    tuned = B.clone(base)
    Q.fit(tuned, list(tuned.parameters()), data["train"], args.steps, args.lr, args.batch, seed=0, sched=sched)
    targets = B.conv_targets(base)
    log(f"pretrained and fully fine-tuned in {time.perf_counter() - start:.0f}s; {len(targets)} conv targets")
    results = {"base_test": Q.evaluate(base, evaluation), "full_test": Q.evaluate(tuned, evaluation), "ranks": {}}
    for rank in args.ranks:
        row = {}
        for kind in KINDS:
            mode = "taylor" if kind == "lie-taylor" else "exp"
            clock = time.perf_counter()
            entries, fits, other = extract_adapter({"unet": base}, {"unet": tuned}, rank=rank, mode=mode,
                                                   steps=args.fit_steps)
            seconds = time.perf_counter() - clock
            total = totals(fits)
            assert sorted(f.module.removeprefix("unet.") for f in fits) == sorted(targets)
            params = sum(e.A.numel() + e.B.numel() for e in entries)
            if kind == "locon":
                error, svd_start, seconds = total["conv_rel_error_locon"], None, None
            else:
                error, svd_start = total["conv_rel_error_lie"], total["conv_rel_error_lie_svd_start"]
            model = merged_copy(base, tuned, entries, kind, rank, targets)
            row[kind] = {"params": params, "rel_error": error, "svd_start_rel_error": svd_start,
                         "test": Q.evaluate(model, evaluation), "masked": total["masked"] if kind != "locon" else {},
                         "fit_seconds": seconds}
            log(f"  rank {rank} {kind}: weight error {error:.4f}, test {row[kind]['test']:.5f}")
        results["ranks"][str(rank)] = row
        results["not_captured"] = other
    results["config"] = {k: v for k, v in vars(args).items() if k not in ("out", "page")}
    results["config"].update(targets=len(targets), seconds=round(time.perf_counter() - start))
    results["env"] = B.environment()
    return results


def render(results) -> str:
    c, env = results["config"], results["env"]
    rows = []
    for rank, row in results["ranks"].items():
        for kind in KINDS:
            r = row[kind]
            start = "—" if r["svd_start_rel_error"] is None else f"{r['svd_start_rel_error']:.4f}"
            rows.append([rank, kind, f"{r['params']:,}", start, f"{r['rel_error']:.4f}", f"{r['test']:.5f}"])
    best = {rank: min(KINDS, key=lambda k: row[k]["rel_error"]) for rank, row in results["ranks"].items()}
    masked = next(iter(results["ranks"].values()))["lie-exp"]["masked"]
    other = results["not_captured"]
    return "\n".join([
        "### Extracting an adapter from a full fine-tune: Lie vs LoCon",
        f"`python benchmarks/extract_compare.py` ({c['seconds']} s on {env['cpu']}, torch {env['torch']}, "
        f"{env['date']}). The quality benchmark's digits UNet, pretrained on 0-4 ({c['pretrain_steps']} steps) and "
        f"fully fine-tuned on 5-9 ({c['steps']} steps, lr {c['lr']:g}); adapters extracted on its "
        f"{c['targets']} conv layers at each rank, same factor shapes for all (equal parameter counts). "
        f"Lie: `lie_diffusion.extract` ({c['fit_steps']} L-BFGS steps per layer after the log-ratio SVD); "
        "LoCon: truncated SVD of W_tuned − W_base (kohya/LyCORIS extraction). Weight error: "
        "‖W_fit − W_tuned‖ / ‖W_tuned − W_base‖ over the conv targets. Test loss: held-out denoising loss "
        "of the base with the adapter merged.",
        "",
        B.md_table(["rank", "adapter", "params", "weight error, SVD start", "weight error", "test loss"], rows),
        "",
        f"- Reference test losses: base (digits 0-4) {results['base_test']:.5f}, full fine-tune "
        f"{results['full_test']:.5f}.",
        "- Lowest weight error per rank: " + ", ".join(f"rank {r}: {k}" for r, k in best.items()) + ".",
        f"- Entries without a logarithm (exp mode, masked from the log-ratio): "
        + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in masked.items()) + ".",
        f"- Not held by any of these adapters: {other['tensors']} other changed tensors (norms, biases, embeddings, "
        f"conv_in/out), {other['share_of_change']:.1%} of the fine-tune's Frobenius norm.",
    ])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=200, help="full fine-tuning steps (the quality benchmark's)")
    parser.add_argument("--lr", type=float, default=3e-4, help="full fine-tuning lr (the quality benchmark's best)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--pretrain-lr", type=float, default=2e-3)
    parser.add_argument("--fit-steps", type=int, default=200, help="L-BFGS steps per layer for the Lie fit")
    parser.add_argument("--eval-draws", type=int, default=4)
    parser.add_argument("--out", default=str(B.RESULTS_DIR))
    B.add_page_argument(parser, "extract")
    args = parser.parse_args(argv)
    results = run(args)
    markdown = render(results)
    B.publish("extract", results, markdown, args.out, args.page)
    return results


if __name__ == "__main__":
    main()
