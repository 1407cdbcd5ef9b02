"""What does it cost? Training step, inference and adapter-file times and peak memory, against peers.

    python benchmarks/speed.py              # mid-size UNet on CPU: results/speed.{json,md,png}, docs/performance.md
    python benchmarks/speed.py --plot-only  # redraw results/speed.png from results/speed.json
    python benchmarks/speed.py --dit --batch 1 --reps 5   # Flux blocks; results/speed_dit.*, docs/performance-dit.md

Training: lie-diffusion exp / taylor, peft LoRA, peft HiRA, LyCORIS LoCon and the floor (frozen UNet
with full weight gradients on the targeted convs, no optimizer), on the same conv layers at the same
rank, timed in one process with interleaved repetitions after a warm-up; medians and ratios. Variants:
`+ckpt` (diffusers' gradient checkpointing) and `+keep` (Lie: W' kept from forward for backward).
Weight-sized work: the Lie layers' extra work with the activations taken away (1×1 inputs), the part of
the step ratio that grows as latents shrink. Inference: base vs Lie adapters unfused (W' cache on / off)
vs fused. Compiled: torch.compile'd (inductor) fwd + bwd against the compiled floor, with dynamo's
graph-break count per method.
Files: load / fuse / merge an SD1.5-size adapter.
DiT (`--dit`, run alone): training steps on a FluxTransformerBlock + FluxSingleTransformerBlock at FLUX.1-dev's
width, every method on diffusers' Flux DreamBooth Linear targets (LyCORIS is left out: on Linear layers its
LoCon is plain LoRA, which peft LoRA already stands for).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import benchlib as B

LIE = ("lie-exp", "lie-taylor")
VARIANTS = ("lie-exp+keep", "lie-exp+ckpt", "peft-lora+ckpt", "floor+ckpt")
COMPILED = ("floor", "lie-exp", "peft-lora")
DIT_METHODS = ("lie-exp", "lie-exp+keep", "peft-lora", "peft-hira", "floor")


def attach_variant(variant, model, targets, rank):
    """`method[+ckpt][+keep]`: attach the method, then switch on gradient checkpointing / keep_adapted."""
    from lie_diffusion.layers import set_lie_speed_options

    method, *options = variant.split("+")
    adapted = B.attach(method, model, targets, rank)
    if "ckpt" in options:
        model.enable_gradient_checkpointing()
    if "keep" in options:
        set_lie_speed_options(model, keep_adapted=True)
    return adapted


def train_methods(base, targets, inputs, target, rank, reps, warmup, methods, autocast_dtype=None,
                  share_weights=False, log=print):
    """Peak step memory, then interleaved step times, of `methods` on `targets` of clones of `base`.
    Returns (results per method, the timed cases)."""
    device = next(base.parameters()).device
    cases, memory_case, adapted = {}, {}, {}
    for method in methods:
        model = B.clone(base, share_weights)
        adapted[method] = attach_variant(method, model, targets, rank)
        if adapted[method].optimize:  # one timed case per method: the step (the floor has no optimizer)
            cases[f"{method}|step"] = B.train_step(model, adapted[method], inputs, target, autocast_dtype=autocast_dtype)
        else:
            cases[f"{method}|fwd+bwd"] = B.train_step(model, adapted[method], inputs, target, optimizer=False,
                                                      autocast_dtype=autocast_dtype)
        memory_case[method] = cases.get(f"{method}|step") or cases[f"{method}|fwd+bwd"]
    log(f"train: {len(targets)} layers, rank {rank}, {len(cases)} cases, {reps} interleaved rounds")
    peaks = {}  # memory first, before timing churns the allocator; the warm-up call creates the optimizer state
    for method in methods:
        memory_case[method]()
        peaks[method] = B.peak_memory(memory_case[method], device)
    B.cpu_allocator(measuring=False)
    times = B.interleaved(cases, reps, warmup, B.synchronizer(device), log)
    results = {}
    for method in methods:
        step = B.median(times.get(f"{method}|step") or times[f"{method}|fwd+bwd"])
        fwd_bwd = None if adapted[method].optimize else step
        results[method] = {
            "step_s": step,
            "fwd_bwd_s": fwd_bwd,
            "has_optimizer": adapted[method].optimize,
            "peak_step_mib": peaks[method]["tensor_mib"],
            "peak_step_rss_mib": peaks[method]["rss_mib"],
            "trainable_params": B.count_params(adapted[method].params) if adapted[method].optimize else 0,
            "grad_params": B.count_params(adapted[method].params),
            "times_s": {k.split("|")[1]: v for k, v in times.items() if k.startswith(method + "|")},
        }
        log(f"  {method}: step {step:.3f}s peak {peaks[method]} MiB")
    return results, cases


def bench_train(base, latent, batch, rank, reps, warmup, methods=B.TRAIN_PEERS + VARIANTS, autocast_dtype=None,
                log=print):
    """Step (fwd + bwd + AdamW) medians, fwd + bwd for the floor, peak step memory and trainable sizes per method."""
    device = next(base.parameters()).device
    dtype = next(base.parameters()).dtype
    targets = B.conv_targets(base)
    inputs, target = B.unet_batch(base, batch, latent, device, dtype)
    results, cases = train_methods(base, targets, inputs, target, rank, reps, warmup, methods, autocast_dtype, log=log)
    config = dict(unet_params=B.count_params(base.parameters()), block_out_channels=list(base.config.block_out_channels),
                  targets=len(targets), latent=latent, batch=batch,
                  rank=rank, reps=reps, warmup=warmup, dtype=str(dtype).replace("torch.", ""),
                  autocast=None if autocast_dtype is None else str(autocast_dtype).replace("torch.", ""))
    out = {"config": config, "methods": results}
    if "floor" in methods:
        out["floor_time_split"] = B.op_shares(cases["floor|fwd+bwd"], device)
        if "lie-exp" in methods:  # where the Lie step's extra time goes: self time per aten op, Lie minus floor
            lie, floor = B.op_times(cases["lie-exp|step"], device), B.op_times(cases["floor|fwd+bwd"], device)
            extra = {op: lie.get(op, 0.0) - floor.get(op, 0.0) for op in set(lie) | set(floor)}
            out["lie_extra_by_op"] = dict(sorted(extra.items(), key=lambda kv: -kv[1])[:6])
    return out


def bench_dit(image_tokens, text_tokens, batch, rank, reps, warmup, methods=DIT_METHODS, width="dev", log=print):
    """Training steps on a Flux double block + single block at Flux-dev's width, every method on the Linear
    layers diffusers' Flux DreamBooth LoRA script targets; base weights shared by all clones (held once)."""
    model = B.build_flux_blocks(width)
    targets = B.flux_targets(model)
    inputs, target = B.flux_batch(model, batch, image_tokens, text_tokens)
    results, _ = train_methods(model, targets, inputs, target, rank, reps, warmup, methods, share_weights=True, log=log)
    config = dict(blocks=[type(b).__name__ for b in (model.double_block, model.single_block)], width=width,
                  **B.FLUX_WIDTHS[width],
                  block_params=B.count_params(model.parameters()), targets=len(targets),
                  target_weights=sum(model.get_submodule(t).weight.numel() for t in targets),
                  image_tokens=image_tokens, text_tokens=text_tokens, batch=batch, rank=rank, reps=reps, warmup=warmup,
                  dtype="float32")
    return {"config": config, "methods": results}


