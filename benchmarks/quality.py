"""Does it learn better? Held-out denoising loss at an equal trainable-parameter budget.

    python benchmarks/quality.py    # writes results/quality.{json,md}, results/quality_samples.png, docs/benchmarks.md

Data: scikit-learn's handwritten digits, 1,797 real 8×8 scans (UCI) that ship inside the package, so
the benchmark runs offline with a dependency the `bench` extra already has; class labels give a clean
domain shift. Images are upsampled to 16×16 and scaled to [-1, 1].

Protocol: a small conv-only diffusers UNet2DModel is pretrained on digits 0-4, then fine-tuned on
digits 5-9 with LoRA (peft, conv), HiRA (peft), Lie exp and Lie taylor on the same conv layers at the
same rank (identical trainable-parameter counts), and full fine-tuning as a reference. Same steps and
batches for all; each method's learning rate is picked from a small sweep on a validation split
(seed 0), then it is retrained with more seeds. Reported: denoising loss on held-out test digits, with
noise and timesteps fixed once for every method.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import benchlib as B

METHODS = ("peft-lora", "peft-hira", "lie-exp", "lie-taylor", "full")
# Per-method grids (3 values each). Lie and HiRA updates are W ⊙ Δ, so the same factor step moves
# the kernel by |W| times less than LoRA's BA does: their grids sit higher. A best value at a grid
# edge is flagged in the report.
LR_GRIDS = {
    "peft-lora": (1e-3, 3e-3, 1e-2),
    "peft-hira": (3e-3, 1e-2, 3e-2),
    "lie-exp": (3e-3, 1e-2, 3e-2),
    "lie-taylor": (3e-3, 1e-2, 3e-2),
    "full": (1e-4, 3e-4, 1e-3),
}
MODEL = dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32, 64), layers_per_block=1,
             down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3, norm_num_groups=8,
             add_attention=False)


def load_digits_16():
    """(images in [-1, 1] of shape (N, 1, 16, 16), labels)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=16, mode="bilinear", align_corners=False)
    return images * 2 - 1, torch.tensor(digits.target)


def split(images, labels, seed=0):
    """Pretraining set (digits 0-4) and fine-tuning train / val / test (digits 5-9, 60/20/20 per class)."""
    g = torch.Generator().manual_seed(seed)
    parts = {"pretrain": [], "train": [], "val": [], "test": []}
    for digit in range(10):
        index = torch.nonzero(labels == digit).squeeze(1)
        if digit < 5:
            parts["pretrain"].append(index)
            continue
        index = index[torch.randperm(len(index), generator=g)]
        n_train, n_val = int(0.6 * len(index)), int(0.2 * len(index))
        parts["train"].append(index[:n_train])
        parts["val"].append(index[n_train:n_train + n_val])
        parts["test"].append(index[n_train + n_val:])
    return {k: images[torch.cat(v)] for k, v in parts.items()}


def build_model(seed=0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(**MODEL)


def scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000)


def noised(sched, images, generator):
    """(noisy images, timesteps, noise) for one pass of the denoising objective."""
    noise = torch.randn(images.shape, generator=generator)
    t = torch.randint(0, sched.config.num_train_timesteps, (len(images),), generator=generator)
    return sched.add_noise(images, noise, t), t, noise


def fit(model, params, images, steps, lr, batch, seed, sched):
    """AdamW on `params` with the epsilon-prediction loss; minibatches and noise drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    for _ in range(steps):
        x = images[torch.randint(0, len(images), (batch,), generator=g)]
        noisy, t, noise = noised(sched, x, g)
        F.mse_loss(model(noisy, t).sample, noise).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


def fixed_eval(sched, images, draws, seed):
    """`draws` (noise, timestep) pairs per image, fixed once so every method sees the same ones."""
    g = torch.Generator().manual_seed(seed)
    return noised(sched, images.repeat(draws, 1, 1, 1), g)


@torch.no_grad()
def evaluate(model, evaluation, chunk=512) -> float:
    noisy, t, noise = evaluation
    total = sum(F.mse_loss(model(noisy[i:i + chunk], t[i:i + chunk]).sample, noise[i:i + chunk], reduction="sum")
                for i in range(0, len(noisy), chunk))
    return float(total) / noise.numel()


@torch.no_grad()
def sample(model, n, steps, seed):
    """`n` images by DDIM from fixed noise (same noise for every method)."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler(num_train_timesteps=1000)
    ddim.set_timesteps(steps)
    x = torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
    for t in ddim.timesteps:
        x = ddim.step(model(x, t).sample, t, x).prev_sample
    return x.clamp(-1, 1)


