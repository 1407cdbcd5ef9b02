#!/usr/bin/env python
"""What the balancing rule (`--lie_balance rms`, the default) does to every Lie layer of a UNet.

    python benchmarks/balance_report.py                # tiny SD1, tiny SDXL, the emoji UNet, SD1.5-shaped

The rule multiplies a Lie adapter's alpha by 1 / RMS(W) of its kernel, so that a factor step moves
W' = W ⊙ exp(Δ) about as far as the same step moves a LoRA's W + Δ. Per layer this script reports
the kernel's RMS, the factor, and the result of one small factor step taken from peft's init (A as
peft draws it, a random B step of 1e-3, which is what an Adam step of lr 1e-3 does to B at step 0):

- `move ratio`: RMS of the Lie layer's move W ⊙ (exp(sΔ) − 1) over the RMS of LoRA's move sΔ, both
  with the layer's rank and alpha; the rule's promise is ≈ 1 (it is 1 / RMS(W) times smaller without it);
- `max |sΔ|`: the largest exponent after the step, which must stay far from overflow on every layer shape.

Models: the tiny SD1 and SDXL test UNets and an SD1.5-shaped UNet (diffusers' random init, 860M
weights), whose kernels are smaller than a trained model's (so its factors are an upper end), and the
shipped pretrained emoji UNet (trained weights). Results: results/balance.{json,md} and docs/training.md.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from benchmarks import benchlib as B  # noqa: E402
from lie_diffusion import LieConfig  # noqa: E402
from lie_diffusion.functional import balance_factor  # noqa: E402
from lie_diffusion.inject import find_targets  # noqa: E402
from lie_diffusion.layers import unwrap_layer  # noqa: E402

MODELS = ("tiny-sd1", "tiny-sdxl", "emoji", "sd15")


def load(name: str):
    if name == "emoji":
        from lie_diffusion.emoji.pipeline import pretrained_emoji_path
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_pretrained(pretrained_emoji_path(), subfolder="unet")
    if name == "sd15":
        return B.build_unet("sd15")
    from lie_diffusion.tiny import tiny_unet

    return tiny_unet(name.removeprefix("tiny-"))


@torch.no_grad()
def layer_row(name: str, weight: torch.Tensor, rank: int, alpha: float, step: float, seed: int) -> dict:
    """The rule on one kernel, and one factor step of size `step` from peft's init, in float64."""
    generator = torch.Generator().manual_seed(seed)
    W = weight.detach().double()
    factor = balance_factor(weight, "rms")
    fan_in = W[0].numel()
    # peft's A init: kaiming_uniform(a=√5) = U(±1/√fan_in); B starts at 0 and takes one step
    A = (torch.rand(rank, fan_in, generator=generator, dtype=torch.float64) * 2 - 1) / math.sqrt(fan_in)
    dB = torch.randn(W.shape[0], rank, generator=generator, dtype=torch.float64).sign() * step
    lora_move = (alpha / rank) * (dB @ A).reshape(W.shape)
    exponent = factor * lora_move
    lie_move = W * torch.expm1(exponent)
    return {"module": name, "shape": list(W.shape), "rms": W.pow(2).mean().sqrt().item(), "factor": factor,
            "move_ratio": (lie_move.pow(2).mean().sqrt() / lora_move.pow(2).mean().sqrt()).item(),
            "unbalanced_move_ratio": (W * torch.expm1(lora_move)).pow(2).mean().sqrt().item()
            / lora_move.pow(2).mean().sqrt().item(),
            "max_exponent": exponent.abs().max().item(), "finite": bool(torch.isfinite(lie_move).all())}


def report(name: str, rank: int, step: float) -> dict:
    unet = load(name)
    convs, attns = find_targets(unet, LieConfig(attn_adapter="lie"))
    rows = [layer_row(n, unwrap_layer(unet.get_submodule(n)).weight, rank, rank, step, seed=i)
            for i, n in enumerate(convs + attns)]
    for row in rows:
        row["kind"] = "conv" if row["module"] in convs else "attention (with --attn_adapter lie)"
    return {"model": name, "parameters": sum(p.numel() for p in unet.parameters()), "layers": rows}


def summary(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows]
    return f"{min(values):.3g} / {statistics.median(values):.3g} / {max(values):.3g}"


def markdown(data: dict) -> str:
    lines = ["### What the balancing rule does per layer",
             f"`{data['command']}`: every Lie target (convs; attention projections as `--attn_adapter lie` "
             f"adapts them), rank {data['rank']}, alpha = rank, one factor step of {data['step']:g} from peft's "
             "init. Cells: min / median / max over the layers.", ""]
    rows = []
    for model in data["models"]:
        for kind in sorted({r["kind"] for r in model["layers"]}):
            mine = [r for r in model["layers"] if r["kind"] == kind]
            rows.append([model["model"], f"{model['parameters'] / 1e6:.1f}M", kind.split(" ")[0], len(mine),
                         summary(mine, "rms"), summary(mine, "factor"), summary(mine, "move_ratio"),
                         summary(mine, "unbalanced_move_ratio"), summary(mine, "max_exponent"),
                         "yes" if all(r["finite"] for r in mine) else "**no**"])
    lines.append(B.md_table(["UNet", "weights", "layers", "n", "RMS(W)", "factor 1/RMS", "move ratio (rms)",
                             "move ratio (none)", "max abs exponent", "all finite"], rows))
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--step", type=float, default=1e-3, help="size of the one B step (Adam's first step = lr)")
    parser.add_argument("--out", default=str(B.RESULTS_DIR))
    B.add_page_argument(parser, "balance")
    args = parser.parse_args(argv)
    command = "python benchmarks/balance_report.py " + " ".join(sys.argv[1:] if argv is None else argv)
    data = {"command": command.strip(), "rank": args.rank, "step": args.step,
            "models": [report(name, args.rank, args.step) for name in args.models]}
    B.publish("balance", data, markdown(data), Path(args.out), args.page)
    return data


if __name__ == "__main__":
    main()
