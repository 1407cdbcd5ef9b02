"""Loaded by Forge at start-up: hooks lie-diffusion files into Forge's LoRA loading (see the package)."""

from lie_diffusion.integrations.forge import install_hooks

install_hooks()