def save_grid(rows: dict[str, torch.Tensor], path, scale=2):
    """One labelled row of samples per model, as a PNG."""
    from PIL import Image, ImageDraw

    label_w, cell = 90, 16 * scale
    n = max(len(v) for v in rows.values())
    grid = Image.new("L", (label_w + n * cell, len(rows) * cell), 0)
    draw = ImageDraw.Draw(grid)
    for r, (name, images) in enumerate(rows.items()):
        draw.text((4, r * cell + cell // 2 - 5), name, fill=255)
        for c, image in enumerate(images):
            pixels = ((image[0] + 1) * 127.5).round().to(torch.uint8).numpy()
            tile = Image.fromarray(pixels, mode="L").resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (label_w + c * cell, r * cell))
    grid.save(path)


def run(args, log=print) -> dict:
    sched = scheduler()
    data = split(*load_digits_16())
    evals = {k: fixed_eval(sched, data[k], args.eval_draws, seed=1000 + i) for i, k in enumerate(("val", "test"))}
    start = time.perf_counter()
    pretrained = build_model()
    fit(pretrained, list(pretrained.parameters()), data["pretrain"], args.pretrain_steps, args.pretrain_lr,
        args.batch, seed=0, sched=sched)
    targets = B.conv_targets(pretrained)
    log(f"pretrained on digits 0-4 in {time.perf_counter() - start:.0f}s; {len(targets)} conv targets")

    def finetune(method, lr, seed):
        model = B.clone(pretrained)
        torch.manual_seed(seed)
        adapted = B.attach(method, model, targets, args.rank)
        fit(model, adapted.params, data["train"], args.steps, lr, args.batch, seed, sched)
        out = {"val": evaluate(model, evals["val"]), "test": evaluate(model, evals["test"])}
        log(f"  {method} lr={lr:g} seed={seed}: val {out['val']:.5f} test {out['test']:.5f}")
        return model, out, B.count_params(adapted.params)

    results = {"pretrained": {"val": evaluate(pretrained, evals["val"]), "test": evaluate(pretrained, evals["test"])},
               "methods": {}}
    samples = {"pretrained": sample(pretrained, args.samples, args.sample_steps, seed=7)}
    for method in args.methods:
        grid = args.lr_grid or LR_GRIDS[method]
        sweep = {lr: finetune(method, lr, seed=0) for lr in grid}
        best_lr = min(grid, key=lambda lr: sweep[lr][1]["val"])
        best_model, _, params = sweep[best_lr]
        runs = [sweep[best_lr][1]] + [finetune(method, best_lr, seed)[1] for seed in range(1, args.seeds)]
        tests = [r["test"] for r in runs]
        results["methods"][method] = {
            "trainable_params": params,
            "lr_sweep_val": {f"{lr:g}": sweep[lr][1]["val"] for lr in grid},
            "best_lr": best_lr,
            "best_lr_at_grid_edge": best_lr in (grid[0], grid[-1]),
            "test_per_seed": tests,
            "val_per_seed": [r["val"] for r in runs],
            "test_mean": statistics.mean(tests),
            "test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
        }
        samples[method] = sample(best_model, args.samples, args.sample_steps, seed=7)
        del sweep
    results["config"] = {k: v for k, v in vars(args).items() if k not in ("out", "page")}
    results["config"].update(model=MODEL, targets=len(targets), sizes={k: len(v) for k, v in data.items()},
                             seconds=round(time.perf_counter() - start))
    results["env"] = B.environment()
    return results, samples


def summary(results) -> list[str]:
    """Plain statements of what the table shows: ranking, and Lie against each peer with spreads."""
    m = results["methods"]
    ranked = sorted(m, key=lambda k: m[k]["test_mean"])
    lines = ["Ranking by mean test loss (lower is better): " + " < ".join(ranked) + "."]
    for lie in (k for k in ("lie-exp", "lie-taylor") if k in m):
        for peer in (k for k in ("peft-lora", "peft-hira") if k in m):
            a, b = m[lie], m[peer]
            diff, spread = a["test_mean"] - b["test_mean"], a["test_std"] + b["test_std"]
            verdict = "lower (better)" if diff < 0 else "higher (worse)"
            within = " — within the seed spread, so not a clear difference" if abs(diff) <= spread else ""
            lines.append(f"{lie} vs {peer}: test loss {verdict} by {abs(diff):.5f} ({100 * diff / b['test_mean']:+.1f}%; "
                         f"sum of stds {spread:.5f}){within}.")
    if "lie-taylor" in m and "peft-hira" in m:
        lines.append("lie-taylor and peft-hira compute the same function (W + W ⊙ BA; alpha = rank), so equal losses are "
                     "expected: they differ in cost (see the speed tables, docs/performance.md), not in what they "
                     "learn.")
    edges = [k for k in m if m[k]["best_lr_at_grid_edge"]]
    if edges:
        lines.append(f"Best learning rate at the edge of its grid for: {', '.join(edges)} (a wider sweep might change these).")
    return lines


def render(results) -> str:
    c, env, m = results["config"], results["env"], results["methods"]
    rows = [["pretrained on 0-4, no fine-tuning", "0", "—", "—", f"{results['pretrained']['test']:.5f}"]]
    for name, r in m.items():
        sweep = ", ".join(f"{lr}: {v:.4f}" for lr, v in r["lr_sweep_val"].items())
        rows.append([name, f"{r['trainable_params']:,}", f"{r['best_lr']:g}", sweep,
                     f"{r['test_mean']:.5f} ± {r['test_std']:.5f}"])
    return "\n".join([
        "### Quality at an equal parameter budget",
        f"`python benchmarks/quality.py` ({c['seconds']} s on {env['cpu']}, torch {env['torch']}, {env['date']}). "
        f"scikit-learn's handwritten digits (real 8×8 scans shipped with the package, upsampled to 16×16): a conv-only "
        f"UNet2DModel pretrained on digits 0-4 ({c['pretrain_steps']} steps), fine-tuned on 5-9 "
        f"({c['sizes']['train']} train / {c['sizes']['val']} val / {c['sizes']['test']} test images) for "
        f"{c['steps']} steps, batch {c['batch']}, AdamW, on the same {c['targets']} conv layers at rank {c['rank']} "
        f"(full fine-tuning trains every parameter). Learning rate picked per method on the validation split (seed 0); "
        f"test loss over {c['seeds']} seeds, mean ± std; the noise and timesteps of evaluation ({c['eval_draws']} per "
        "image) are fixed and shared by all methods. Samples: `benchmarks/results/quality_samples.png`.",
        "",
        B.md_table(["method", "trainable params", "best lr", "val loss per lr (seed 0)", "test loss"], rows),
        "",
        *[f"- {line}" for line in summary(results)],
    ])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--pretrain-lr", type=float, default=2e-3)
    parser.add_argument("--lr-grid", type=float, nargs="+", help="one grid for every method (default: per method)")
    parser.add_argument("--eval-draws", type=int, default=4)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--out", default=str(B.RESULTS_DIR))
    B.add_page_argument(parser, "quality")
    args = parser.parse_args(argv)

    results, samples = run(args)
    markdown = render(results)
    B.publish("quality", results, markdown, args.out, args.page)
    save_grid(samples, f"{args.out}/quality_samples.png")
    return results


if __name__ == "__main__":
    main()
