#!/usr/bin/env python
"""Capacity: does a rank-r Lie adapter learn many new concepts as well as an additive adapter of larger rank?

    python benchmarks/capacity.py --workdir capacity-runs --jobs 2          # the full grid (hours: see below)
    python benchmarks/capacity.py --workdir capacity-runs --jobs 2 --methods lie-default locon --ranks 1 4
    python benchmarks/capacity.py --workdir capacity-runs --finished-only  # tabulate and plot what has run

W ⊙ (B·A) has rank up to rank(W)·r where B·A has rank r, so a rank-1 Lie adapter can express updates no
rank-1 LoRA can. That matters when the task needs many directions: here, teaching the shipped emoji
pipeline all 24 held-out emoji (`lie_diffusion.emoji.data.HELD_OUT`) at once, each by its name, from
renders on 5 of the 8 palette colours, captioned "a <name> emoji on a <colour> background", with renders
of the 32 pretrained emoji mixed in (`--replay`, as regularisation images are).

Every run trains through `train_scripts/train_text_to_image_lie.py` on that image folder (metadata.jsonl),
text-encoder adapters on (`--train_text_encoder`), the same data, batches, steps, optimizer and constant
lr for every method. The Lie methods run the script as it is; the peers run the very same script with
only its adapter construction (`training.add_adapters`) swapped for theirs, on the very layers the Lie
default adapts (the UNet's convs and attention projections, the text encoder's attention projections):
- lie-default: Lie exp on the convs (balanced), LoRA on attention (the script's defaults);
- lie-all: Lie exp everywhere (`--attn_adapter lie`);
- locon: peft LoRA on the convs + attention (= LoCon); dora: peft LoRA with `use_dora`;
- loha, lokr: LyCORIS LoHa and LoKr; full: full fine-tune of the same layers' weights (the ceiling).
Ranks 1, 2, 4, 8, 16 (full has none); the x axis of the plots is the adapter's size (the trained tensors
as an fp32 safetensors file: the Lie file itself for the Lie methods).

Metrics, on prompts and pictures no run trained on: the shipped classifier's top-1 on the 24 new emoji
asked for by name on the 2 test colours (learning; the classifier knows every emoji), and, graded, the
similarity of its embedding of each image to the asked emoji's (top-1 stays near 0 until a drawing is
nearly right); its top-1 on the 32 pretrained emoji (forgetting); the share of the new-emoji images whose
background has the asked colour; the denoising loss on unseen renders of the new emoji on the test colours.

The learning rate of each (method, rank) is chosen from a 2-value grid (all-Lie: 3) on a validation split: the same
metrics on the third unused colour (orange) with other sampling seeds, at training seed 0; the highest
new-emoji similarity + pretrained top-1 wins (ties: lower validation loss). Test numbers never choose
anything. The chosen lr then trains seeds 1 and 2 as well; the seed-0 run of the sweep is the first test
seed. So a (method, rank) costs 2 (all-Lie 3) + (seeds - 1) runs; the full grid is 129 runs.

Cost on a 2-core CPU with `--jobs 2` (one torch thread each): a run of the default size (1,000 steps of
batch 8, then 136 samples at 25 steps and the held-out losses on both splits) takes about 5.5 minutes, two
at a time, so the full grid takes about 6 hours. Every finished run is kept in <workdir>/runs.jsonl and a
later invocation with the same `--workdir` and result flags reuses it: an interrupted command resumes, and
`--methods`, `--ranks` and `--seeds` subsets can run on different days (`--finished-only` then tabulates
whatever cells are complete). If even that does not fit, drop ranks 2 and 8 before methods, and methods
before seeds (3 seeds are the minimum). docs/capacity.md has the design's history and the results.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # a checkout works without `pip install -e .`

from benchmarks import benchlib as B  # noqa: E402
from benchmarks.dreambooth import swapped_adapter  # noqa: E402
from benchmarks.emoji_metrics import generate  # noqa: E402
from lie_diffusion import LieConfig, load_lie_weights, read_lie_file, training  # noqa: E402
from lie_diffusion.emoji.classifier import CLASSIFIER_FILE, load_classifier, reference_embedding  # noqa: E402
from lie_diffusion.emoji.data import HELD_OUT, background_color, caption, load_renders, random_example  # noqa: E402
from lie_diffusion.emoji.pipeline import (GUIDANCE_SCALE, NUM_INFERENCE_STEPS, pretrained_emoji_path,  # noqa: E402
                                          pretrained_emoji_pipeline, trained_classes)
from lie_diffusion.inject import find_targets  # noqa: E402
from lie_diffusion.io import WEIGHT_NAME  # noqa: E402

SCRIPT = ROOT / "train_scripts" / "train_text_to_image_lie.py"
TRAIN_COLOURS = ("white", "red", "green", "blue", "yellow")
VALIDATION_COLOURS = ("orange",)  # the lr choice only
TEST_COLOURS = ("black", "purple")  # the reported numbers only
RANKS = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class Method:
    name: str
    about: str
    script_flags: tuple[str, ...] = ()  # Lie methods: the training script's own adapter flags
    peer: str | None = None  # peers: the benchlib adapter that replaces the script's
    has_rank: bool = True


METHODS = (
    Method("lie-default", "Lie exp on the convs (balanced) + LoRA on attention: the script's defaults",
           ("--attn_adapter", "lora")),
    Method("lie-all", "Lie exp on the convs and on attention (`--attn_adapter lie`)", ("--attn_adapter", "lie")),
    Method("locon", "peft LoRA on the same convs + attention (LoCon)", peer="peft-lora"),
    Method("dora", "peft DoRA (`use_dora`) on the same layers", peer="peft-dora"),
    Method("loha", "LyCORIS LoHa on the same layers", peer="lycoris-loha"),
    Method("lokr", "LyCORIS LoKr on the same layers", peer="lycoris-lokr"),
    Method("full", "full fine-tune of the same layers' weights (the ceiling)", peer="full-targets", has_rank=False),
)
BY_NAME = {m.name: m for m in METHODS}
# 2 values each, where the validation runs of the pilot and the first sweep put the best lr (the balanced Lie
# default moves its kernels as far per step as LoRA does, so they share a grid; Lie on attention has no
# balancing, so its grid reaches 3x higher, and down to 1e-3 since 1e-2 diverged at rank 1; full fine-tuning
# 10x lower). See docs/capacity.md for how they were set.
LR_GRIDS = {
    "lie-default": (1e-3, 3e-3), "lie-all": (1e-3, 3e-3, 1e-2), "locon": (1e-3, 3e-3),
    "dora": (1e-3, 3e-3), "loha": (1e-3, 3e-3), "lokr": (1e-3, 3e-3), "full": (1e-4, 3e-4),
}
METRICS = {"new_top1": "new emoji named (top-1)", "new_similarity": "similarity to the new emoji",
           "old_top1": "pretrained emoji named (top-1)",
           "colour_accuracy": "background colour right", "heldout_loss": "held-out denoising loss"}


@functools.cache
def training_script():
    return training.load_script(SCRIPT)


def write_pictures(renders, concepts, directory: Path, pictures: int, replayed=(), replay: int = 0) -> None:
    """`pictures` renders of each new emoji in `concepts` and `replay` of each pretrained emoji in `replayed`
    (random size and place, the training colours in turn) with their captions, as an image folder with
    metadata.jsonl. Replayed pictures keep what the model knew in the data, as regularisation images do.

    The folder appears whole or not at all (written beside it, then renamed), and one that exists is kept: it
    was made from the same arguments (its name says which), and a run of another invocation may be reading it."""
    from PIL import Image

    if directory.is_dir():
        return
    partial = directory.with_name(f"{directory.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    lines = []
    for name, count in [(n, pictures) for n in concepts] + [(n, replay) for n in replayed]:
        index = renders.index(name)
        rng = np.random.default_rng([1, index])
        for k in range(count):
            colour = TRAIN_COLOURS[k % len(TRAIN_COLOURS)]
            file_name = f"{name.replace(' ', '-')}-{k}.png"
            Image.fromarray(random_example(renders, index, rng, colour)[0]).save(partial / file_name)
            lines.append(json.dumps({"file_name": file_name, "text": caption(name, colour)}))
    (partial / training.METADATA).write_text("\n".join(lines) + "\n")
    try:
        partial.rename(directory)
    except OSError:  # another invocation made it meanwhile
        shutil.rmtree(partial)


class Judge:
    """Scores a pipeline; it is never told which method fine-tuned it. Split "validation" or "test"."""

    def __init__(self, classifier, renders, concepts, pretrained: list[str], steps: int, guidance: float):
        self.classifier, self.steps, self.guidance = classifier, steps, guidance
        self.references = {n: reference_embedding(classifier, renders, n) for n in concepts}
        self.groups = {}
        for split, colours, seed in (("validation", VALIDATION_COLOURS, 50_000), ("test", TEST_COLOURS, 0)):
            new = [(n, c) for n in concepts for c in colours]
            old = [(n, colours[i % len(colours)]) for i, n in enumerate(pretrained)]
            self.groups[split] = (new, old, seed, self._heldout(renders, concepts, colours, seed))

    @staticmethod
    def _heldout(renders, concepts, colours, seed):
        """Unseen renders of the new emoji on `colours` (for the denoising loss) and their captions."""
        pixels, captions = [], []
        for name in concepts:
            rng = np.random.default_rng([2, seed, renders.index(name)])
            for colour in colours:
                pixels.append(random_example(renders, renders.index(name), rng, colour)[0])
                captions.append(caption(name, colour))
        pixels = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1
        return pixels, captions

    @torch.no_grad()
    def heldout_loss(self, pipeline, pixels, captions, seed) -> float:
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        latents = pipeline.vae.encode(pixels).latent_dist.mean * pipeline.vae.config.scaling_factor
        g = torch.Generator().manual_seed(seed + 1)
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=g)
        ids = pipeline.tokenizer(captions, padding="max_length", max_length=pipeline.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
        states = pipeline.text_encoder(ids)[0]
        prediction = pipeline.unet(scheduler.add_noise(latents, noise, timesteps), timesteps, states).sample
        target = training.noise_target(scheduler, latents, noise, timesteps)
        return float(torch.nn.functional.mse_loss(prediction, target))

    def score(self, pipeline, split: str) -> dict:
        new, old, seed, (pixels, captions) = self.groups[split]
        prompts = [caption(n, c) for n, c in new + old]
        images = generate(pipeline, prompts, seed=seed, batch_size=len(prompts), steps=self.steps,
                          guidance=self.guidance)
        named = self.classifier.predict(images)
        new_hits = [p == n for p, (n, _) in zip(named, new)]
        with torch.no_grad():  # graded learning: top-1 stays at 0 until a drawing is nearly right
            references = torch.stack([self.references[n] for n, _ in new])
            similarity = (self.classifier.embed(images[:len(new)]) * references).sum(1)
        return {
            "new_top1": float(np.mean(new_hits)),
            "new_similarity": float(similarity.mean()),
            "old_top1": float(np.mean([p == n for p, (n, _) in zip(named[len(new):], old)])),
            "colour_accuracy": float(np.mean([background_color(im) == c for im, (_, c) in zip(images, new)])),
            "heldout_loss": self.heldout_loss(pipeline, pixels, captions, seed),
        }


class Capacity:
    """The shared setup (data, judge); `run` trains and scores one (method, rank, seed, lr).

    `prepare` (the main process) writes the training pictures; worker processes (`--jobs`) build the same
    object over those files.
    """

    def __init__(self, args, workdir: Path, log=print, prepare: bool = True):
        self.args, self.workdir, self.log = args, workdir, log
        self.pipeline_dir = Path(args.pipeline).resolve() if args.pipeline else pretrained_emoji_path()
        self.classifier_file = Path(args.classifier) if args.classifier else CLASSIFIER_FILE
        renders = load_renders()
        concepts = HELD_OUT[:args.concepts]
        pretrained = trained_classes(self.pipeline_dir)[:args.pretrained]
        data = json.dumps([concepts, args.pictures, pretrained, args.replay]).encode()
        self.data_dir = workdir / f"data-{hashlib.sha256(data).hexdigest()[:12]}"
        if prepare:
            write_pictures(renders, concepts, self.data_dir, args.pictures, pretrained, args.replay)
        self.judge = Judge(load_classifier(self.classifier_file), renders, concepts, pretrained, args.sample_steps,
                           args.guidance)

    def script_argv(self, method: Method, rank: int, seed: int, lr: float, output_dir: Path) -> list[str]:
        a = self.args
        return [
            "--pretrained_model_name_or_path", str(self.pipeline_dir), "--train_data_dir", str(self.data_dir),
            "--caption_column", "text", "--resolution", "32", "--center_crop", "--train_text_encoder",
            "--train_batch_size", str(a.batch), "--max_train_steps", str(a.steps), "--learning_rate", f"{lr:g}",
            "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--seed", str(seed), "--rank", str(max(rank, 1)),
            "--mixed_precision", "no", "--report_to", "none", "--checkpointing_steps", str(10**9),
            "--output_dir", str(output_dir), *method.script_flags,
        ]

    def train(self, method: Method, rank: int, seed: int, lr: float):
        """Fine-tune with the script; returns a pipeline carrying the trained adapter, its trainable-parameter
        count and its file size in bytes."""
        from safetensors.torch import save_file

        script = training_script()
        output_dir = self.workdir / "runs" / f"{method.name}-r{rank}-seed{seed}-lr{lr:g}"
        args = script.parse_args(self.script_argv(method, rank, seed, lr, output_dir))
        pipeline = pretrained_emoji_pipeline(self.pipeline_dir)
        if method.peer is None:
            script.main(args)
            load_lie_weights(pipeline, output_dir)  # the saved file, loaded the way a user would
            params = sum(m.A.numel() + m.B.numel() for m in read_lie_file(output_dir).modules)
            return pipeline, params, (output_dir / WEIGHT_NAME).stat().st_size

        def attach(model):
            convs, attns = find_targets(model, LieConfig())  # the layers the Lie default adapts
            return B.attach(method.peer, model, convs + attns, rank).params

        with swapped_adapter(attach) as kept:
            script.main(args)
        pipeline.unet, pipeline.text_encoder = kept["models"]["unet"], kept["models"]["text_encoder"]
        save_file({str(k): p.detach().float().contiguous() for k, p in enumerate(kept["params"])},
                  str(output_dir / "adapter.safetensors"))
        return pipeline, B.count_params(kept["params"]), (output_dir / "adapter.safetensors").stat().st_size

    def run(self, method_name: str, rank: int, seed: int, lr: float) -> dict:
        """Train and score one case, on both splits. A NaN loss is a result too: "stopped", without metrics."""
        method = BY_NAME[method_name]
        record = {"method": method_name, "rank": rank, "seed": seed, "lr": lr}
        start = time.perf_counter()
        try:
            pipeline, params, size = self.train(method, rank, seed, lr)
        except training.DivergedError as error:  # bad input stops the benchmark
            self.log(f"  {method_name:12s} rank {rank:2d} seed {seed} lr {lr:g}: stopped: {error}")
            return {**record, "stopped": str(error), "train_s": time.perf_counter() - start, "eval_s": 0.0}
        trained = time.perf_counter()
        pipeline.unet.eval(), pipeline.text_encoder.eval()
        record.update(params=params, file_bytes=size, test=self.judge.score(pipeline, "test"),
                      validation=self.judge.score(pipeline, "validation"),
                      train_s=trained - start, eval_s=time.perf_counter() - trained)
        self.log(f"  {method_name:12s} rank {rank:2d} seed {seed} lr {lr:g}: validation "
                 + ", ".join(f"{k} {v:.3f}" for k, v in record["validation"].items())
                 + f" ({record['train_s']:.0f}+{record['eval_s']:.0f} s)")
        return record

    def score_base(self) -> dict:
        base = pretrained_emoji_pipeline(self.pipeline_dir)
        return {split: self.judge.score(base, split) for split in ("validation", "test")}


# ------------------------------------------------------------------------------------------ kept runs

RESULT_FLAGS = ("steps", "batch", "pictures", "replay", "concepts", "pretrained", "sample_steps", "guidance", "pipeline",
                "classifier")


def setup_key(args, pipeline_dir: Path, classifier_file: Path) -> str:
    """What a run's result depends on besides its task: the result flags and the model and judge files."""
    setup = {k: getattr(args, k) for k in RESULT_FLAGS}
    files = sorted(pipeline_dir.rglob("*.safetensors")) + [classifier_file]
    setup["files"] = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()
    return json.dumps(setup, sort_keys=True)