def bench_weight_work(base, batch, rank, reps, warmup, log=print):
    """The Lie step's extra work with the activations taken away: fwd + bwd of every targeted conv on a 1×1 input,
    as a Lie exp layer (factors trained, W' built, rebuilt, G ⊙ W' and the two factor products) and as the floor's
    conv (W trained). The difference costs the same at every latent size (W' and G are weight-sized), so its share
    of a step is what bounds the Lie step's ratio to the floor where activations are small."""
    from lie_diffusion.functional import LieFactor, lie_conv2d

    device = next(base.parameters()).device
    convs = [base.get_submodule(t) for t in B.conv_targets(base)]
    g = torch.Generator().manual_seed(0)
    work = []
    for conv in convs:
        weight = conv.weight.detach()
        down = (torch.randn(rank, *weight.shape[1:], generator=g) * 1e-2).to(device).requires_grad_()
        up = (torch.randn(weight.shape[0], rank, 1, 1, generator=g) * 1e-2).to(device).requires_grad_()
        x = torch.randn(batch, weight.shape[1], 1, 1, generator=g).to(device, weight.dtype).requires_grad_()
        work.append((conv, weight, weight.clone().requires_grad_(), x, LieFactor(down, up, 1.0, "exp")))

    def lie():
        for conv, weight, _, x, factor in work:
            lie_conv2d(x, weight, conv.bias, [factor], conv.stride, conv.padding).sum().backward()

    def floor():
        for conv, _, trained, x, _ in work:
            torch.nn.functional.conv2d(x, trained, conv.bias, conv.stride, conv.padding).sum().backward()

    B.cpu_allocator(measuring=False)
    times = B.interleaved({"lie-exp": lie, "floor": floor}, reps, warmup, B.synchronizer(device), log)
    extra = B.median(times["lie-exp"]) - B.median(times["floor"])
    log(f"weight-sized work: Lie exp {extra * 1e3:.1f} ms over the floor on {len(convs)} convs with 1x1 inputs")
    return {"convs": len(convs), "weights": sum(c.weight.numel() for c in convs), "lie_extra_s": extra,
            "times_s": times}


