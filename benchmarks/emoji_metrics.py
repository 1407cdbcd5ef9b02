#!/usr/bin/env python
"""Generation metrics of the pretrained tiny emoji pipeline, judged by the emoji classifier.

    python benchmarks/emoji_metrics.py [--kind sd|flux | --pipeline DIR] [--page docs/emoji-model.md|none]

Measures a StableDiffusionPipeline or a FluxPipeline folder alike (the shipped one of `--kind`, or `--pipeline`).
For every emoji the pipeline was pretrained on, `--per_class` prompts "a <name> emoji on a <colour>
background" (colours cycle through the palette), at the default sampler, steps and guidance, fixed seeds. Reports
the classifier's top-1 over all 1,361 emoji (and top-5, and top-1 among the pretrained emoji only)
and how often the border's nearest palette colour is the requested one. Writes
benchmarks/results/emoji_metrics[_flux].json, a 16-prompt sample grid, and the bench:emoji[-flux] section of
docs/emoji-model.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # a checkout works without `pip install -e .`

from benchmarks import benchlib as B  # noqa: E402
from lie_diffusion.emoji.classifier import load_classifier  # noqa: E402
from lie_diffusion.emoji.data import PALETTE, background_color, caption  # noqa: E402
from lie_diffusion.emoji.grid import save_grid  # noqa: E402
from lie_diffusion.emoji.pipeline import (GUIDANCE_SCALE, KINDS, NUM_INFERENCE_STEPS,  # noqa: E402
                                          pretrained_emoji_path, pretrained_emoji_pipeline, sampling_kwargs,
                                          trained_classes)


def generate(pipeline, prompts: list[str], seed: int, batch_size: int, steps: int, guidance: float) -> np.ndarray:
    """uint8 (N, 32, 32, 3); image i uses seed + i, so any subset reproduces."""
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + k) for k in range(len(chunk))]
        images = pipeline(chunk, num_inference_steps=steps, generator=generators, output_type="np",
                          **sampling_kwargs(pipeline, guidance, len(chunk))).images
        out.append((images * 255).round().clip(0, 255).astype(np.uint8))
    return np.concatenate(out)


def evaluate(pipeline_dir: Path, seed: int = 0, limit: int = 0, per_class: int = 2, batch_size: int = 64,
             steps: int = NUM_INFERENCE_STEPS, guidance: float = GUIDANCE_SCALE) -> tuple[dict, np.ndarray, list]:
    pipeline = pretrained_emoji_pipeline(pipeline_dir)
    classifier = load_classifier()
    names = [name for name in trained_classes(pipeline_dir)[: limit or None] for _ in range(per_class)]
    colors = [list(PALETTE)[i % len(PALETTE)] for i in range(len(names))]
    prompts = [caption(name, color) for name, color in zip(names, colors)]
    start = time.time()
    images = generate(pipeline, prompts, seed, batch_size, steps, guidance)
    seconds = time.time() - start
    with torch.no_grad():
        logits = classifier(images)
    label = torch.tensor([classifier.names.index(n) for n in names])
    top5 = logits.topk(5, dim=-1).indices
    trained = torch.tensor([classifier.names.index(n) for n in trained_classes(pipeline_dir)])
    among_trained = trained[logits[:, trained].argmax(-1)]
    predicted = [classifier.names[i] for i in logits.argmax(-1).tolist()]
    backgrounds = [background_color(image) for image in images]
    results = {
        "pipeline": str(pipeline_dir.relative_to(ROOT) if pipeline_dir.is_relative_to(ROOT) else pipeline_dir),
        "prompts": len(prompts), "pretrained_classes": len(trained), "classifier_classes": len(classifier.names),
        "pipeline_class": type(pipeline).__name__, "steps": steps, "guidance_scale": guidance,
        "sampler": type(pipeline.scheduler).__name__, "seed": seed,
        "top1": float((logits.argmax(-1) == label).float().mean()),
        "top5": float((top5 == label[:, None]).any(-1).float().mean()),
        "top1_among_pretrained": float((among_trained == label).float().mean()),
        "background_accuracy": float(np.mean([b == c for b, c in zip(backgrounds, colors)])),
        "seconds_per_image": seconds / len(prompts),
        "classifier_clean_top1": load_classifier().info.get("clean_top1"),
    }
    rows = [{"prompt": p, "name": name, "predicted": n, "color": c, "background": b}
            for p, name, n, c, b in zip(prompts, names, predicted, colors, backgrounds)]
    return results, images, rows


def markdown(results: dict, grid_path: str) -> str:
    r = results
    flag = " --kind flux" if r["pipeline_class"] == "FluxPipeline" else ""
    return f"""Measured by `python benchmarks/emoji_metrics.py{flag}` on `{r['pipeline']}`: {r['prompts']} prompts
