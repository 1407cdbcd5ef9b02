#!/usr/bin/env python
"""Stacking subjects: do Lie adapters interfere less than LoRA when two are loaded at once?

    python benchmarks/stacking.py --jobs 2 --workdir W          # 4 subjects x 3 seeds x 3 methods, ~50 min on 2 cores
    python benchmarks/stacking.py --seeds 1 --jobs 2 --workdir W   # one seed (~20 min); again with --seeds 3 adds two

Each subject is trained on its own, with its own token ("a sks emoji", "a zwx emoji", ...), by the DreamBooth
benchmark's machinery (`benchmarks/dreambooth.py`): same script, steps, data, prior preservation and
parameter budget, and the learning rate its rule (`choose_lr`) picked on the validation subjects (the runs
kept in results/dreambooth-runs/validation; all-Lie, which has none, takes the Lie default's rate: both
balance their Lie layers the same way). Then pairs of subjects are loaded together, the way users stack
adapters in diffusers (two named adapters, `set_adapters(names, [t, t])`), at strengths t = 1.0 and 0.7:

- interference: each subject's similarity (the DreamBooth judge's cosine to held-out renders) with both
  adapters loaded, minus the same with its adapter alone at the same strength;
- the prior: similarity of "a <name> emoji on a <colour> background" samples to those pretrained emoji,
  with both loaded (and with each alone), against the base model;
- paired comparison: per (pair, seed, strength), the Lie default against LoRA on the same convs + attention,
  on interference and on the prior with both loaded.

A Lie pair on one conv is W ⊙ exp(tΔ₁ + tΔ₂): every entry rescaled, never moved across zero; a LoRA pair is
W + tΔW₁ + tΔW₂. Each (method, seed) is one task: its 4 trainings, then 8 single and 8 pair evaluations.
Finished tasks and trained adapters are kept in --workdir, so a later invocation adds seeds or methods.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # a checkout works without `pip install -e .`

from benchmarks import benchlib as B  # noqa: E402
from benchmarks import dreambooth as D  # noqa: E402
from benchmarks.emoji_metrics import generate  # noqa: E402
from lie_diffusion import load_lie_weights, training  # noqa: E402
from lie_diffusion.emoji.classifier import subject_similarity  # noqa: E402
from lie_diffusion.emoji.pipeline import pretrained_emoji_pipeline  # noqa: E402
from lie_diffusion.io import WEIGHT_NAME  # noqa: E402

METHODS = ("lie-default", "lie-attn-lie", "lora-conv-attn")
REFERENCE, PEER = "lie-default", "lora-conv-attn"
TOKENS = ("sks", "zwx", "qvo", "pkx")  # one per subject, so the two prompts of a pair differ
PAIRS = ((0, 1), (2, 3), (0, 2), (1, 3))  # 4 pairs of the first 4 test subjects
STRENGTHS = (1.0, 0.7)
VALIDATION_RUNS = D.ROOT / "benchmarks" / "results" / "dreambooth-runs" / "validation"
PEER_FILE = "peft_lora.safetensors"


def prompt(token: str) -> str:
    return f"a {token} emoji"


def chosen_lrs(methods) -> dict[str, float]:
    """The DreamBooth benchmark's choice (`choose_lr`) on its kept validation runs (seed 0); a method without
    runs there takes the reference's."""
    records = [json.loads(line) for path in sorted(VALIDATION_RUNS.glob("*/runs.jsonl"))
               for line in path.read_text().splitlines()]
    lrs = {}
    for name in (REFERENCE, *methods):
        own = [r for r in records if r["method"] == name and r["seed"] == 0]
        lrs[name] = D.choose_lr(own) if own else lrs[REFERENCE]
    return {name: lrs[name] for name in methods}