def definition(method_name: str) -> list:
    """What a method is (its script flags or its peer adapter): a run of an older definition is not reused."""
    method = BY_NAME.get(method_name)  # None: a method this version no longer has
    return method and [list(method.script_flags), method.peer]


def finished_runs(workdir: Path, setup: str) -> dict[tuple, dict]:
    """(method, rank, seed, lr) -> record, for the runs in <workdir>/runs.jsonl made with this setup and the
    methods as they are defined now."""
    path = workdir / "runs.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return {(r["method"], r["rank"], r["seed"], r["lr"]): r for r in records
            if (r.pop("setup"), r.pop("definition")) == (setup, definition(r["method"]))}


def keep(workdir: Path, setup: str, record: dict) -> dict:
    """Append a finished run to <workdir>/runs.jsonl as it comes: an interrupted benchmark keeps it."""
    with open(workdir / "runs.jsonl", "a") as handle:
        handle.write(json.dumps({**record, "setup": setup, "definition": definition(record["method"])}) + "\n")
    return record


# ------------------------------------------------------------------------------------------ the grid


def choose_lr(records: list[dict]) -> float:
    """The lr with the best validation similarity to the new emoji + pretrained-emoji top-1 (learning and
    keeping, both in [0, 1]; ties: lower validation loss); a run stopped by a NaN loss is the worst."""
    def merit(r):
        if "stopped" in r:
            return (-1.0, -float("inf"))
        v = r["validation"]
        return (v["new_similarity"] + v["old_top1"], -v["heldout_loss"])

    return max(records, key=merit)["lr"]