def bench_inference(base, latent, batch, rank, reps, warmup, autocast_dtype=None, log=print):
    """Forward-pass medians: base, Lie / LoRA adapters unfused, and Lie fused (diffusers' fuse_lora)."""
    device = next(base.parameters()).device
    targets = B.conv_targets(base)
    inputs, _ = B.unet_batch(base, batch, latent, device, next(base.parameters()).dtype)
    from lie_diffusion.layers import set_lie_speed_options

    variants = {"base": (None, None), "lie-exp unfused": ("lie-exp", None),
                "lie-exp unfused, no W' cache": ("lie-exp", lambda model: set_lie_speed_options(model, weight_cache=False)),
                "lie-taylor unfused": ("lie-taylor", None), "peft-lora unfused": ("peft-lora", None),
                "lie-exp fused": ("lie-exp", lambda model: model.fuse_lora())}
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


def bench_compiled(size, latent, batch, rank, reps, warmup, methods=COMPILED, device="cpu", dtype=torch.float32,
                   autocast_dtype=None, backend="inductor", log=print):
    """fwd + bwd of torch.compile'd UNets against the compiled floor, and the graph breaks dynamo counted while
    compiling each method (its `graph_break` counters; `torch._dynamo.explain` reports the same)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * len(methods))
    base = B.build_unet(size, device, dtype)
    targets = B.conv_targets(base)
    inputs, target = B.unet_batch(base, batch, latent, device, dtype)
    cases, breaks, compile_s = {}, {}, {}
    for method in methods:
        model = B.clone(base)
        adapted = B.attach(method, model, targets, rank)
        cases[method] = B.train_step(torch.compile(model, backend=backend), adapted, inputs, target, optimizer=False,
                                     autocast_dtype=autocast_dtype)
        counters.clear()
        start = time.perf_counter()
        cases[method]()  # compiles forward and backward
        compile_s[method] = time.perf_counter() - start
        breaks[method] = sum(counters["graph_break"].values())
        log(f"  compiled {method}: {compile_s[method]:.0f}s to compile, {breaks[method]} graph break(s)")
    times = B.interleaved(cases, reps, warmup, B.synchronizer(device), log)
    floor = B.median(times["floor"])
    config = dict(backend=backend, unet_params=B.count_params(base.parameters()), block_out_channels=list(base.config.block_out_channels),
                  targets=len(targets), latent=latent, batch=batch, rank=rank, reps=reps, warmup=warmup)
    return {"config": config, "methods": {m: {"fwd_bwd_s": B.median(times[m]), "x_floor": B.median(times[m]) / floor,
                                              "graph_breaks": breaks[m], "compile_s": compile_s[m], "times_s": times[m]}
                                          for m in methods}}


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


def _step_times(method_result) -> list[float]:
    """The per-round times of a method's one timed case (its step, or fwd+bwd for the floor)."""
    return next(iter(method_result["times_s"].values()))