class Stacking:
    """The DreamBooth bench (base pipeline, judge, subjects, class images, budget) plus stacked evaluation."""

    def __init__(self, args, workdir: Path, log=print, prepare: bool = True):
        self.args, self.log = args, log
        self.bench = D.Bench(args, workdir, log, prepare)
        self.subjects = list(self.bench.subjects)
        self.tokens = dict(zip(self.subjects, TOKENS))

    def adapter(self, method: str, subject: str, seed: int, lr: float) -> Path | None:
        """Train once; the adapter file (a Lie file, or peft's LoRA state) is kept and reused. None: NaN stop."""
        bench, method_ = self.bench, self.bench.methods[method]
        folder = bench.run_dir(method_, bench.subjects[subject], seed, lr)
        path = folder / (WEIGHT_NAME if method_.peer is None else PEER_FILE)
        if (folder / "stopped").is_file():
            return None
        if not path.is_file():
            try:
                pipeline, _ = bench.train(method_, bench.subjects[subject], seed, lr, prompt(self.tokens[subject]))
            except training.DivergedError as error:  # bad input stops the benchmark
                (folder / "stopped").write_text(str(error))
                return None
            if method_.peer is not None:
                from peft.utils import get_peft_model_state_dict
                from safetensors.torch import save_file

                state = {k: v.contiguous() for k, v in get_peft_model_state_dict(pipeline.unet).items()}
                save_file(state, folder / f".{PEER_FILE}.tmp")
                (folder / f".{PEER_FILE}.tmp").rename(path)  # complete files only: a resumed run trusts it
        return path

    def loaded(self, method: str, adapters: dict[str, Path], strength: float):
        """The base pipeline with `adapters` (subject → file) loaded as named adapters, all at `strength`."""
        pipeline = pretrained_emoji_pipeline(self.bench.pipeline_dir)
        names = [D.slug(s) for s in adapters]
        if self.bench.methods[method].peer is None:
            for name, path in zip(names, adapters.values()):
                load_lie_weights(pipeline, path, adapter_name=name)
        else:
            from peft import LoraConfig
            from peft.utils import set_peft_model_state_dict
            from safetensors.torch import load_file

            b = self.bench.budget
            config = LoraConfig(r=b["rank"], lora_alpha=b["rank"], target_modules=b["convs"] + b["attns"])
            for name, path in zip(names, adapters.values()):
                pipeline.unet.add_adapter(config, adapter_name=name)
                set_peft_model_state_dict(pipeline.unet, load_file(path), adapter_name=name)
        pipeline.set_adapters(names, [strength] * len(names))
        pipeline.unet.eval()
        return pipeline

    def score(self, pipeline, subjects: list[str]) -> dict:
        """Per subject, its prompt's similarity and top-1; the prior prompts' similarity and accuracy."""
        judge, count = self.bench.judge, self.args.subject_images
        prior = judge.prompts()["prior"]
        prompts = [prompt(self.tokens[s]) for s in subjects for _ in range(count)] + prior
        images = generate(pipeline, prompts, seed=0, batch_size=len(prompts), steps=judge.steps,
                          guidance=judge.guidance)
        scores = {}
        for k, subject in enumerate(subjects):
            own = images[k * count:(k + 1) * count]
            reference = self.bench.subjects[subject].reference
            scores[subject] = {
                "similarity": float(subject_similarity(judge.classifier, own, reference).mean()),
                "named": float(np.mean([p == subject for p in judge.classifier.predict(own)])),
            }
        prior_images = images[len(subjects) * count:]
        scores["prior_similarity"] = float((judge.classifier.embed(prior_images) * judge.prior_references).sum(-1).mean())
        scores["prior_accuracy"] = judge.prior_accuracy(prior_images)
        return scores

    def run(self, method: str, seed: int, lr: float) -> dict:
        """One task: train the subjects, then score each alone and each pair together, at every strength."""
        start = time.perf_counter()
        adapters = {s: self.adapter(method, s, seed, lr) for s in self.subjects}
        trained = time.perf_counter()
        alone, pairs = {}, {}
        for strength in STRENGTHS:
            for subject, path in adapters.items():
                if path is not None:
                    alone[f"{subject}@{strength:g}"] = self.score(self.loaded(method, {subject: path}, strength),
                                                                  [subject])
            for i, j in PAIRS:
                first, second = self.subjects[i], self.subjects[j]
                if adapters[first] and adapters[second]:
                    pipeline = self.loaded(method, {s: adapters[s] for s in (first, second)}, strength)
                    pairs[f"{first}+{second}@{strength:g}"] = self.score(pipeline, [first, second])
        stopped = [s for s, path in adapters.items() if path is None]
        self.log(f"  {method:16s} seed {seed} lr {lr:g}: {len(pairs)} pairs scored"
                 + (f", NaN stops: {stopped}" if stopped else "")
                 + f" ({trained - start:.0f}+{time.perf_counter() - trained:.0f} s)")
        return {"method": method, "seed": seed, "lr": lr, "alone": alone, "pairs": pairs, "stopped": stopped,
                "train_s": trained - start, "eval_s": time.perf_counter() - trained}