def run(args, workdir: Path, log=print) -> dict:
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)  # first: the script's own basicConfig(INFO) is then a no-op
    workdir.mkdir(parents=True, exist_ok=True)
    bench = Capacity(args, workdir, log)
    setup = setup_key(args, bench.pipeline_dir, bench.classifier_file)
    done = finished_runs(workdir, setup)
    if done:
        log(f"{len(done)} finished runs of this setup found in {workdir / 'runs.jsonl'}: reused, not run again")
    base = bench.score_base()
    log("base model, test: " + ", ".join(f"{k} {v:.3f}" for k, v in base["test"].items()))
    cells = [(m, r if BY_NAME[m].has_rank else 0) for m in args.methods for r in args.ranks]
    cells = list(dict.fromkeys(cells))  # full: one cell whatever the ranks
    grids = {m: args.lr_grid or LR_GRIDS[m] for m in args.methods}
    if args.finished_only:
        def finished(m, r):
            sweep = [(m, r, 0, lr) for lr in grids[m]]
            if not all(t in done for t in sweep):
                return False
            lr = choose_lr([done[t] for t in sweep])
            return all((m, r, s, lr) in done for s in range(args.seeds))

        log("not finished, left out: " + (", ".join(f"{m}@{r}" for m, r in cells if not finished(m, r)) or "none"))
        cells = [c for c in cells if finished(*c)]

    with contextlib.ExitStack() as stack:
        run_fresh = B.task_map(stack, args.jobs, args.threads, bench, Capacity, (args, workdir))

        def run_all(tasks):
            return list(B.reuse_or_run(run_fresh, done, tasks, lambda record: keep(workdir, setup, record)))

        sweep = run_all([(m, r, 0, lr) for m, r in cells for lr in grids[m]])
        chosen = {}
        for m, r in cells:
            chosen[m, r] = choose_lr([x for x in sweep if (x["method"], x["rank"]) == (m, r)])
            if chosen[m, r] in (min(grids[m]), max(grids[m])) and len(grids[m]) > 2:  # of 2, each is an edge
                log(f"note: {m} rank {r}: the chosen lr {chosen[m, r]:g} is at the edge of its grid")
        seeded = run_all([(m, r, s, chosen[m, r]) for m, r in cells for s in range(args.seeds)])
    return summarise(args, base, cells, chosen, seeded, sweep)