def round_ratios(times, reference) -> tuple[float, float]:
    """(lowest, highest) ratio of two cases' times within one interleaved round: how far noise moves a ratio."""
    ratios = sorted(t / r for t, r in zip(times, reference))
    return ratios[0], ratios[-1]


def goals(train, inference) -> list[dict]:
    """The goals (issue 13 and before), each with its measured value (and, for time ratios, their spread over rounds)."""
    m = train["methods"]
    floor = m["floor"]["step_s"]
    rows = [
        ("Lie exp step ≤ 1.05 × floor", m["lie-exp"]["step_s"] / floor, "≤", 1.05,
         round_ratios(_step_times(m["lie-exp"]), _step_times(m["floor"]))),
        ("Lie exp step ≤ 0.85 × peft HiRA step", m["lie-exp"]["step_s"] / m["peft-hira"]["step_s"], "≤", 0.85,
         round_ratios(_step_times(m["lie-exp"]), _step_times(m["peft-hira"]))),
    ]
    for method in LIE:
        peak, lora = m[method]["peak_step_mib"], m["peft-lora"]["peak_step_mib"]
        if peak is not None and lora:
            rows.append((f"{method} peak step memory ≤ 1.0 × peft LoRA", peak / lora, "≤", 1.0, None))
    unfused, lora = inference["lie-exp unfused"]["x_base"], inference["peft-lora unfused"]["x_base"]
    base = inference["base"]["times_s"]
    rows += [("Lie exp unfused inference ≤ 1.05 × base", unfused, "≤", 1.05,
              round_ratios(inference["lie-exp unfused"]["times_s"], base)),
             ("Lie exp unfused inference ≤ peft LoRA unfused (ratio of ratios ≤ 1)", unfused / lora, "≤", 1.0,
              round_ratios(inference["lie-exp unfused"]["times_s"], inference["peft-lora unfused"]["times_s"])),
             ("Lie exp fused inference = base ± 3%", inference["lie-exp fused"]["x_base"], "±", 0.03,
              round_ratios(inference["lie-exp fused"]["times_s"], base))]
    return [{"goal": g, "measured": v, "met": (abs(v - 1) <= lim) if op == "±" else v <= lim, "rounds": spread}
            for g, v, op, lim, spread in rows]


def _goal_cell(goal) -> str:
    spread = goal.get("rounds")
    return (f"{goal['measured']:.3f} " + ("✓" if goal["met"] else "**✗**")
            + ("" if not spread else f" ({spread[0]:.2f}–{spread[1]:.2f})"))


def _mib(value) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def train_table(train) -> str:
    m = train["methods"]
    floor, lora_mem = m["floor"]["step_s"], m["peft-lora"]["peak_step_mib"]
    rows = []
    for name, r in m.items():
        mem_x = "n/a" if r["peak_step_mib"] is None or not lora_mem else f"{r['peak_step_mib'] / lora_mem:.2f}"
        rows.append([name, f"{r['step_s']:.3f}" + ("" if r["has_optimizer"] else " (fwd+bwd)"), f"{r['step_s'] / floor:.2f}",
                     _mib(r["peak_step_mib"]), mem_x, _mib(r.get("peak_step_rss_mib")),
                     f"{r['trainable_params']:,}" if r["has_optimizer"] else f"({r['grad_params']:,} grads)"])
    return B.md_table(["method", "step s (fwd+bwd+AdamW)", "× floor", "peak step MiB", "× peft LoRA",
                       "peak step RSS MiB", "trainable params"], rows)