def finished(workdir: Path, setup: str) -> dict[tuple, dict]:
    path = workdir / "stacking.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return {(r["method"], r["seed"], r["lr"]): r for r in records if D.same_setup(r.pop("setup"), setup, r["method"])}


def run(args, workdir: Path, log=print) -> dict:
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    stacking = Stacking(args, workdir, log)
    bench = stacking.bench
    lrs = {**chosen_lrs(args.methods), **dict(args.lr or [])}
    setup = D.setup_key(args, bench.methods, bench.pipeline_dir, bench.classifier_file)
    done = finished(workdir, setup)
    tasks = [(m, seed, lrs[m]) for m in args.methods for seed in range(args.seeds)]
    fresh = [t for t in tasks if t not in done]
    log(f"{len(tasks) - len(fresh)} of {len(tasks)} tasks found in {workdir / 'stacking.jsonl'}; lrs {lrs}")
    with contextlib.ExitStack() as stack:
        run_fresh = B.task_map(stack, args.jobs, args.threads, stacking, Stacking, (args, workdir))
        results = run_fresh(fresh)
        for task, record in zip(fresh, results):
            with open(workdir / "stacking.jsonl", "a") as handle:
                handle.write(json.dumps({**record, "setup": setup}) + "\n")
            done[task] = record
    base = stacking.score(pretrained_emoji_pipeline(bench.pipeline_dir), [])
    return {
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "page")},
        "subjects": stacking.subjects, "tokens": stacking.tokens, "pairs": [[stacking.subjects[i], stacking.subjects[j]]
                                                                             for i, j in PAIRS],
        "strengths": list(STRENGTHS), "lr": lrs, "base_prior_similarity": base["prior_similarity"],
        "methods": {m: bench.methods[m].about for m in args.methods},
        "budget": {k: v for k, v in bench.budget.items() if k not in ("convs", "attns")},
        "tasks": [done[t] for t in tasks], "seconds": round(time.perf_counter() - started), "env": B.environment(),
    }


# --------------------------------------------------------------------------------------------- reporting


def cases(results: dict, method: str) -> dict[tuple, dict]:
    """(pair, seed, strength) → interference (mean over the pair's two subjects), similarities and prior."""
    out = {}
    for task in results["tasks"]:
        if task["method"] != method:
            continue
        for key, scores in task["pairs"].items():
            subjects, strength = key.rsplit("@", 1)
            first, second = subjects.split("+")
            pair, alone = (first, second), [task["alone"][f"{s}@{strength}"] for s in (first, second)]
            case = {
                "together": statistics.mean(scores[s]["similarity"] for s in pair),
                "alone": statistics.mean(a[s]["similarity"] for a, s in zip(alone, pair)),
                "named_together": statistics.mean(scores[s]["named"] for s in pair),
                "named_alone": statistics.mean(a[s]["named"] for a, s in zip(alone, pair)),
                "prior_together": scores["prior_similarity"],
                "prior_alone": statistics.mean(a["prior_similarity"] for a in alone),
            }
            case["interference"] = case["together"] - case["alone"]
            out[(subjects, task["seed"], float(strength))] = case
    return out


def summarize(results: dict) -> dict:
    summary = {"methods": {}, "paired": {}}
    by_method = {m: cases(results, m) for m in results["methods"]}
    for method, found in by_method.items():
        summary["methods"][method] = {
            f"{strength:g}": {k: statistics.mean(c[k] for (_, _, t), c in found.items() if t == strength)
                              for k in ("alone", "together", "interference", "named_alone", "named_together",
                                        "prior_alone", "prior_together")}
            for strength in results["strengths"] if any(t == strength for (_, _, t) in found)}
    reference = by_method.get(REFERENCE, {})
    for other in (m for m in by_method if m != REFERENCE):
        for strength in results["strengths"]:
            shared = [k for k in reference if k in by_method[other] and k[2] == strength]
            if not shared:
                continue
            entry = {"cases": len(shared)}
            for metric in ("interference", "prior_together", "together"):
                differences = [reference[k][metric] - by_method[other][k][metric] for k in shared]
                entry[metric] = {"mean_difference": statistics.mean(differences),
                                 "wins": sum(d > 0 for d in differences)}
            summary["paired"][f"{other}@{strength:g}"] = entry
    return summary


