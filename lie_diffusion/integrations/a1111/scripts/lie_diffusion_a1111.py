"""Loaded by A1111 at start-up, after its Lora extension: hooks lie-diffusion files into it (see the package)."""

from lie_diffusion.integrations.a1111 import install_hooks

install_hooks()
