"""What does it cost? Training step, inference and adapter-file times and peak memory, against peers.

    python benchmarks/speed.py            # mid-size UNet on CPU; writes results/speed.{json,md} and README

Training: lie-diffusion exp / taylor, peft LoRA, peft HiRA, LyCORIS LoCon and the floor (frozen UNet
with full weight gradients on the targeted convs, no optimizer), on the same conv layers at the same
rank, timed in one process with interleaved repetitions after a warm-up; medians and ratios.
Inference: base vs Lie adapters unfused vs fused. Files: load / fuse / merge an SD1.5-size adapter.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import benchlib as B

LIE = ("lie-exp", "lie-taylor")


def bench_train(base, latent, batch, rank, reps, warmup, methods=B.TRAIN_PEERS, autocast_dtype=None, log=print):
    """Step (fwd + bwd + AdamW) and fwd + bwd medians, peak step memory and trainable sizes per method."""
    device = next(base.parameters()).device
    dtype = next(base.parameters()).dtype
    targets = B.conv_targets(base)
    inputs, target = B.unet_batch(base, batch, latent, device, dtype)
    cases, memory_case, adapted = {}, {}, {}
    for method in methods:
        model = B.clone(base)
        adapted[method] = B.attach(method, model, targets, rank)
        fwd_bwd = B.train_step(model, adapted[method], inputs, target, optimizer=False, autocast_dtype=autocast_dtype)
        if adapted[method].optimize:
            cases[f"{method}|step"] = B.train_step(model, adapted[method], inputs, target, autocast_dtype=autocast_dtype)
        cases[f"{method}|fwd+bwd"] = fwd_bwd
        memory_case[method] = cases.get(f"{method}|step", fwd_bwd)
    log(f"train: {len(targets)} conv layers, rank {rank}, {len(cases)} cases, {reps} interleaved rounds")
    peaks = {}  # memory first, before timing churns the allocator; the warm-up call creates the optimizer state
    for method in methods:
        memory_case[method]()
        peaks[method] = B.peak_memory(memory_case[method], device)
    B.cpu_allocator(measuring=False)
    times = B.interleaved(cases, reps, warmup, B.synchronizer(device), log)
    results = {}
    for method in methods:
        fwd_bwd = B.median(times[f"{method}|fwd+bwd"])
        results[method] = {
            "step_s": B.median(times.get(f"{method}|step", times[f"{method}|fwd+bwd"])),
            "fwd_bwd_s": fwd_bwd,
            "has_optimizer": adapted[method].optimize,
            "peak_step_mib": peaks[method]["tensor_mib"],
            "peak_step_rss_mib": peaks[method]["rss_mib"],
            "trainable_params": B.count_params(adapted[method].params) if adapted[method].optimize else 0,
            "grad_params": B.count_params(adapted[method].params),
            "times_s": {k.split("|")[1]: v for k, v in times.items() if k.startswith(method + "|")},
        }
        log(f"  {method}: step {results[method]['step_s']:.3f}s fwd+bwd {fwd_bwd:.3f}s peak {peaks[method]} MiB")
    config = dict(unet_params=B.count_params(base.parameters()), block_out_channels=list(base.config.block_out_channels),
                  targets=len(targets), latent=latent, batch=batch,
                  rank=rank, reps=reps, warmup=warmup, dtype=str(dtype).replace("torch.", ""),
                  autocast=None if autocast_dtype is None else str(autocast_dtype).replace("torch.", ""))
    out = {"config": config, "methods": results}
    if "floor" in methods:
        out["floor_time_split"] = B.op_shares(cases["floor|fwd+bwd"], device)
    return out


def bench_inference(base, latent, batch, rank, reps, warmup, autocast_dtype=None, log=print):
    """Forward-pass medians: base, Lie / LoRA adapters unfused, and Lie fused (diffusers' fuse_lora)."""
    device = next(base.parameters()).device
    targets = B.conv_targets(base)
    inputs, _ = B.unet_batch(base, batch, latent, device, next(base.parameters()).dtype)
    variants = {"base": (None, None), "lie-exp unfused": ("lie-exp", None), "lie-taylor unfused": ("lie-taylor", None),
                "peft-lora unfused": ("peft-lora", None), "lie-exp fused": ("lie-exp", lambda model: model.fuse_lora())}
    cases = {}
    for name, (method, prepare) in variants.items():
        model = B.clone(base)
        if method is not None:
            adapted = B.attach(method, model, targets, rank)
            B.randomize_zero_factors(adapted.params)
            model.requires_grad_(False)
        if prepare is not None:
            prepare(model)
        cases[name] = B.inference_step(model, inputs, autocast_dtype)
    log(f"inference: {len(cases)} variants, {reps} interleaved rounds")
    times = B.interleaved(cases, reps, warmup, B.synchronizer(device), log)
    base_s = B.median(times["base"])
    return {name: {"forward_s": B.median(t), "x_base": B.median(t) / base_s, "times_s": t} for name, t in times.items()}


def bench_files(size, rank, reps, log=print):
    """Save / load / fuse / merge of a Lie adapter file for a `size` UNet (convs Lie, attention LoRA)."""
    from lie_diffusion import LieConfig, add_lie_adapters, load_lie_weights, merge_lie_weights, save_lie_weights
    from lie_diffusion.inject import remove_adapter

    unet = B.build_unet(size)
    add_lie_adapters(unet, LieConfig(rank=rank))
    B.randomize_zero_factors([p for p in unet.parameters() if p.requires_grad])
    times = {"save": [], "load": [], "fuse": [], "unfuse": [], "merge": []}

    def timed(name, fn):
        start = time.perf_counter()
        out = fn()
        times[name].append(time.perf_counter() - start)
        return out

    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(reps):
            path = timed("save", lambda: save_lie_weights(tmp, unet=unet))
        remove_adapter(unet, "default")
        size_mib = path.stat().st_size / 2**20
        for rep in range(reps):
            timed("load", lambda: load_lie_weights(unet, path))
            timed("fuse", unet.fuse_lora)
            timed("unfuse", unet.unfuse_lora)
            timed("merge", lambda: merge_lie_weights(unet))
            log(f"  files round {rep + 1}/{reps}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
    return {"unet": size, "rank": rank, "file_mib": size_mib, "reps": reps,
            "ops": {k: {"median_s": B.median(v), "times_s": v} for k, v in times.items()}}


def goals(train, inference) -> list[dict]:
    """The issue's goals, each with its measured value."""
    m = train["methods"]
    floor = m["floor"]["fwd_bwd_s"]
    rows = [
        ("Lie exp step ≤ 1.05 × floor", m["lie-exp"]["step_s"] / floor, "≤", 1.05),
        ("Lie exp step ≤ 0.85 × peft HiRA step", m["lie-exp"]["step_s"] / m["peft-hira"]["step_s"], "≤", 0.85),
    ]
    for method in LIE:
        peak, lora = m[method]["peak_step_mib"], m["peft-lora"]["peak_step_mib"]
        if peak is not None and lora:
            rows.append((f"{method} peak step memory ≤ 1.0 × peft LoRA", peak / lora, "≤", 1.0))
    rows.append(("Lie exp fused inference = base ± 3%", inference["lie-exp fused"]["x_base"], "±", 0.03))
    rows.append(("Lie exp unfused inference ≤ 1.10 × base", inference["lie-exp unfused"]["x_base"], "≤", 1.10))
    return [{"goal": g, "measured": v, "met": (abs(v - 1) <= lim) if op == "±" else v <= lim} for g, v, op, lim in rows]


def train_table(train) -> str:
    m = train["methods"]
    floor, lora_mem = m["floor"]["fwd_bwd_s"], m["peft-lora"]["peak_step_mib"]

    def mib(value):
        return "n/a" if value is None else f"{value:.0f}"

    rows = []
    for name, r in m.items():
        step = f"{r['step_s']:.3f}" if r["has_optimizer"] else "— (no optimizer)"
        mem_x = "n/a" if r["peak_step_mib"] is None or not lora_mem else f"{r['peak_step_mib'] / lora_mem:.2f}"
        rows.append([name, step, f"{r['step_s'] / floor:.2f}", f"{r['fwd_bwd_s']:.3f}", f"{r['fwd_bwd_s'] / floor:.2f}",
                     mib(r["peak_step_mib"]), mem_x, mib(r.get("peak_step_rss_mib")),
                     f"{r['trainable_params']:,}" if r["has_optimizer"] else f"({r['grad_params']:,} grads)"])
    return B.md_table(["method", "step s (fwd+bwd+AdamW)", "× floor", "fwd+bwd s", "× floor", "peak step MiB",
                       "× peft LoRA", "peak step RSS MiB", "trainable params"], rows)


def time_split(train) -> str:
    split = train.get("floor_time_split")
    return "" if not split else "Floor step time by op group (torch.profiler): " + ", ".join(
        f"{k} {100 * v:.0f}%" for k, v in split.items()) + "."


def findings(configs) -> list[str]:
    """What bounds the ratios, per latent size, from the measurements themselves."""
    lines = []
    for latent, cfg in configs.items():
        m, split = cfg["train"]["methods"], cfg["train"].get("floor_time_split") or {}
        floor = m["floor"]["fwd_bwd_s"]
        lines.append(
            f"{latent}×{latent}: floor / peft HiRA = {floor / m['peft-hira']['step_s']:.2f}, the lowest step ratio to "
            f"HiRA that any method needing the full weight gradient can reach here (convolutions are "
            f"{100 * split.get('convolutions', float('nan')):.0f}% of the floor step, attention "
            f"{100 * split.get('attention', float('nan')):.0f}%). Lie exp costs "
            f"{100 * (m['lie-exp']['step_s'] / floor - 1):+.0f}% over the floor: the weight-sized element-wise work of "
            "building W ⊙ exp(Δ) in forward and again in backward, which weighs more as activations shrink.")
    return lines


def render(results) -> str:
    env, configs = results["env"], results["configs"]
    c = next(iter(configs.values()))["train"]["config"]
    parts = [
        "### Speed and memory",
        f"`python benchmarks/speed.py` on {env.get('gpu') or env['cpu']} ({env['torch_threads']} threads), torch "
        f"{env['torch']}, diffusers {env['diffusers']}, peft {env['peft']}, lycoris-lora {env['lycoris-lora']}; "
        f"{env['date']}. UNet2DConditionModel {c['unet_params'] / 1e6:.1f} M params (block_out_channels "
        f"{'/'.join(map(str, c['block_out_channels']))}, cross-attention 768), batch {c['batch']}, {c['dtype']}; "
        f"every method adapts the same {c['targets']} conv layers (resnet convs, shortcuts, down/upsamplers) at rank "
        f"{c['rank']}. Medians of {c['reps']} interleaved rounds after {c['warmup']} warm-up round(s). The floor is "
        "the frozen UNet with full weight gradients on those convs and no optimizer. Peak step memory: the most "
        "tensor memory the step holds above what was live before it (torch.profiler memory events; exact); peak step "
        "RSS: the same step's resident-memory high-water mark above its start (via /proc/self/clear_refs), which also "
        "counts what glibc's allocator holds and varies by about ±20% between runs here.",
        "",
        B.md_table(["goal"] + [f"{k}×{k} latents" for k in configs],
                   [[g["goal"]] + [f"{cfg['goals'][i]['measured']:.3f} " + ("✓" if cfg["goals"][i]["met"] else "**✗**")
                                   for cfg in configs.values()]
                    for i, g in enumerate(next(iter(configs.values()))["goals"])]),
        "",
        *[f"- {line}" for line in findings(configs)],
    ]
    for latent, cfg in configs.items():
        parts += ["", f"#### {latent}×{latent} latents", "", train_table(cfg["train"]), "", time_split(cfg["train"]), "",
                  B.md_table(["inference (no grad)", "forward s", "× base"],
                             [[k, f"{v['forward_s']:.3f}", f"{v['x_base']:.3f}"] for k, v in cfg["inference"].items()])]
    files = results.get("files")
    if files:
        parts += ["", f"#### Adapter file: {files['unet']} UNet, Lie rank {files['rank']} on convs + LoRA on attention, "
                  f"{files['file_mib']:.1f} MiB (medians of {files['reps']})", "",
                  B.md_table(["operation", "seconds"], [[k, f"{v['median_s']:.3f}"] for k, v in files["ops"].items()])]
    return "\n".join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="mid", choices=sorted(B.UNET_CONFIGS))
    parser.add_argument("--latents", type=int, nargs="+", default=[64, 32], help="latent sizes, one benchmark each")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--inference-reps", type=int, default=7)
    parser.add_argument("--files-size", default="sd15", choices=sorted(B.UNET_CONFIGS) + ["none"])
    parser.add_argument("--file-reps", type=int, default=3)
    parser.add_argument("--out", default=str(B.RESULTS_DIR), help="folder for speed.json / speed.md")
    parser.add_argument("--readme", default=str(B.README), help="README to update ('none': leave it alone)")
    args = parser.parse_args(argv)

    base = B.build_unet(args.size)
    results = {"env": B.environment(), "configs": {}}
    for latent in args.latents:
        train = bench_train(base, latent, args.batch, args.rank, args.reps, args.warmup)
        inference = bench_inference(base, latent, args.batch, args.rank, args.inference_reps, args.warmup)
        results["configs"][str(latent)] = {"train": train, "inference": inference, "goals": goals(train, inference)}
    del base
    if args.files_size != "none":
        results["files"] = bench_files(args.files_size, args.rank, args.file_reps)
    markdown = render(results)
    B.write_results("speed", results, markdown, args.out)
    if args.readme != "none":
        B.update_readme("speed", markdown, args.readme)
    print(markdown)
    return results


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
