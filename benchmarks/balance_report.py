#!/usr/bin/env python
"""What the balancing rule (`--lie_balance rms`, the default) does to every Lie layer of a UNet or a DiT.

    python benchmarks/balance_report.py                # tiny SD1, tiny SDXL, the emoji UNet, SD1.5-shaped
    python benchmarks/balance_report.py --models flux-dev sd35-large sd35-medium --name balance_dit --readme none

The rule multiplies a Lie adapter's alpha by 1 / RMS(W) of its kernel, so that a factor step moves
W' = W ⊙ exp(Δ) about as far as the same step moves a LoRA's W + Δ. Per layer this script reports
the kernel's RMS, the factor, and the result of one small factor step taken from peft's init (A as
peft draws it, a random B step of 1e-3, which is what an Adam step of lr 1e-3 does to B at step 0):

- `move ratio`: RMS of the Lie layer's move W ⊙ (exp(sΔ) − 1) over the RMS of LoRA's move sΔ, both
  with the layer's rank and alpha; the rule's promise is ≈ 1 (it is 1 / RMS(W) times smaller without it);
- `max |sΔ|`: the largest exponent after the step, which must stay far from overflow on every layer shape.

Models: the tiny SD1 and SDXL test UNets and an SD1.5-shaped UNet (diffusers' random init, 860M
weights), whose kernels are smaller than a trained model's (so its factors are an upper end), and the
shipped pretrained emoji UNet (trained weights). Results: results/balance.{json,md} and the README.

Diffusion transformers: FluxTransformer2DModel and SD3Transformer2DModel built from the published configs
of FLUX.1-dev and SD3.5 Large / Medium (`DIT_CONFIGS`, written out from their transformer/config.json) at
full width but with fewer blocks (FLUX.1-dev has 19 double and 38 single blocks: 12B weights do not fit
this machine in fp32), diffusers' random init; every Linear and SD3's patch-embedding conv (the "-all"
presets) is a Lie target, reported per layer type (block index as `*`). Results: results/balance_dit.*.
"""

from __future__ import annotations

import argparse
import math
import re
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
from lie_diffusion.inject import find_targets, model_family  # noqa: E402
from lie_diffusion.layers import unwrap_layer  # noqa: E402

MODELS = ("tiny-sd1", "tiny-sdxl", "emoji", "sd15")
# transformer/config.json of black-forest-labs/FLUX.1-dev, stabilityai/stable-diffusion-3.5-large and -medium,
# with the number of blocks cut down (full: 19 + 38, 38 and 24)
DIT_CONFIGS = {
    "flux-dev": dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=128,
                     num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                     guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
    "sd35-large": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64,
                       num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                       pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm"),
    "sd35-medium": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64,
                        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384, qk_norm="rms_norm",
                        dual_attention_layers=(0, 1)),
}
TINY_DITS = ("tiny-flux", "tiny-sd3.5")  # the test pipelines' transformers, for a quick run


def load(name: str):
    if name in DIT_CONFIGS:
        from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

        torch.manual_seed(0)
        return (FluxTransformer2DModel if name == "flux-dev" else SD3Transformer2DModel)(**DIT_CONFIGS[name])
    if name in TINY_DITS:
        from lie_diffusion.tiny import tiny_transformer

        return tiny_transformer(name.removeprefix("tiny-"))
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
    model = load(name)
    family = model_family(model)
    dit = family in ("flux", "sd3")
    config = LieConfig(preset=f"{family}-all") if dit else LieConfig(attn_adapter="lie")
    convs, attns = find_targets(model, config)
    rows = [layer_row(n, unwrap_layer(model.get_submodule(n)).weight, rank, rank, step, seed=i)
            for i, n in enumerate(convs + attns)]
    default_targets = set(find_targets(model, LieConfig())[1]) if dit else set()
    for row in rows:
        if dit:  # one row per layer type; "(default)": a target of the family's default preset
            kind = re.sub(r"(transformer_blocks)\.\d+\.", r"\1.*.", row["module"])
            row["kind"] = kind + (" (default)" if row["module"] in default_targets else "")
        else:
            row["kind"] = "conv" if row["module"] in convs else "attention (with --attn_adapter lie)"
    return {"model": name, "config": DIT_CONFIGS.get(name), "parameters": sum(p.numel() for p in model.parameters()),
            "layers": rows}


def summary(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows]
    return f"{min(values):.3g} / {statistics.median(values):.3g} / {max(values):.3g}"


def markdown(data: dict) -> str:
    lines = ["### What the balancing rule does per layer",
             f"`{data['command']}`: every Lie target (UNets: convs, attention projections as `--attn_adapter lie` "
             "adapts them; transformers: every Linear and SD3's patch-embedding conv, per layer type, "
             "\"(default)\" marking the default preset's targets), "
             f"rank {data['rank']}, alpha = rank, one factor step of {data['step']:g} from peft's "
             "init. Cells: min / median / max over the layers.", ""]
    if any(model["config"] for model in data["models"]):
        lines[1] += (" Transformers: the published FLUX.1-dev / SD3.5 configs at full width with fewer blocks "
                     "(" + ", ".join(f"{m['model']}: " + ", ".join(f"{k}={m['config'][k]}" for k in
                                     ("num_layers", "num_single_layers", "dual_attention_layers") if k in m["config"])
                                     for m in data["models"] if m["config"]) + "), random init.")
    rows = []
    for model in data["models"]:
        for kind in sorted({r["kind"] for r in model["layers"]}):
            mine = [r for r in model["layers"] if r["kind"] == kind]
            rows.append([model["model"], f"{model['parameters'] / 1e6:.1f}M", kind.removesuffix(
                         " (with --attn_adapter lie)"), len(mine),
                         summary(mine, "rms"), summary(mine, "factor"), summary(mine, "move_ratio"),
                         summary(mine, "unbalanced_move_ratio"), summary(mine, "max_exponent"),
                         "yes" if all(r["finite"] for r in mine) else "**no**"])
    lines.append(B.md_table(["model", "weights", "layers", "n", "RMS(W)", "factor 1/RMS", "move ratio (rms)",
                             "move ratio (none)", "max abs exponent", "all finite"], rows))
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS + tuple(DIT_CONFIGS) + TINY_DITS)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--step", type=float, default=1e-3, help="size of the one B step (Adam's first step = lr)")
    parser.add_argument("--out", default=str(B.RESULTS_DIR))
    parser.add_argument("--name", default="balance", help="results/<name>.{json,md} and the README section's name")
    parser.add_argument("--readme", default=str(B.README), help="README to update ('none': leave it alone)")
    args = parser.parse_args(argv)
    command = "python benchmarks/balance_report.py " + " ".join(sys.argv[1:] if argv is None else argv)
    data = {"command": command.strip(), "rank": args.rank, "step": args.step,
            "models": [report(name, args.rank, args.step) for name in args.models]}
    B.publish(args.name, data, markdown(data), Path(args.out), args.readme)
    return data


if __name__ == "__main__":
    main()