def time_split(train) -> str:
    split, extra = train.get("floor_time_split"), train.get("lie_extra_by_op")
    lines = [] if not split else ["Floor step time by op group (torch.profiler): " + ", ".join(
        f"{k} {100 * v:.0f}%" for k, v in split.items()) + "."]
    if extra:
        lines.append("Lie exp step minus floor, self time by aten op (one profiled step each, ms): " + ", ".join(
            f"{op.removeprefix('aten::')} {1000 * t:+.0f}" for op, t in extra.items()) + ".")
    return " ".join(lines)


def findings(configs, weight_work=None) -> list[str]:
    """What bounds the ratios, per latent size, from the measurements themselves."""
    lines = []
    for latent, cfg in configs.items():
        m, split = cfg["train"]["methods"], cfg["train"].get("floor_time_split") or {}
        floor = m["floor"]["step_s"]
        line = (f"{latent}×{latent}: floor / peft HiRA = {floor / m['peft-hira']['step_s']:.2f}, the lowest step ratio to "
                f"HiRA that any method needing the full weight gradient can reach here (convolutions are "
                f"{100 * split.get('convolutions', float('nan')):.0f}% of the floor step, attention "
                f"{100 * split.get('attention', float('nan')):.0f}%). Lie exp costs "
                f"{100 * (m['lie-exp']['step_s'] / floor - 1):+.0f}% over the floor")
        if "lie-exp+keep" in m:
            line += f" ({100 * (m['lie-exp+keep']['step_s'] / floor - 1):+.0f}% with W' kept for backward)"
        line += (": weight-sized work the floor does not do: Δ = BA (mm), exp2 and ⊙ W in forward and again "
                 "in backward, G ⊙ W' and the two factor products (mm), which weighs more as activations shrink.")
        if weight_work:
            line += (f" Measured alone ({weight_work['convs']} convs on 1×1 inputs), that work costs "
                     f"{weight_work['lie_extra_s'] * 1e3:.0f} ms per step at any latent size: "
                     f"{100 * weight_work['lie_extra_s'] / floor:.0f}% of this floor step.")
        if "lie-exp+ckpt" in m and "peft-lora+ckpt" in m:
            line += (f" With gradient checkpointing: Lie exp {m['lie-exp+ckpt']['step_s'] / m['floor+ckpt']['step_s']:.2f}"
                     f" × the checkpointed floor, {m['lie-exp+ckpt']['step_s'] / m['peft-lora+ckpt']['step_s']:.2f} × "
                     "checkpointed peft LoRA.")
        inference, no_cache = cfg["inference"], "lie-exp unfused, no W' cache"
        line += (f" Inference: unfused Lie exp {inference['lie-exp unfused']['x_base']:.2f} × base with the W' cache, "
                 f"{inference[no_cache]['x_base']:.2f} × without, peft LoRA "
                 f"{inference['peft-lora unfused']['x_base']:.2f} ×, fused {inference['lie-exp fused']['x_base']:.2f} × "
                 "(fused runs exactly the base model's convolutions, so its distance from 1.00 is this run's noise).")
        lines.append(line)
    return lines


def compiled_table(compiled) -> list[str]:
    c, m = compiled["config"], compiled["methods"]
    return [f"#### torch.compile ({c['backend']}), {c['unet_params'] / 1e6:.1f} M-param UNet (block_out_channels "
            f"{'/'.join(map(str, c['block_out_channels']))}), {c['latent']}×{c['latent']} latents, batch {c['batch']}, "
            f"fwd+bwd, medians of {c['reps']} interleaved rounds", "",
            B.md_table(["method", "compiled fwd+bwd s", "× compiled floor", "graph breaks (dynamo counters)",
                        "compile s"],
                       [[k, f"{v['fwd_bwd_s']:.3f}", f"{v['x_floor']:.2f}", v["graph_breaks"], f"{v['compile_s']:.0f}"]
                        for k, v in m.items()])]


