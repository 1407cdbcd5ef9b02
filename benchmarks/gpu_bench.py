"""GPU training-step benchmark at SD1.5 size: fp16 / bf16 × xformers off / on, against the same peers.

    python benchmarks/gpu_bench.py --out results           # on a CUDA machine (see benchmarks/README.md)
    python benchmarks/gpu_bench.py --device cpu --tiny     # dry run of the same code path on a CPU

Each configuration builds the SD1.5 UNet (random weights) in that dtype, trains the adapters in fp32
under autocast (diffusers' example scripts do the same), and runs speed.py's training (with the
gradient-checkpointed and keep-W' variants), batch-1 inference (W' cache on / off) and, without
xformers, torch.compile benchmarks on it: one process, interleaved rounds after a warm-up, medians,
peak memory from torch.cuda.max_memory_allocated. Results go to gpu.json and gpu.md.
"""

from __future__ import annotations

import argparse
import gc
import time
import traceback

import torch

import benchlib as B
import speed

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def enable_xformers(model) -> str | None:
    """Switch attention to xformers; the reason it could not be done, or None."""
    try:
        model.enable_xformers_memory_efficient_attention()
    except Exception as error:  # missing package, no CUDA: report it, do not abort the other configurations
        return f"{type(error).__name__}: {error}"
    return None


def run_config(args, dtype_name, xformers, log=print) -> dict:
    dtype = DTYPES[dtype_name]
    base = B.build_unet(args.size, args.device, dtype)
    if xformers:
        reason = enable_xformers(base)
        if reason:
            return {"skipped": reason}
    start = time.perf_counter()
    out = {"train": speed.bench_train(base, args.latent, args.batch, args.rank, args.reps, args.warmup,
                                      autocast_dtype=dtype, log=log)}
    out["weight_work"] = speed.bench_weight_work(base, args.batch, args.rank, args.reps, args.warmup, log=log)
    out["inference"] = speed.bench_inference(base, args.latent, args.inference_batch, args.rank, args.reps, args.warmup,
                                             autocast_dtype=dtype, log=log)
    if args.compile != "none" and not xformers:
        out["compiled"] = speed.bench_compiled(args.size, args.latent, args.batch, args.rank, args.reps, args.warmup,
                                               device=args.device, dtype=dtype, autocast_dtype=dtype,
                                               backend=args.compile, log=log)
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def render(results) -> str:
    env = results["env"]
    parts = [f"### GPU: {env.get('gpu') or env['cpu']}, torch {env['torch']}, diffusers {env['diffusers']}, "
             f"peft {env['peft']}, lycoris-lora {env['lycoris-lora']}; {env['date']}"]
    for name, r in results["configs"].items():
        parts += ["", f"#### {name}", ""]
        if "skipped" in r:
            parts.append(f"skipped: {r['skipped']}")
            continue
        c = r["train"]["config"]
        parts += [f"{c['unet_params'] / 1e6:.0f} M params, {c['latent']}×{c['latent']} latents, batch {c['batch']}, "
                  f"rank {c['rank']} on {c['targets']} convs; medians of {c['reps']} rounds.", "",
                  speed.train_table(r["train"]), "", speed.time_split(r["train"]), "",
                  *speed.findings({str(c["latent"]): r}, r["weight_work"]), "",
                  B.md_table([f"inference (batch {results['args']['inference_batch']})", "forward s", "× base"],
                             [[k, f"{v['forward_s']:.4f}", f"{v['x_base']:.3f}"] for k, v in r["inference"].items()])]
        if "compiled" in r:
            parts += ["", *speed.compiled_table(r["compiled"])]
    return "\n".join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny UNet, 16×16 latents, 2 rounds: a dry run")
    parser.add_argument("--size", default="sd15", choices=sorted(B.UNET_CONFIGS))
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--inference-batch", type=int, default=1)
    parser.add_argument("--compile", default="inductor", help="torch.compile backend for the compiled step ('none': skip)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--xformers", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--out", default=str(B.RESULTS_DIR))
    args = parser.parse_args(argv)
    if args.tiny:
        args.size, args.latent, args.reps, args.warmup = "tiny", 16, 2, 1
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    results = {"env": B.environment(args.device), "args": vars(args), "configs": {}}
    for dtype_name in args.dtypes:
        for xformers in args.xformers:
            name = f"{dtype_name}, xformers {xformers}"
            print(f"== {name}", flush=True)
            try:
                results["configs"][name] = run_config(args, dtype_name, xformers == "on")
            except Exception as error:  # one device run is all there is: keep going, keep the reason
                traceback.print_exc()
                results["configs"][name] = {"skipped": f"failed: {type(error).__name__}: {error}"}
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
            markdown = render(results)
            B.write_results("gpu", results, markdown, args.out)  # after each configuration: nothing lost on a timeout
    print(markdown)
    return results


if __name__ == "__main__":
    main()