def _mean_std(values):
    return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0) if values else (None, None)


def summarise(args, base, cells, chosen, seeded, sweep) -> dict:
    rows = []
    for m, r in cells:
        runs = [x for x in seeded if (x["method"], x["rank"]) == (m, r) and "stopped" not in x]
        row = {"method": m, "rank": r, "lr": chosen[m, r], "seeds": len(runs),
               "stopped": sum("stopped" in x for x in seeded if (x["method"], x["rank"]) == (m, r))}
        if runs:
            row.update(params=runs[0]["params"], file_bytes=runs[0]["file_bytes"])
            for k in METRICS:
                row[k], row[f"{k}_std"] = _mean_std([x["test"][k] for x in runs])
        rows.append(row)
    cost = [x["train_s"] + x["eval_s"] for x in sweep + seeded]
    return {"config": {k: getattr(args, k) for k in (*RESULT_FLAGS, "seeds", "ranks", "methods")},
            "train_colours": TRAIN_COLOURS, "validation_colours": VALIDATION_COLOURS, "test_colours": TEST_COLOURS,
            "base": base, "rows": rows, "chosen_lr": {f"{m}@{r}": lr for (m, r), lr in chosen.items()},
            "sweep": [{"method": x["method"], "rank": x["rank"], "lr": x["lr"], **x["test"]}
                      for x in sweep if "stopped" not in x],
            "runs": len({(x["method"], x["rank"], x["seed"], x["lr"]) for x in sweep + seeded}),
            "median_run_s": statistics.median(cost) if cost else None,
            "environment": B.environment()}