def render(results) -> str:
    env, configs = results["env"], results["configs"]
    c = next(iter(configs.values()))["train"]["config"]
    inference_batch = results.get("inference_batch", c["batch"])
    parts = [
        "### Speed and memory",
        f"`python benchmarks/speed.py` on {env.get('gpu') or env['cpu']} ({env['torch_threads']} thread(s)), torch "
        f"{env['torch']}, diffusers {env['diffusers']}, peft {env['peft']}, lycoris-lora {env['lycoris-lora']}; "
        f"{env['date']}. UNet2DConditionModel {c['unet_params'] / 1e6:.1f} M params (block_out_channels "
        f"{'/'.join(map(str, c['block_out_channels']))}, cross-attention 768), training batch {c['batch']}, inference "
        f"batch {inference_batch}, {c['dtype']}; every method adapts the same {c['targets']} conv layers (resnet convs, "
        f"shortcuts, down/upsamplers) at rank {c['rank']}. Medians of interleaved rounds ("
        + ", ".join(f"{k}×{k}: {cfg['train']['config']['reps']}" for k, cfg in configs.items())
        + f"; smaller latents get more) after {c['warmup']} warm-up round(s). On a shared machine single timings "
        "vary by tens of percent between rounds, ratios from one interleaved run much less. The floor is the frozen "
        "UNet with full weight gradients on those convs and no optimizer. `+ckpt`: `unet.enable_gradient_checkpointing()`; "
        "`+keep`: `set_lie_speed_options(unet, keep_adapted=True)`. Peak step memory: the most tensor memory the step "
        "holds above what was live before it (torch.profiler memory events; exact); peak step RSS: the same step's "
        "resident-memory high-water mark above its start (via /proc/self/clear_refs), which also counts what glibc's "
        "allocator holds and varies by about ±20% between runs here. Unfused Lie inference reuses W' between calls "
        "(the default; the `no W' cache` row rebuilds it every call).",
        "",
        "Goals: the ratio of medians, ✓ when met, and in brackets the lowest and highest ratio within one round.",
        "",
        B.md_table(["goal"] + [f"{k}×{k} latents" for k in configs],
                   [[g["goal"]] + [_goal_cell(cfg["goals"][i]) for cfg in configs.values()]
                    for i, g in enumerate(next(iter(configs.values()))["goals"])]),
        "",
        *[f"- {line}" for line in findings(configs, results.get("weight_work"))],
    ]
    for latent, cfg in configs.items():
        parts += ["", f"#### {latent}×{latent} latents", "", train_table(cfg["train"]), "", time_split(cfg["train"]), "",
                  B.md_table([f"inference (no grad, batch {inference_batch})", "forward s", "× base"],
                             [[k, f"{v['forward_s']:.4f}", f"{v['x_base']:.3f}"] for k, v in cfg["inference"].items()])]
    if results.get("compiled"):
        parts += ["", *compiled_table(results["compiled"])]
    files = results.get("files")
    if files:
        parts += ["", f"#### Adapter file: {files['unet']} UNet, Lie rank {files['rank']} on convs + LoRA on attention, "
                  f"{files['file_mib']:.1f} MiB (medians of {files['reps']})", "",
                  B.md_table(["operation", "seconds"], [[k, f"{v['median_s']:.3f}"] for k, v in files["ops"].items()])]
    return "\n".join(parts)


TRAIN_CURVES = ("lie-exp", "lie-taylor", "lie-exp+keep", "peft-lora", "peft-hira", "lycoris-locon")
INFERENCE_CURVES = ("lie-exp unfused", "lie-exp unfused, no W' cache", "peft-lora unfused", "lie-exp fused")