def render(results: dict) -> str:
    summary = results["summary"]
    tasks = results["tasks"]
    minutes = sum(t["train_s"] + t["eval_s"] for t in tasks) / 60
    pairs = ", ".join(" + ".join(p) for p in results["pairs"])
    lines = [
        f"`{results['command']}`: {len(tasks)} tasks ((method, seed): 4 trainings, 8 single and 8 pair evaluations "
        f"each), seeds {sorted({t['seed'] for t in tasks})}, {results['config']['steps']} steps, rank "
        f"{results['budget']['rank']}; about {minutes:.0f} min of task time. Subjects and tokens: "
        + ", ".join(f"{s} (`{prompt(t)}`)" for s, t in results["tokens"].items())
        + f"; pairs: {pairs}. lrs (the DreamBooth benchmark's validation choice): "
        + ", ".join(f"{m} {lr:g}" for m, lr in results["lr"].items())
        + f". Base model prior similarity {results['base_prior_similarity']:.3f}.",
        "",
        "Per method and strength, means over pairs × seeds. Subject similarity of each subject's prompt with its "
        "adapter alone and with both adapters loaded, their difference (interference; closer to 0 is better), "
        "how often the judge names the subject, and the prior similarity (pretrained emoji prompts):",
        "",
    ]
    rows = []
    for method, per_strength in summary["methods"].items():
        for strength, m in per_strength.items():
            rows.append([method, strength, f"{m['alone']:.3f}", f"{m['together']:.3f}", f"{m['interference']:+.3f}",
                         f"{m['named_alone']:.0%} → {m['named_together']:.0%}",
                         f"{m['prior_alone']:.3f}", f"{m['prior_together']:.3f}"])
    lines.append(B.md_table(["method", "strength", "subject alone", "subject together", "interference",
                             "named alone → together", "prior, one loaded", "prior, both loaded"], rows))
    lines += ["", f"Paired, {REFERENCE} against each other method on the same (pair, seed, strength): mean "
              f"difference ({REFERENCE} minus the other; positive favours {REFERENCE}) and {REFERENCE}'s wins:", ""]
    rows = []
    for key, entry in summary["paired"].items():
        method, strength = key.rsplit("@", 1)
        n = entry["cases"]
        rows.append([method, strength, n] + [f"{entry[k]['mean_difference']:+.3f} ({entry[k]['wins']}/{n})"
                                            for k in ("interference", "together", "prior_together")])
    lines.append(B.md_table(["against", "strength", "cases", "interference", "subject together",
                             "prior, both loaded"], rows))
    stopped = [(t["method"], t["seed"], s) for t in tasks for s in t["stopped"]]
    if stopped:
        lines += ["", "NaN stops (their pairs are left out): " + ", ".join(f"{m} seed {seed} {s}"
                                                                          for m, seed, s in stopped)]
    return "\n".join(lines)


def method_lr(text: str) -> tuple[str, float]:
    name, sep, lr = text.partition("=")
    if not sep or name not in D.BY_NAME:
        raise argparse.ArgumentTypeError(f"{text!r}: write METHOD=LR with a method of the DreamBooth benchmark")
    return name, float(lr)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=[m.name for m in D.METHODS])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300, help="training steps (the DreamBooth trade-off's)")
    parser.add_argument("--lr", action="append", type=method_lr, metavar="METHOD=LR",
                        help="replace a method's learning rate (default: the DreamBooth benchmark's choice)")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--class-images", type=int, default=8)
    parser.add_argument("--subject-images", type=int, default=8, help="samples of each subject's prompt")
    parser.add_argument("--prior-prompts", type=int, default=12)
    parser.add_argument("--sample-steps", type=int, default=D.NUM_INFERENCE_STEPS)
    parser.add_argument("--guidance", type=float, default=D.GUIDANCE_SCALE)
    parser.add_argument("--pipeline", default=None)
    parser.add_argument("--classifier", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--workdir", required=True, help="trained adapters and finished tasks are kept and reused")
    parser.add_argument("--out", default=str(B.RESULTS_DIR))
    B.add_page_argument(parser, "stacking")
    args = parser.parse_args(argv)
    # what the DreamBooth bench reads besides these flags: the SD UNet, the first 4 test subjects, no lr sweep,
    # no variants
    args.kind, args.split, args.subjects, args.val_subjects, args.variant = "sd", "test", len(TOKENS), 0, None
    return args


def main(argv=None):
    args = parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    results = run(args, workdir)
    results["command"] = shlex.join(["python", "benchmarks/stacking.py", *(sys.argv[1:] if argv is None else argv)])
    results["summary"] = summarize(results)
    B.publish("stacking", results, render(results), Path(args.out), args.page)
    return results


if __name__ == "__main__":
    main()
