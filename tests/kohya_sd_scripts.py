"""Run inside sd-scripts' Python environment by tests/test_hosts_kohya.py (not a test module itself).

`python kohya_sd_scripts.py sd1 MODEL FILE OUT`: sd-scripts' own loader turns the diffusers folder MODEL into its
SD 1.x UNet; lie_diffusion.kohya builds the network from FILE (create_network_from_weights, then apply_to and
load_state_dict, as gen_img.py does); every adapted layer is compared with the formula, written here from scratch
in float64, at multipliers 1, 0.5 and -1; the UNet's outputs on fixed inputs go to OUT for the diffusers side.

`python kohya_sd_scripts.py sdxl OUT`: sd-scripts' full-size SDXL UNet (random weights): create_network, random
factors, every layer against the formula at 1, 0.5 and -1, save_weights, create_network_from_weights.
"""

import json
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lie_diffusion import kohya

MULTIPLIERS = (1.0, 0.5, -1.0)


def formula_weight(weight, down, up, s, section, mode):
    """W ⊙ exp(sΔ) or W ⊙ (1 + sΔ) (Lie), W + s·BA (LoRA), Δ = reshape(B_flat @ A_flat), all in float64."""
    delta = (up.double().flatten(1) @ down.double().flatten(1)).reshape(weight.shape) * s
    weight = weight.double()
    if section == "lora":
        return weight + delta
    return weight * (delta.exp() if mode == "exp" else 1 + delta)


@torch.no_grad()
def layer_errors(network) -> dict:
    """Largest relative error of any adapted layer's output vs the formula, per multiplier."""
    errors = {}
    generator = torch.Generator().manual_seed(0)
    for t in MULTIPLIERS:
        network.set_multiplier(t)
        worst = 0.0
        for module in network.children():
            layer = module.layer
            if isinstance(layer, torch.nn.Conv2d):
                x = torch.randn(1, layer.in_channels, 4, 4, generator=generator)
            else:
                x = torch.randn(2, layer.in_features, generator=generator)
            weight = formula_weight(layer.weight, module.down, module.up, t * float(module.alpha) / module.rank,
                                    module.section, module.mode)
            bias = None if layer.bias is None else layer.bias.double()
            if isinstance(layer, torch.nn.Conv2d):
                expected = F.conv2d(x.double(), weight, bias, layer.stride, layer.padding, layer.dilation)
            else:
                expected = F.linear(x.double(), weight, bias)
            actual = layer(x).double()
            worst = max(worst, ((actual - expected).abs().max() / expected.abs().max()).item())
        errors[str(t)] = worst
    network.set_multiplier(1.0)
    return errors


def sd1(model, file, out):
    from library import train_util

    args = SimpleNamespace(pretrained_model_name_or_path=model, v2=False, vae=None)
    text_encoder, vae, unet, _ = train_util._load_target_model(args, torch.float32)
    network, weights_sd = kohya.create_network_from_weights(1.0, file, vae, text_encoder, unet, for_inference=True)
    network.apply_to(text_encoder, unet)
    info = network.load_state_dict(weights_sd, False)
    report = {"unet_class": f"{type(unet).__module__}.{type(unet).__name__}", "modules": len(list(network.children())),
              "lie": sum(m.section == "lie" for m in network.children()), "load": str(info),
              "layer_errors": layer_errors(network)}
    generator = torch.Generator().manual_seed(1)
    inputs = {"sample": torch.randn(1, 4, 8, 8, generator=generator), "timestep": torch.tensor([500]),
              "context": torch.randn(1, 77, 768, generator=generator)}
    outputs = {}
    with torch.no_grad():
        for t in MULTIPLIERS:
            network.set_multiplier(t)
            outputs[f"out_{t}"] = unet(inputs["sample"], inputs["timestep"], inputs["context"]).sample
    save_file({**inputs, **outputs}, f"{out}/sd1_outputs.safetensors")
    with open(f"{out}/sd1_report.json", "w") as handle:
        json.dump(report, handle)


def sdxl(out):
    from library import sdxl_original_unet

    torch.manual_seed(0)
    unet = sdxl_original_unet.SdxlUNet2DConditionModel()
    network = kohya.create_network(1.0, 4, 1, None, [], unet, conv_dim="4", conv_alpha="1")
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    network.apply_to([], unet)
    report = {"unet_class": f"{type(unet).__module__}.{type(unet).__name__}", "modules": len(list(network.children())),
              "lie": sum(m.section == "lie" for m in network.children()), "layer_errors": layer_errors(network)}
    file = f"{out}/sdxl.safetensors"
    network.save_weights(file, None, {"ss_network_module": "lie_diffusion.kohya"})
    reloaded, weights_sd = kohya.create_network_from_weights(1.0, file, None, [], unet, for_inference=True)
    state = network.state_dict()
    report["reloaded_equal"] = weights_sd.keys() == state.keys() and all(
        torch.equal(weights_sd[k], state[k]) for k in state)
    with open(f"{out}/sdxl_report.json", "w") as handle:
        json.dump(report, handle)


if __name__ == "__main__":
    {"sd1": sd1, "sdxl": sdxl}[sys.argv[1]](*sys.argv[2:])