def plot(results: dict, path: Path) -> Path:
    """Speed by latent size: the training step against the floor and inference against the base model, per
    method (the ratios the goals are stated in; 1.0 is the floor / the base)."""
    from matplotlib.figure import Figure

    latents = sorted(results["configs"], key=int)
    fig = Figure(figsize=(10, 4))
    train_ax, infer_ax = fig.subplots(1, 2)
    for method in TRAIN_CURVES:
        rows = [results["configs"][n]["train"]["methods"] for n in latents]
        if all(method in r for r in rows):
            train_ax.plot([int(n) for n in latents], [r[method]["step_s"] / r["floor"]["step_s"] for r in rows],
                          marker="o", label=method)
    for name in INFERENCE_CURVES:
        rows = [results["configs"][n]["inference"] for n in latents]
        if all(name in r for r in rows):
            infer_ax.plot([int(n) for n in latents], [r[name]["x_base"] for r in rows], marker="o", label=name)
    env = results["env"]
    for ax, title, ylabel in ((train_ax, "training step (fwd+bwd+AdamW)", "× floor (frozen UNet, full conv grads)"),
                              (infer_ax, "inference (no grad, batch 1)", "× base model")):
        ax.axhline(1.0, color="grey", linewidth=1, linestyle="--")
        ax.set_xscale("log", base=2)
        ax.set_xticks([int(n) for n in latents], [f"{n}×{n}" for n in latents])
        ax.set_xlabel("latent size")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"speed.py on {env['cpu']} ({env['torch_threads']} threads), {env['date']}: lower is faster",
                 fontsize=10)
    return B.save_figure(fig, path)


