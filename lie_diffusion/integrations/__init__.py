"""Folders the SD hosts load (a ComfyUI custom node, Forge and A1111 extensions) and their installer.

Each folder is thin glue around `lie_diffusion.hosts` and imports its host only when the host runs it.
Installing links the folder into the host's plugin folder (or copies it), so the host runs the code of the
lie-diffusion installed in its Python.
"""

from __future__ import annotations

import filecmp
import shutil
from dataclasses import dataclass
from pathlib import Path

INSTALL_NAME = "lie-diffusion"


@dataclass(frozen=True)
class Host:
    title: str
    markers: tuple[str, ...]  # files that make a folder this host's checkout
    plugins: str  # the folder the host loads plugins from
    source: str  # our folder for it, beside this file
    foreign: tuple[tuple[str, str], ...] = ()  # (file, host) pairs: a folder with that file is the other host's


HOSTS = {
    "comfyui": Host("ComfyUI", ("comfy/lora.py", "nodes.py"), "custom_nodes", "comfyui"),
    "forge": Host("Forge", ("backend/patcher/lora.py", "extensions-builtin/sd_forge_lora/networks.py"), "extensions",
                  "forge"),
    "a1111": Host("AUTOMATIC1111", ("extensions-builtin/Lora/networks.py", "modules/sd_models.py"), "extensions",
                  "a1111", foreign=(("backend/patcher/lora.py", "forge"),)),  # Forge grew from A1111
}


def install(host: str, root, copy: bool = False) -> tuple[Path, bool]:
    """Put the host's folder into `root`'s plugin folder; returns (installed path, whether anything changed).
    Running it again changes nothing; a foreign folder of the same name is refused, never replaced."""
    spec = HOSTS[host]
    root = Path(root)
    missing = [marker for marker in spec.markers if not (root / marker).is_file()]
    if missing:
        raise ValueError(f"{root}: not a {spec.title} folder (no {', '.join(missing)}).")
    for marker, other in spec.foreign:
        if (root / marker).is_file():
            raise ValueError(f"{root}: a {HOSTS[other].title} folder (it has {marker}); use `lie-diffusion install "
                             f"{other}`.")
    source = Path(__file__).resolve().parent / spec.source
    target = root / spec.plugins / INSTALL_NAME
    if target.is_symlink() or target.exists():
        if target.resolve() == source or (copy and _same_files(source, target)):
            return target, False
        raise ValueError(f"{target} exists and is not this lie-diffusion's {spec.title} folder; remove it first.")
    target.parent.mkdir(exist_ok=True)
    if copy:
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        target.symlink_to(source, target_is_directory=True)
    return target, True


def _same_files(source: Path, target: Path) -> bool:
    """Whether `target` is a copy of `source` (its files byte for byte; caches aside)."""
    if not target.is_dir() or target.is_symlink():
        return False
    files = [p.relative_to(source) for p in source.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return all((target / f).is_file() and filecmp.cmp(source / f, target / f, shallow=False) for f in files)