def markdown(results: dict, plots: list[str]) -> str:
    c, base = results["config"], results["base"]["test"]
    lines = [
        f"Capacity: the {c['concepts']} held-out emoji taught at once ({c['pictures']} pictures each on "
        f"{', '.join(results['train_colours'])}, with {c['replay']} of each pretrained emoji), {c['steps']} steps of "
        f"batch {c['batch']}, text-encoder adapters on; "
        f"scored on {', '.join(results['test_colours'])} backgrounds; lr per method and rank chosen on "
        f"{', '.join(results['validation_colours'])} (seed 0); mean ± std over {c['seeds']} seed(s).",
        "",
        f"Base model: new emoji {base['new_top1']:.3f} (similarity {base['new_similarity']:.3f}), pretrained emoji "
        f"{base['old_top1']:.3f}, colour "
        f"{base['colour_accuracy']:.3f}, held-out loss {base['heldout_loss']:.4f}.",
        "",
    ]
    table = []
    for row in results["rows"]:
        if "params" not in row:
            table.append([row["method"], row["rank"] or "-", f"{row['lr']:g}", "-", "-", "all stopped", "", "", ""])
            continue
        table.append([row["method"], row["rank"] or "-", f"{row['lr']:g}", f"{row['params']:,}",
                      f"{row['file_bytes'] / 1024:.0f} KiB",
                      *(f"{row[k]:.3f} ± {row[k + '_std']:.3f}" for k in METRICS)])
    lines.append(B.md_table(["method", "rank", "lr", "params", "file", *METRICS.values()], table))
    lines += ["", "Each lr of each sweep at seed 0, on the test colours (shown to compare methods at equal lr; the "
              "choice above was made on the validation colour):", ""]
    lines.append(B.md_table(["method", "rank", "lr", *(METRICS[k] for k in ("new_similarity", "old_top1"))],
                            [[x["method"], x["rank"] or "-", f"{x['lr']:g}", f"{x['new_similarity']:.3f}",
                              f"{x['old_top1']:.3f}"] for x in results["sweep"]]))
    lines += ["", *(f"![{p}]({p})" for p in plots)]
    return "\n".join(lines)