"a <name> emoji on a <colour> background", {r['prompts'] // r['pretrained_classes']} per pretrained emoji, colours
cycling through the 8-colour palette; {r['sampler']}, {r['steps']} steps, guidance {r['guidance_scale']}, seeds
{r['seed']}+i.

| metric | value |
|---|---|
| classifier top-1 over all {r['classifier_classes']} emoji (chance {100 / r['classifier_classes']:.2f}%) | **{100 * r['top1']:.1f}%** |
| classifier top-5 over all {r['classifier_classes']} emoji | {100 * r['top5']:.1f}% |
| classifier top-1 among the {r['pretrained_classes']} pretrained emoji | {100 * r['top1_among_pretrained']:.1f}% |
| background colour right (nearest palette colour of the 2-px border) | **{100 * r['background_accuracy']:.1f}%** |
| classifier top-1 on clean renders (its own validation) | {100 * (r['classifier_clean_top1'] or 0):.1f}% |
| generation time on this CPU | {r['seconds_per_image']:.2f} s per image (batched) |

![emoji samples]({grid_path})

Each cell: the prompt's emoji / colour, then what the classifier saw ([ok] when it is right)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=sorted(KINDS), default="sd",
                        help="Which shipped pipeline to measure when --pipeline is not given.")
    parser.add_argument("--pipeline", type=Path, default=None,
                        help="Pipeline folder, StableDiffusionPipeline or FluxPipeline (default: the shipped one).")
    parser.add_argument("--limit", type=int, default=0, help="Only the first N pretrained emoji (smoke runs).")
    parser.add_argument("--per_class", type=int, default=2, help="Prompts (colours, seeds) per pretrained emoji.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=NUM_INFERENCE_STEPS)
    parser.add_argument("--guidance_scale", type=float, default=GUIDANCE_SCALE)
    parser.add_argument("--out", type=Path, default=B.RESULTS_DIR)
    B.add_page_argument(parser, "emoji")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        pipeline_dir = (args.pipeline or pretrained_emoji_path(args.kind)).resolve()
    except FileNotFoundError as error:
        sys.exit(f"error: {error}")
    results, images, rows = evaluate(pipeline_dir, args.seed, args.limit, args.per_class, steps=args.steps,
                                     guidance=args.guidance_scale)
    suffix = "_flux" if results["pipeline_class"] == "FluxPipeline" else ""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"emoji_metrics{suffix}.json").write_text(json.dumps({"results": results, "samples": rows},
                                                                     indent=1))
    pick = np.linspace(0, len(images) - 1, 16).round().astype(int)
    labels = [f"{rows[i]['name']} / {rows[i]['color']} -> {rows[i]['predicted']}"
              f"{' [ok]' if rows[i]['predicted'] == rows[i]['name'] else ''}" for i in pick]
    grid = save_grid(args.out / f"emoji_samples{suffix}.png", [images[i] for i in pick], labels, columns=8, scale=4,
                     label_lines=4)
    print(json.dumps(results, indent=1))
    print(f"grid: {grid}")
    if args.page != "none":
        section = "emoji" + suffix.replace("_", "-")
        B.update_page(section, markdown(results, B.link(grid, args.page)), Path(args.page))


if __name__ == "__main__":
    main()
