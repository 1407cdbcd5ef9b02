"""A1111 extension: `<lora:name:0.7>` with a lie-diffusion file gives the Lie model at 0.7, exactly.

A1111's built-in Lora extension reads a file's keys, matches them to the model's layers, asks its
`networks.module_types` in turn for a module that computes each layer's update ΔW, and adds it: W + ΔW. At
start-up this extension
- makes A1111 read a lie-diffusion file (told apart by its metadata) by kohya names: the LoRA section as kohya
  LoRA tensors, which A1111's own LoRA module type loads, and each Lie module as one `<name>.lie_diffusion` entry;
- puts `ModuleTypeLie` first in `module_types`; it claims those entries only, and its modules return
  ΔW = W ⊙ expm1(m·sΔ) (exp) or m·s·W ⊙ Δ (taylor) in float32 at the `<lora:name:m>` multiplier m, not scaled
  again, so W + ΔW is the Lie model at m;
- checks each lie-diffusion network once A1111 has loaded a prompt's networks, before any layer is patched: every
  module must have landed on a layer of its shape, and the adapted weights must be finite at the multipliers.
  A network that fails is dropped with one error naming the file (A1111 itself only logs unmatched keys).
Install with `lie-diffusion install a1111 PATH/TO/stable-diffusion-webui`. A1111 (AGPL) is imported only inside
these functions, when A1111 runs them.
"""

from __future__ import annotations

import functools

import torch

from lie_diffusion.hosts import (
    TEXT_ENCODERS, UNET, LiePatch, as_lie_file, check_fit, is_lie_file, kohya_lora_tensors, kohya_names, refuse,
)

COMPONENTS = UNET + TEXT_ENCODERS
ENTRY_KEY = "lie_diffusion"  # `<kohya name>.lie_diffusion` → the Lie module's ModuleEntry, in what A1111 reads


def a1111_state_dict(path) -> dict:
    """A lie-diffusion file as A1111's LoRA loader reads it. UNet layers get SGM names for every layout: A1111 maps
    diffusers names as if every block had SD's two layers, and SGM names as they are."""
    adapter = as_lie_file(path)
    names, problems = kohya_names(adapter, COMPONENTS, sgm_unet=True)
    refuse(adapter, problems)
    state = {}
    for name, entry in names.items():
        state.update({f"{name}.{ENTRY_KEY}": entry} if entry.section == "lie" else kohya_lora_tensors(name, entry))
    return state


@functools.cache
def module_type() -> type:
    """ModuleTypeLie, built on A1111's `network` module (importable only inside A1111)."""
    import network

    class NetworkModuleLie(network.NetworkModule):
        """One Lie module. A1111 adds what calc_updown returns to W as it is, so the multiplier goes inside exp."""

        def __init__(self, net, weights):
            super().__init__(net, weights)
            self.patch = LiePatch(weights.w[ENTRY_KEY])

        def calc_updown(self, orig_weight):
            return self.patch.update(orig_weight, self.multiplier()), None

    class ModuleTypeLie(network.ModuleType):
        def create_module(self, net, weights):
            return NetworkModuleLie(net, weights) if ENTRY_KEY in weights.w else None

    return ModuleTypeLie


def unpatched_weight(module) -> torch.Tensor:
    """The weight A1111 hands `module.calc_updown`, before any network: the layer's backup once A1111 patched it;
    for an OpenCLIP nn.MultiheadAttention, the q, k or v third of its in_proj_weight."""
    layer = module.sd_module
    backup = getattr(layer, "network_weights_backup", None)
    if isinstance(layer, torch.nn.MultiheadAttention):
        in_proj = layer.in_proj_weight if backup is None else backup[0]
        return in_proj.chunk(3)["qkv".index(module.sd_key[-len("q_proj")])]
    return layer.weight if backup is None else backup


def check_network(net) -> None:
    """Raise one error naming the file if a lie-diffusion network's modules did not all land on layers of their
    shape, or an adapted weight would not be finite at the network's multipliers; other networks pass."""
    expected = expected_modules(net)
    if expected is None:
        return
    adapter, names, problems = expected
    landed = {module.network_key.partition(".")[0]: module for module in net.modules.values()}

    def layer_of(name):
        module = landed.get(name)
        return None if module is None else (unpatched_weight(module), module.multiplier())

    check_fit(adapter, names, problems, layer_of)


def expected_modules(net) -> tuple | None:
    """A lie-diffusion network's file and the kohya names its modules should land on, read once per network
    object (A1111 builds a new one when the file changes, and checks every prompt); None for other networks."""
    if not hasattr(net, "lie_diffusion_expected"):
        path, net.lie_diffusion_expected = net.network_on_disk.filename, None
        if is_lie_file(path):
            adapter = as_lie_file(path)
            net.lie_diffusion_expected = (adapter, *kohya_names(adapter, COMPONENTS, sgm_unet=True))
    return net.lie_diffusion_expected


def read_state_dict(checkpoint_file, *args, **kwargs):
    """A1111's sd_models.read_state_dict, reading lie-diffusion files by kohya names."""
    from modules import patches, sd_models

    if is_lie_file(checkpoint_file):
        return a1111_state_dict(checkpoint_file)
    return patches.original(__name__, sd_models, "read_state_dict")(checkpoint_file, *args, **kwargs)


def load_networks(*args, **kwargs):
    """A1111's networks.load_networks, then every lie-diffusion network that does not fit is dropped, reported."""
    import networks
    from modules import errors, patches, sd_hijack

    patches.original(__name__, networks, "load_networks")(*args, **kwargs)
    for net in list(networks.loaded_networks):
        try:
            check_network(net)
        except ValueError as error:
            networks.loaded_networks.remove(net)
            errors.report(f"Lie adapter not applied: {error}")
            sd_hijack.model_hijack.comments.append(f"Lie adapter not applied: {error}")


def install_hooks() -> None:
    """Hook lie-diffusion files into A1111's Lora extension (idempotent: A1111 can run its scripts again)."""
    import networks
    from modules import patches, sd_models

    lie_type = module_type()
    if not any(isinstance(existing, lie_type) for existing in networks.module_types):
        networks.module_types.insert(0, lie_type())
    if patches.original(__name__, sd_models, "read_state_dict") is None:
        patches.patch(__name__, sd_models, "read_state_dict", read_state_dict)
    if patches.original(__name__, networks, "load_networks") is None:
        patches.patch(__name__, networks, "load_networks", load_networks)