def plot(results: dict, out_dir: Path) -> list[str]:
    """Learning on the new emoji against adapter size, one line per method (graded similarity and top-1); and
    learning against forgetting, with each (method, rank)'s lr sweep drawn faintly (seed 0: the points the
    chosen lr was picked from, shown on test numbers that chose nothing)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if "params" in r]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colour = {m: f"C{i}" for i, m in enumerate(methods)}
    base = results["base"]["test"]
    names = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric in zip(axes, ("new_similarity", "new_top1")):
        for method in methods:
            mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["file_bytes"])
            ax.errorbar([r["file_bytes"] / 1024 for r in mine], [r[metric] for r in mine], color=colour[method],
                        yerr=[r[f"{metric}_std"] for r in mine], marker="o", capsize=3, label=method)
        ax.axhline(base[metric], color="grey", linestyle=":", label="base model")
        ax.set(xscale="log", xlabel="adapter file size (KiB, log)", ylabel=METRICS[metric])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # labels at powers of 10 only
    fig.suptitle(f"Learning {results['config']['concepts']} new emoji at once (mean ± std over seeds)")
    names.append(_save(fig, axes[0], out_dir / "capacity_accuracy_vs_size.png"))

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method in methods:
        for r in (r for r in rows if r["method"] == method):
            sweep = sorted((x for x in results["sweep"] if (x["method"], x["rank"]) == (method, r["rank"])),
                           key=lambda x: x["lr"])
            ax.plot([x["old_top1"] for x in sweep], [x["new_similarity"] for x in sweep], color=colour[method],
                    alpha=0.3, linewidth=1, marker=".")
            ax.errorbar(r["old_top1"], r["new_similarity"], xerr=r["old_top1_std"], yerr=r["new_similarity_std"],
                        color=colour[method], marker="o", capsize=2)
            if r["rank"]:
                ax.annotate(str(r["rank"]), (r["old_top1"], r["new_similarity"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.plot([], [], color=colour[method], marker="o", label=method)
    ax.scatter([base["old_top1"]], [base["new_similarity"]], color="grey", marker="x", label="base model")
    ax.set(xlabel="pretrained emoji named (top-1): higher = less forgetting", ylabel=METRICS["new_similarity"],
           title="Learning against forgetting (labels: rank; faint: the lr sweep)")
    names.append(_save(fig, ax, out_dir / "capacity_tradeoff.png"))
    return names


def _save(fig, ax, path: Path) -> str:
    """Legend, layout, PNG; returns the file name (the markdown links it beside itself)."""
    import matplotlib.pyplot as plt

    ax.legend(fontsize=8)
    fig.tight_layout()
    B.save_figure(fig, path)
    plt.close(fig)
    return path.name


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "capacity-runs",
                        help="where the training pictures and every finished run are kept (the command resumes)")
    parser.add_argument("--methods", nargs="+", default=[m.name for m in METHODS], choices=[m.name for m in METHODS])
    parser.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    parser.add_argument("--seeds", type=int, default=3,
                        help="test seeds per (method, rank); the first is the lr sweep's")
    parser.add_argument("--lr-grid", type=float, nargs="+", help="one grid for every method (default: per method)")
    parser.add_argument("--steps", type=int, default=1000, help="training steps per run")
    parser.add_argument("--batch", type=int, default=8, help="pictures per step")
    parser.add_argument("--pictures", type=int, default=8, help="training pictures per new emoji")
    parser.add_argument("--replay", type=int, default=4,
                        help="training pictures per pretrained emoji mixed in (0: the new emoji only)")
    parser.add_argument("--concepts", type=int, default=len(HELD_OUT), choices=range(1, len(HELD_OUT) + 1),
                        metavar=f"1..{len(HELD_OUT)}",
                        help="teach the first N new emoji (all: the benchmark; fewer: tests)")
    parser.add_argument("--pretrained", type=int, default=32,
                        help="pretrained emoji asked for (forgetting); the pipeline knows 32")
    parser.add_argument("--sample-steps", type=int, default=NUM_INFERENCE_STEPS)
    parser.add_argument("--guidance", type=float, default=GUIDANCE_SCALE)
    parser.add_argument("--pipeline", type=str, default=None, help="another emoji pipeline folder (tests)")
    parser.add_argument("--classifier", type=str, default=None, help="another classifier file (tests)")
    parser.add_argument("--finished-only", action="store_true",
                        help="train nothing: tabulate and plot the (method, rank) cells whose runs are all in --workdir")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes, each running whole runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--out-dir", type=Path, default=B.RESULTS_DIR, help="where results and plots are written")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    results = run(args, args.workdir.resolve())
    args.out_dir.mkdir(parents=True, exist_ok=True)
    plots = plot(results, args.out_dir)
    B.publish("capacity", results, markdown(results, plots), out_dir=args.out_dir)
    return results


if __name__ == "__main__":
    main()