def render_dit(results) -> str:
    env, c, m = results["env"], results["dit"]["config"], results["dit"]["methods"]
    floor, lora = m["floor"], m["peft-lora"]
    def spread(r, reference):
        low, high = round_ratios(_step_times(r), _step_times(reference))
        return f"{r['step_s'] / reference['step_s']:.2f} ({low:.2f}–{high:.2f})"

    rows = [[name, f"{r['step_s']:.2f}" + ("" if r["has_optimizer"] else " (fwd+bwd)"), spread(r, lora), spread(r, floor),
             _mib(r["peak_step_mib"]),
             f"{r['peak_step_mib'] / lora['peak_step_mib']:.2f}", _mib(r["peak_step_rss_mib"]),
             f"{r['trainable_params']:,}" if r["has_optimizer"] else f"({r['grad_params']:,} grads)"]
            for name, r in m.items()]
    return "\n".join([
        "### Training on Flux-shaped blocks",
        f"`{results['command']}` on {env.get('gpu') or env['cpu']} ({env['torch_threads']} thread(s)), torch {env['torch']}, "
        f"diffusers {env['diffusers']}, peft {env['peft']}; {env['date']}. One {c['blocks'][0]} and one {c['blocks'][1]} "
        f"from diffusers at {'FLUX.1-dev' if c['width'] == 'dev' else c['width']}'s width (dim {c['dim']}, {c['num_attention_heads']} heads of {c['attention_head_dim']}), "
        f"random weights, {c['block_params'] / 1e6:.0f} M params, {c['dtype']}; batch {c['batch']}, {c['image_tokens']} image + "
        f"{c['text_tokens']} text tokens. Every method adapts the same {c['targets']} Linear layers (diffusers' Flux "
        f"DreamBooth LoRA targets: attention projections incl. the context ones, and the feed-forward layers; "
        f"{c['target_weights'] / 1e6:.0f} M weights) at rank {c['rank']}. Step: forward, backward and AdamW (the floor: "
        f"frozen blocks with full weight gradients on those layers, forward and backward, no optimizer). Medians of "
        f"{c['reps']} interleaved rounds after {c['warmup']} warm-up round(s), and in brackets the lowest and highest "
        f"ratio within one round; peak step memory and RSS as in the UNet "
        "table (tensor bytes the step holds above what was live before it; the frozen base weights are not counted). "
        "`+keep`: `set_lie_speed_options(model, keep_adapted=True)`.",
        "",
        B.md_table(["method", "step s", "× peft LoRA", "× floor", "peak step MiB", "× peft LoRA", "peak step RSS MiB",
                    "trainable params"], rows),
    ])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="mid", choices=sorted(B.UNET_CONFIGS))
    parser.add_argument("--latents", type=int, nargs="+", default=[16, 32, 64], help="latent sizes, one benchmark each")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--inference-batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5,
                        help="timed rounds at the largest latent size; × (largest / latent) at the others")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--inference-reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--compile-size", default="tiny", choices=sorted(B.UNET_CONFIGS) + ["none"],
                        help="UNet for the torch.compile benchmark (inductor compiles a mid-size UNet for many minutes)")
    parser.add_argument("--compile-latent", type=int, default=16)
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend ('aot_eager': no codegen)")
    parser.add_argument("--files-size", default="sd15", choices=sorted(B.UNET_CONFIGS) + ["none"])
    parser.add_argument("--file-reps", type=int, default=3)
    parser.add_argument("--dit", action="store_true",
                        help="instead: training on a Flux double + single block at FLUX.1-dev's width "
                             "(results/speed_dit.* and docs/performance-dit.md)")
    parser.add_argument("--dit-width", default="dev", choices=sorted(B.FLUX_WIDTHS))
    parser.add_argument("--dit-image-tokens", type=int, default=64, help="a square number (Flux packs 2x2 latent patches)")
    parser.add_argument("--dit-text-tokens", type=int, default=32)
    parser.add_argument("--dit-docs", default=str(B.PAGES["speed_dit"]),
                        help="docs page whose speed_dit section gets the table ('none': leave it alone)")
    parser.add_argument("--out", default=str(B.RESULTS_DIR), help="folder for speed.json / speed.md")
    B.add_page_argument(parser, "speed")
    parser.add_argument("--plot-only", action="store_true",
                        help="redraw speed.png from --out's speed.json; run nothing")
    args = parser.parse_args(argv)
    if args.plot_only:
        return plot(json.loads((Path(args.out) / "speed.json").read_text()), Path(args.out) / "speed.png")

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dit:
        return run_dit(args, argv)
    base = B.build_unet(args.size)
    results = {"env": B.environment(), "inference_batch": args.inference_batch, "configs": {},
               "weight_work": bench_weight_work(base, args.batch, args.rank, args.reps, args.warmup)}
    for latent in args.latents:
        more = max(1, max(args.latents) // latent)  # smaller latents: cheaper steps, noisier timings, more rounds
        train = bench_train(base, latent, args.batch, args.rank, args.reps * more, args.warmup)
        inference = bench_inference(base, latent, args.inference_batch, args.rank, args.inference_reps * more,
                                    args.warmup)
        results["configs"][str(latent)] = {"train": train, "inference": inference, "goals": goals(train, inference)}
        B.write_results("speed", results, render(results), args.out)  # after each size: nothing lost if stopped
    del base
    if args.compile_size != "none":
        results["compiled"] = bench_compiled(args.compile_size, args.compile_latent, args.batch, args.rank, args.reps,
                                             args.warmup, backend=args.compile_backend)
    if args.files_size != "none":
        results["files"] = bench_files(args.files_size, args.rank, args.file_reps)
    markdown = render(results)
    B.publish("speed", results, markdown, args.out, args.page)
    plot(results, Path(args.out) / "speed.png")
    return results


def run_dit(args, argv):
    """The Flux-block training benchmark alone; writes results/speed_dit.{json,md} and the docs page's section."""
    import shlex
    import sys

    dit = bench_dit(args.dit_image_tokens, args.dit_text_tokens, args.batch, args.rank, args.reps, args.warmup,
                    width=args.dit_width)
    command = shlex.join(["python", "benchmarks/speed.py", *(sys.argv[1:] if argv is None else argv)])
    results = {"env": B.environment(), "command": command, "dit": dit}
    B.publish("speed_dit", results, render_dit(results), args.out, args.dit_docs)
    return results


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
