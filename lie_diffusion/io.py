"""The adapter file: one safetensors file that stock diffusers half-reads and lie-diffusion fully reads.

Layout (docs/FORMAT.md has the full spec):

* LoRA section: `<component>.<module>.lora_A.weight` / `.lora_B.weight` (component: `unet` or
  `transformer` (Flux.1, SD3/SD3.5), `text_encoder`, `text_encoder_2`), with diffusers'
  `lora_adapter_metadata` describing a plain `LoraConfig`, so `pipe.load_lora_weights` applies these
  with the right alpha.
* Lie section: the same names under `lie.`; stock diffusers filters keys by component prefix and
  so never sees them (it would otherwise add them as LoRA: silently wrong).
* `lie_diffusion` metadata: format version, mode, rank, alpha, per-module overrides, targets and a
  fingerprint of the base UNet's or transformer's config; `lie_diffusion_sha256`: a content hash of the
  tensors, checked by every read (a file written before it has none and still loads).
* The same modules may instead be stored under kohya names (`lora_unet_…`, `.lie_down/.lie_up/.lora_down/
  .lora_up.weight`, `.alpha`), as `lie_diffusion.kohya` writes them for sd-scripts; reading maps them back.

Factors are stored in float32 whatever the model's dtype: an exact superset of fp16/bf16, and the
files are small. Loading validates the whole file against the model before changing anything.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .functional import BALANCES, MODES, LieFactor, lie_delta, lie_multiplier
from .inject import LieConfig, add_lie_adapters, denoiser_class, find_targets, model_family, remove_adapter
from .layers import LieLayerMixin, unwrap_layer
from .naming import KOHYA_SECTIONS, kohya_name, module_of_kohya_name, parse_kohya_key

FORMAT_VERSION = 1
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lie_diffusion"
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers' key; JSON of `LoraConfig` kwargs, prefixed by component
LIE_PREFIX = "lie."
HASH_KEY = "lie_diffusion_sha256"  # content hash of the tensors (`content_hash`), checked by every read
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
DENOISERS = ("unet", "transformer")
SECTIONS = ("lora", "lie")
# UNet config entries that fix adapter shapes and module names. Left out on purpose: in_channels (inpainting
# UNets take the same adapters), sample_size and upcast_attention (SD2 base vs 768-v).
FINGERPRINT_KEYS = (
    "block_out_channels",
    "layers_per_block",
    "cross_attention_dim",
    "attention_head_dim",
    "num_attention_heads",
    "transformer_layers_per_block",
    "use_linear_projection",
    "down_block_types",
    "up_block_types",
    "addition_embed_type",
)
# The same for Flux.1 / SD3 transformers, stored with the model class, which no file of another class loads into.
# Left out: in_channels (Flux Fill / Control take the same block adapters), sample_size, pos_embed_max_size.
DIT_FINGERPRINT_KEYS = (
    "patch_size",
    "num_layers",
    "num_single_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "caption_projection_dim",
    "pooled_projection_dim",
    "guidance_embeds",
    "qk_norm",
    "dual_attention_layers",
    "out_channels",
)
_KEY_RE = re.compile(
    r"(?P<lie>lie\.)?(?P<component>unet|transformer|text_encoder_2|text_encoder)\.(?P<module>.+)"
    r"\.lora_(?P<factor>[AB])\.weight"
)


@dataclass
class ModuleEntry:
    """One adapted module as stored in a file: its factors and how to apply them."""

    component: str
    module: str
    section: str  # "lora" (additive, W + sBA) or "lie" (multiplicative, W ⊙ M(sΔ))
    A: torch.Tensor
    B: torch.Tensor
    alpha: float
    mode: str | None  # Lie mode; None in the LoRA section

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def ref(self) -> str:
        """The module's name in the file's namespace: `<component>.<module>`."""
        return f"{self.component}.{self.module}"

    @property
    def scaling(self) -> float:
        """s in Δ = reshape(B_flat @ A_flat) · s, at strength 1."""
        return self.alpha / self.rank

    @property
    def key_prefix(self) -> str:
        return (LIE_PREFIX if self.section == "lie" else "") + self.ref

    @property
    def num_parameters(self) -> int:
        return self.A.numel() + self.B.numel()


@dataclass
class LieFile:
    """A parsed, self-consistent adapter file (checked on its own, not yet against a model)."""

    path: Path
    modules: list[ModuleEntry]
    info: dict | None  # the `lie_diffusion` metadata; None for a plain LoRA file
    lora_metadata: dict | None  # diffusers' `lora_adapter_metadata`
    header: dict[str, str] = field(default_factory=dict)  # the whole safetensors metadata, as stored
    kohya_names: bool = False  # keys in kohya names (written by lie_diffusion.kohya), not lie-diffusion's

    def section(self, section: str, component: str | None = None) -> list[ModuleEntry]:
        return [m for m in self.modules if m.section == section and component in (None, m.component)]

    @property
    def components(self) -> list[str]:
        return [c for c in COMPONENTS if any(m.component == c for m in self.modules)]


# ----------------------------------------------------------------------------------------------- saving


def save_lie_weights(
    save_directory,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    adapter_name: str = "default",
    weight_name: str = WEIGHT_NAME,
    *,
    text_encoder_2: nn.Module | None = None,
    transformer: nn.Module | None = None,
) -> Path:
    """Write adapter `adapter_name` of the given models to `save_directory/weight_name`; return the path.

    `unet` (SD1.x/2.x/SDXL) or `transformer` (Flux.1, SD3/SD3.5) is the denoiser, as in diffusers' pipelines.

    Standard LoRA layers go to the LoRA section (what stock `load_lora_weights` reads), Lie layers to
    the `lie.` section. The write is atomic: a failure never leaves a broken file where a good one was.
    """
    given = {"unet": unet, "transformer": transformer, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    models = {name: model for name, model in given.items() if model is not None}
    if not models:
        raise ValueError(f"save_lie_weights needs at least one of {', '.join(COMPONENTS)}.")
    entries = [entry for component, model in models.items() for entry in _collect(model, component, adapter_name)]
    if not entries:
        raise ValueError(f"No adapter named {adapter_name!r} in {', '.join(models)}: nothing to save.")
    for entry in entries:
        _check_finite(f"{entry.key_prefix}.lora_A.weight", entry.A, "model")
        _check_finite(f"{entry.key_prefix}.lora_B.weight", entry.B, "model")

    directory = Path(save_directory)
    if directory.is_file():
        raise ValueError(f"{directory} is a file; save_lie_weights expects a directory.")
    fingerprints = {c: model_fingerprint(models[c]) for c in DENOISERS if c in models}
    return write_lie_file(directory / weight_name, entries, fingerprints, _balance_of(models.values(), adapter_name))


def write_lie_file(path, entries: list[ModuleEntry], fingerprints: dict | None, balance: str = "none",
                   extra: dict | None = None, *, kohya: bool = False, header: dict[str, str] | None = None,
                   dtype: torch.dtype | None = None) -> Path:
    """One adapter file from module entries, written atomically (a failure never leaves a broken file where a
    good one was). `fingerprints`: the base denoiser's, `{"unet" | "transformer": model_fingerprint(...)}`
    (None or empty: unknown); `extra`: more metadata, each value as JSON; `kohya`: keys in kohya names
    (`naming.kohya_key`), for sd-scripts; `header`: more metadata, as strings; `dtype`: of the factors (default
    float32). The metadata holds the tensors' `content_hash`."""
    unknown = sorted(set(fingerprints or {}) - set(DENOISERS))
    if unknown:
        raise ValueError(f"write_lie_file: fingerprints are keyed by denoiser component {DENOISERS}, got {unknown}.")
    if kohya:
        unet = (fingerprints or {}).get("unet")
        if not unet:
            raise ValueError("A file in kohya names needs the base UNet's fingerprint (SD 1.x/2.x or SDXL).")
        tensors = _kohya_tensors(entries, unet)
    else:
        tensors = {}
        for entry in entries:
            tensors[f"{entry.key_prefix}.lora_A.weight"] = entry.A.contiguous()
            tensors[f"{entry.key_prefix}.lora_B.weight"] = entry.B.contiguous()
    if dtype is not None:
        tensors = {k: v if k.endswith(".alpha") else v.to(dtype) for k, v in tensors.items()}
    info = _lie_metadata(entries, fingerprints, balance)
    metadata = {**(header or {}), "format": "pt", METADATA_KEY: json.dumps(info, sort_keys=True)}
    lora_metadata = None if kohya else _lora_metadata(entries)
    if lora_metadata:
        metadata[LORA_METADATA_KEY] = json.dumps(lora_metadata, sort_keys=True)
    metadata.update({key: json.dumps(value, sort_keys=True) for key, value in (extra or {}).items()})
    metadata[HASH_KEY] = content_hash(tensors)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, safetensors_bytes(tensors, metadata=metadata))
    return path


def content_hash(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor, by sorted key: its name, dtype, shape and raw bytes (docs/FORMAT.md).

    It covers the names and the values, not how the safetensors file lays them out, so it is the same for any
    file that holds the same tensors."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        # A copy: .numpy() pins its tensor's storage, and a factor may still be a live training parameter (FSDP
        # frees and regrows an unsharded parameter's storage after saving).
        tensor = tensors[key].detach().to("cpu").clone(memory_format=torch.contiguous_format)
        digest.update(f"{key}\0{str(tensor.dtype).removeprefix('torch.')}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _kohya_tensors(entries: list[ModuleEntry], fingerprint: dict) -> dict[str, torch.Tensor]:
    """kohya keys: `<stem>.lora_down/lora_up.weight` (LoRA), `<stem>.lie_down/lie_up.weight` (Lie), `<stem>.alpha`."""
    tensors = {}
    for entry in entries:
        stem = kohya_name(entry.component, entry.module, fingerprint)
        down, up = KOHYA_SECTIONS[entry.section]
        if f"{stem}.alpha" in tensors:
            raise ValueError(f"{entry.ref}: kohya name {stem} is given twice.")
        tensors[f"{stem}.{down}.weight"] = entry.A.contiguous()
        tensors[f"{stem}.{up}.weight"] = entry.B.contiguous()
        tensors[f"{stem}.alpha"] = torch.tensor(entry.alpha, dtype=torch.float32)
    return tensors


def _from_kohya(path: Path, tensors: dict[str, torch.Tensor], info: dict | None):
    """A file in kohya names, its tensors under lie-diffusion keys, and each module's `.alpha` (checked once the
    metadata has given the alphas)."""
    config = ((info or {}).get("fingerprint") or {}).get("unet")
    if not config:
        raise ValueError(
            f"{path}: a file in kohya names without lie-diffusion metadata (or without its UNet fingerprint): a kohya "
            "LoRA/LyCORIS file, not a lie-diffusion one; load it with pipe.load_lora_weights or the host's own loader."
        )
    renamed, alphas = {}, {}
    for key, tensor in tensors.items():
        parsed = parse_kohya_key(key)
        if parsed is None:
            renamed[key] = tensor  # reported as an unexpected key
            continue
        stem, section, factor = parsed
        try:
            component, module = module_of_kohya_name(stem, config)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        if factor == "alpha":
            alphas[f"{component}.{module}"] = (stem, tensor)
        else:
            renamed[(LIE_PREFIX if section == "lie" else "") + f"{component}.{module}.lora_{factor}.weight"] = tensor
    return renamed, alphas


def _check_kohya_alphas(parsed: "LieFile", alphas: dict) -> None:
    """Each module's `.alpha` tensor (what kohya tools read) must be the metadata's alpha, in float32."""
    by_ref = {m.ref: m for m in parsed.modules}
    for ref, (stem, tensor) in alphas.items():
        entry = by_ref.get(ref)
        if entry is None:
            raise ValueError(f"{parsed.path}: {stem}.alpha has no factors (truncated or hand-edited file?).")
        if tensor.numel() != 1 or tensor.float().item() != torch.tensor(entry.alpha, dtype=torch.float32).item():
            raise ValueError(f"{parsed.path}: {stem}.alpha holds {tensor.tolist()} but the metadata says alpha "
                             f"{entry.alpha} (hand-edited file?).")
    missing = sorted(ref for ref in by_ref if ref not in alphas)
    if missing:
        raise ValueError(f"{parsed.path}: {missing[0]} has no .alpha tensor (truncated or hand-edited file?).")


def _collect(model: nn.Module, component: str, adapter_name: str) -> list[ModuleEntry]:
    entries = []
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or adapter_name not in layer.lora_A:
            continue
        unsupported = [
            option
            for option in ("use_dora", "use_rslora", "lora_bias")
            if getattr(layer, option, {}).get(adapter_name, False)
        ]
        if unsupported:
            raise ValueError(
                f"{component}.{name}: adapter {adapter_name!r} uses {unsupported}, which this format does not store."
            )
        is_lie = isinstance(layer, LieLayerMixin)
        entries.append(
            ModuleEntry(
                component=component,
                module=name,
                section="lie" if is_lie else "lora",
                A=layer.lora_A[adapter_name].weight.detach().to("cpu", torch.float32).contiguous(),
                B=layer.lora_B[adapter_name].weight.detach().to("cpu", torch.float32).contiguous(),
                alpha=float(layer.lora_alpha[adapter_name]),
                mode=layer.lie_mode[adapter_name] if is_lie else None,
            )
        )
    return entries


def _balance_of(models, adapter_name: str) -> str:
    """The balancing rule the adapter was built with ("none" for a LoRA-only or hand-built adapter)."""
    configs = [(getattr(m, "peft_config", None) or {}).get(adapter_name) for m in models]
    rules = {getattr(config, "lie_scaling_rule", "none") for config in configs}
    rules.discard("none")
    return rules.pop() if len(rules) == 1 else "none"


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def _lie_metadata(entries: list[ModuleEntry], fingerprints: dict | None, balance: str) -> dict:
    """Defaults are the most common values (of the Lie section when there is one); overrides list the rest.

    `balance` names the rule that chose the Lie alphas; it is a label: the alphas themselves are stored."""
    lie = [e for e in entries if e.section == "lie"]
    reference = lie or entries
    rank = _most_common(e.rank for e in reference)
    alpha = _most_common(e.alpha for e in reference)
    mode = _most_common(e.mode for e in lie) if lie else None
    overrides = {}
    for entry in entries:
        override = {"rank": entry.rank} if entry.rank != rank else {}
        if entry.alpha != alpha:
            override["alpha"] = entry.alpha
        if entry.section == "lie" and entry.mode != mode:
            override["mode"] = entry.mode
        if override:
            overrides[entry.ref] = override
    targets: dict[str, dict[str, list[str]]] = {}
    for entry in entries:
        targets.setdefault(entry.component, {}).setdefault(entry.section, []).append(entry.module)
    from . import __version__

    return {
        "format_version": FORMAT_VERSION,
        "writer": f"lie-diffusion {__version__}",
        "mode": mode,
        "rank": rank,
        "alpha": alpha,
        "balance": balance,
        "overrides": overrides,
        "targets": targets,
        "fingerprint": dict(fingerprints or {}),
    }


def _lora_metadata(entries: list[ModuleEntry]) -> dict:
    """diffusers' `lora_adapter_metadata`: per component, the kwargs of a plain `LoraConfig` for the LoRA section."""
    metadata = {}
    for component in COMPONENTS:
        lora = [e for e in entries if e.section == "lora" and e.component == component]
        if not lora:
            continue
        rank = _most_common(e.rank for e in lora)
        alpha = _most_common(e.alpha for e in lora)
        config = {
            "r": rank,
            "lora_alpha": alpha,
            "target_modules": sorted(e.module for e in lora),
            # peft matches pattern keys as regexes against the end of module names
            "rank_pattern": {re.escape(e.module): e.rank for e in lora if e.rank != rank},
            "alpha_pattern": {re.escape(e.module): e.alpha for e in lora if e.alpha != alpha},
        }
        metadata.update({f"{component}.{key}": value for key, value in config.items()})
    return metadata


def unet_fingerprint(unet: nn.Module) -> dict:
    """The UNet config entries that decide adapter module names and shapes (JSON-ready)."""
    config = getattr(unet, "config", {})
    return {key: json.loads(json.dumps(config[key])) for key in FINGERPRINT_KEYS if key in config}


def model_fingerprint(model: nn.Module) -> dict:
    """A denoiser's fingerprint: a UNet's config entries, or a transformer's class name and config entries."""
    if model_family(model) in (None, "unet"):
        return unet_fingerprint(model)
    config = model.config
    entries = {key: json.loads(json.dumps(config[key])) for key in DIT_FINGERPRINT_KEYS if key in config}
    return {"_class_name": denoiser_class(model), **entries}


def denoiser_component(model: nn.Module) -> str:
    """The file component a bare denoiser's adapters live under: "transformer" for Flux/SD3, else "unet"."""
    return "transformer" if model_family(model) in ("flux", "sd3") else "unet"


def _atomic_write(path: Path, data: bytes) -> None:
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)  # mkstemp makes 0600; a saved file gets the usual permissions
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------- reading


def resolve_weight_file(path_or_dir, weight_name: str | None = None) -> Path:
    """The safetensors file meant by a file path, or by a directory (+ optional `weight_name`)."""
    path = Path(path_or_dir)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory.")
    if path.is_file():
        return path
    if weight_name is not None or (path / WEIGHT_NAME).is_file():
        file = path / (weight_name or WEIGHT_NAME)
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no such file.")
        return file
    candidates = sorted(path.glob("*.safetensors"))
    if len(candidates) != 1:
        found = ", ".join(c.name for c in candidates) or "none"
        raise FileNotFoundError(
            f"{path}: expected {WEIGHT_NAME} or a single .safetensors file (found: {found}); pass weight_name."
        )
    return candidates[0]


def read_lie_file(path_or_dir, weight_name: str | None = None) -> LieFile:
    """Read and check an adapter file on its own: keys, factor pairs and shapes, finite values, metadata."""
    path = resolve_weight_file(path_or_dir, weight_name)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            header = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error}).") from None
    check_content_hash(path, header, tensors)
    info = _json_metadata(path, header, METADATA_KEY)
    lora_metadata = _json_metadata(path, header, LORA_METADATA_KEY)
    if info is not None:
        _check_version(path, info)
    kohya_alphas = None
    if any(parse_kohya_key(key) for key in tensors):
        tensors, kohya_alphas = _from_kohya(path, tensors, info)

    factors: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in tensors.items():
        match = _KEY_RE.fullmatch(key)
        if match is None:
            unknown.append(key)
            continue
        section = "lie" if match["lie"] else "lora"
        factors.setdefault((section, match["component"], match["module"]), {})[match["factor"]] = tensor
        _check_finite(key, tensor, path)
    if unknown:
        shown = ", ".join(unknown[:3]) + (f" (+{len(unknown) - 3} more)" if len(unknown) > 3 else "")
        raise ValueError(
            f"{path}: unexpected keys {shown}. lie-diffusion files hold only '<component>.<module>.lora_A.weight' / "
            f"'.lora_B.weight' keys (components: {', '.join(COMPONENTS)}), optionally under 'lie.', or the "
            "same in kohya names ('lora_unet_…'/'lora_te…' with '.lora_down/.lora_up/.lie_down/.lie_up.weight', "
            "'.alpha'); "
            "load other LoRA formats with pipe.load_lora_weights."
        )
    if not factors:
        raise ValueError(f"{path}: the file holds no adapter factors.")

    modules = []
    for (section, component, module), pair in sorted(factors.items()):
        prefix = (LIE_PREFIX if section == "lie" else "") + f"{component}.{module}"
        for have, missing in (("A", "B"), ("B", "A")):
            if missing not in pair:
                raise ValueError(
                    f"{path}: {prefix}.lora_{have}.weight has no partner {prefix}.lora_{missing}.weight "
                    "(truncated or hand-edited file?)."
                )
        _check_pair_shapes(path, prefix, pair["A"], pair["B"])
        modules.append(ModuleEntry(component, module, section, pair["A"], pair["B"], alpha=math.nan, mode=None))
    parsed = LieFile(path, modules, info, lora_metadata, header, kohya_names=kohya_alphas is not None)
    _check_duplicates(parsed)
    if info is not None:
        _apply_lie_metadata(parsed)
    elif parsed.section("lie"):
        raise ValueError(f"{path}: the file has a Lie section ('lie.' keys) but no '{METADATA_KEY}' metadata.")
    else:
        _apply_lora_metadata(parsed)
    if kohya_alphas is not None:
        _check_kohya_alphas(parsed, kohya_alphas)
    return parsed


def check_content_hash(path: Path, header: dict, tensors: dict[str, torch.Tensor]) -> bool | None:
    """None for a file without a content hash (written before there was one); else True, or raise naming the file."""
    stored = header.get(HASH_KEY)
    if stored is None:
        return None
    actual = content_hash(tensors)
    if actual != stored:
        raise ValueError(f"{path}: the tensors do not match the file's content hash ({HASH_KEY} {stored[:16]}…, "
                         f"computed {actual[:16]}…): the file is corrupt (a changed byte); download or copy it again.")
    return True


def _json_metadata(path: Path, header: dict, key: str) -> dict | None:
    if key not in header:
        return None
    try:
        value = json.loads(header[key])
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: metadata '{key}' is not valid JSON ({error}).") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: metadata '{key}' must be a JSON object, got {type(value).__name__}.")
    return value


def _check_version(path: Path, info: dict) -> None:
    version = info.get("format_version")
    if version != FORMAT_VERSION:
        hint = (
            " (written by a newer lie-diffusion? upgrade it)"
            if isinstance(version, int) and version > FORMAT_VERSION
            else ""
        )
        raise ValueError(
            f"{path}: unknown {METADATA_KEY} format_version {version!r}{hint}; this lie-diffusion reads version "
            f"{FORMAT_VERSION}."
        )


def _check_finite(key: str, tensor: torch.Tensor, where) -> None:
    if not tensor.is_floating_point():
        raise ValueError(f"{where}: {key} has dtype {tensor.dtype}; adapter factors must be floating point.")
    bad = (~torch.isfinite(tensor)).sum().item()
    if bad:
        raise ValueError(f"{where}: {key} holds {bad} NaN/inf value(s) of {tensor.numel()}.")


def _check_pair_shapes(path: Path, prefix: str, A: torch.Tensor, B: torch.Tensor) -> None:
    shapes = f"lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}"
    if B.ndim == A.ndim + 1 and B.shape[-1] == 1:  # the state-dict layout of Lie layers (see layers.LieLayerMixin)
        raise ValueError(
            f"{path}: {prefix} holds lie-diffusion Lie factors ({shapes}) written from a state dict (e.g. peft's "
            "get_peft_model_state_dict + diffusers' save_lora_weights), without the Lie metadata that says how to "
            "apply them. Save adapters with lie_diffusion.save_lie_weights; to recover this file, add_lie_adapters "
            "with the training config, then peft.set_peft_model_state_dict(unet, state dict without the 'unet.' prefix)."
        )
    if A.ndim not in (2, 4) or B.ndim != A.ndim or B.shape[1] != A.shape[0] or (B.ndim == 4 and B.shape[2:] != (1, 1)):
        raise ValueError(
            f"{path}: {prefix} has factor shapes {shapes}; expected linear A (r, in), B (out, r) or conv "
            "A (r, in, kh, kw), B (out, r, 1, 1)."
        )


def _check_duplicates(parsed: LieFile) -> None:
    lie = {m.ref for m in parsed.section("lie")}
    both = sorted(m.ref for m in parsed.section("lora") if m.ref in lie)
    if both:
        raise ValueError(f"{parsed.path}: {both[0]} appears in both the LoRA and the Lie section.")


def _apply_lie_metadata(parsed: LieFile) -> None:
    """Alpha and mode from the `lie_diffusion` metadata; its ranks and targets must agree with the tensors."""
    info, path = parsed.info, parsed.path
    overrides, targets = info.get("overrides") or {}, info.get("targets")
    well_formed = isinstance(overrides, dict) and all(isinstance(v, dict) for v in overrides.values())
    if targets is not None:
        well_formed &= isinstance(targets, dict) and all(
            isinstance(t, dict) and all(isinstance(names, list) for names in t.values()) for t in targets.values()
        )
    if not well_formed:
        raise ValueError(f"{path}: '{METADATA_KEY}' overrides/targets are malformed (see docs/FORMAT.md).")
    if info.get("balance", "none") not in BALANCES:
        raise ValueError(f"{path}: unknown balance {info['balance']!r} in the metadata; expected one of {BALANCES}.")
    for module in parsed.modules:
        values = {"rank": info.get("rank"), "alpha": info.get("alpha"), "mode": info.get("mode")}
        values.update(overrides.get(module.ref, {}))
        if values["rank"] != module.rank:
            raise ValueError(
                f"{path}: {module.key_prefix} has rank {module.rank} (lora_A {tuple(module.A.shape)}) but the "
                f"metadata says rank {values['rank']}."
            )
        alpha = values["alpha"]
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"{path}: {module.key_prefix} has invalid alpha {alpha!r} in the metadata.")
        module.alpha = float(alpha)
        if module.section == "lie":
            if values["mode"] not in MODES:
                raise ValueError(
                    f"{path}: {module.key_prefix} has Lie mode {values['mode']!r}; expected one of {MODES}."
                )
            module.mode = values["mode"]
    if targets is not None:
        listed = {(c, s, m) for c, sections in targets.items() for s, names in sections.items() for m in names}
        present = {(m.component, m.section, m.module) for m in parsed.modules}
        mismatched = sorted(listed ^ present)
        if mismatched:
            component, section, name = mismatched[0]
            prefix = (LIE_PREFIX if section == "lie" else "") + f"{component}.{name}"
            if mismatched[0] in listed:
                raise ValueError(
                    f"{path}: the metadata lists {prefix} but the file has no factors for it (truncated?)."
                )
            raise ValueError(f"{path}: {prefix} has factors but is not among the metadata's targets.")


def _apply_lora_metadata(parsed: LieFile) -> None:
    """A plain LoRA file: alpha from diffusers' metadata when present (peft pattern rules), else alpha = rank."""
    for module in parsed.modules:
        module.alpha = float(module.rank)
        config = {
            k.removeprefix(f"{module.component}."): v
            for k, v in (parsed.lora_metadata or {}).items()
            if k.startswith(f"{module.component}.")
        }
        unsupported = [option for option in ("use_dora", "use_rslora", "lora_bias") if config.get(option)]
        if unsupported:
            raise ValueError(
                f"{parsed.path}: the {module.component} LoRA uses {unsupported}; load it with pipe.load_lora_weights."
            )
        if "lora_alpha" in config:
            module.alpha = float(config["lora_alpha"])
        for pattern, alpha in (config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module.module):
                module.alpha = float(alpha)
                break


# ---------------------------------------------------------------------------------------------- loading


@dataclass
class _ComponentPlan:
    """How one model gets the file's modules: a LieConfig, per-module (rank, alpha), tensors by model name."""

    model: nn.Module
    config: LieConfig
    overrides: dict[str, tuple[int, float]]
    entries: dict[str, ModuleEntry]  # model module name -> entry


def _components_of(pipeline_or_model) -> dict[str, nn.Module]:
    if isinstance(pipeline_or_model, nn.Module):
        return {denoiser_component(pipeline_or_model): pipeline_or_model}
    models = {name: getattr(pipeline_or_model, name, None) for name in COMPONENTS}
    models = {name: model for name, model in models.items() if isinstance(model, nn.Module)}
    if not models:
        raise TypeError(
            "load_lie_weights expects a UNet, a Flux/SD3 transformer or a pipeline with a unet/transformer/"
            f"text_encoder, got {type(pipeline_or_model).__name__}."
        )
    return models


def _resolve_module(name: str, modules: dict[str, nn.Module]) -> str | None:
    """The model's name for a file's module name; CLIP text encoders differ in a leading `text_model.` by version."""
    for candidate in (name, name.removeprefix("text_model."), f"text_model.{name}"):
        if candidate in modules:
            return candidate
    return None


def _expected_shapes(layer: nn.Module, rank: int) -> tuple[tuple, tuple] | None:
    if isinstance(layer, nn.Conv2d):
        return (rank, layer.in_channels // layer.groups, *layer.kernel_size), (layer.out_channels, rank, 1, 1)
    if isinstance(layer, nn.Linear):
        return (rank, layer.in_features), (layer.out_features, rank)
    return None


def _fingerprint_diff(parsed: LieFile, model: nn.Module | None, component: str = "unet") -> str:
    saved = ((parsed.info or {}).get("fingerprint") or {}).get(component)
    if not saved or model is None:
        return ""
    current = model_fingerprint(model)
    diffs = [f"{k} {saved[k]} (file) vs {current[k]} (model)" for k in saved if k in current and saved[k] != current[k]]
    return "; ".join(diffs)


def _check_model_class(parsed: LieFile, models: dict[str, nn.Module]) -> None:
    """A file saved for one transformer class (Flux, SD3) never loads into another, even where names and shapes fit."""
    saved = (((parsed.info or {}).get("fingerprint") or {}).get("transformer") or {}).get("_class_name")
    model = models.get("transformer")
    if saved and model is not None and "transformer" in parsed.components and saved != denoiser_class(model):
        raise ValueError(f"{parsed.path}: the file was saved for a {saved}; this transformer is a "
                         f"{type(model).__name__}.")


def _plan(
    parsed: LieFile, models: dict[str, nn.Module], adapter_name: str, scale: float = 1.0
) -> dict[str, _ComponentPlan]:
    """Check every module of the file against the models (at strength `scale`); raise before anything is changed."""
    path, problems = parsed.path, []
    _check_model_class(parsed, models)
    balance = (parsed.info or {}).get("balance", "none")  # the file's label, the same for every component
    plans = {}
    for component in parsed.components:
        if component not in models:
            continue
        model = models[component]
        if adapter_name in (getattr(model, "peft_config", None) or {}):
            raise ValueError(f"{component} already has an adapter named {adapter_name!r}; choose another adapter_name.")
        modules = dict(model.named_modules())
        entries, linear_sections = {}, set()
        for entry in parsed.modules:
            if entry.component != component:
                continue
            name = _resolve_module(entry.module, modules)
            if name is None:
                problems.append(f"{entry.key_prefix}: {component} has no module {entry.module!r}")
                continue
            if name in entries:
                problems.append(f"{entry.key_prefix}: {component}.{name} is given twice (with and without text_model.)")
                continue
            layer = unwrap_layer(modules[name])
            expected = _expected_shapes(layer, entry.rank)
            if expected is None:
                problems.append(
                    f"{entry.key_prefix}: {component}.{name} is a {type(layer).__name__}, not Linear/Conv2d"
                )
                continue
            if (tuple(entry.A.shape), tuple(entry.B.shape)) != expected:
                problems.append(
                    f"{entry.key_prefix}: factor shapes lora_A {tuple(entry.A.shape)}, lora_B {tuple(entry.B.shape)} "
                    f"do not fit {type(layer).__name__} {tuple(layer.weight.shape)} "
                    f"(expected {expected[0]}, {expected[1]})"
                )
                continue
            if entry.section == "lora" and isinstance(layer, nn.Conv2d):
                problems.append(
                    f"{entry.key_prefix}: LoRA factors on a Conv2d are not supported here (convolutions take Lie "
                    "adapters); load plain conv-LoRA files with pipe.load_lora_weights"
                )
                continue
            check_adapted_finite(path, entry, layer.weight, scale)
            entries[name] = entry
            if isinstance(layer, nn.Linear):
                linear_sections.add(entry.section)
        if len(linear_sections) > 1:
            problems.append(
                f"{component}: the file mixes LoRA and Lie adapters on Linear layers, which one adapter cannot hold"
            )
        if entries:
            plans[component] = _component_plan(model, entries, lie_linear="lie" in linear_sections, balance=balance)
    diff = "; ".join(filter(None, (_fingerprint_diff(parsed, models.get(c), c) for c in DENOISERS)))
    if problems:
        hint = f" The file was saved for another base model: {diff}." if diff else ""
        shown = "; ".join(problems[:5]) + (f"; ... (+{len(problems) - 5} more)" if len(problems) > 5 else "")
        raise ValueError(f"{path}: does not fit the model: {shown}.{hint}")
    if not plans:
        raise ValueError(
            f"{path}: holds adapters for {parsed.components} but the target has only {sorted(models)}; nothing to load."
        )
    skipped = [c for c in parsed.components if c not in models]
    if skipped:
        warnings.warn(f"{path}: the target has no {skipped}; their adapters were not loaded.", stacklevel=3)
    if diff:
        warnings.warn(f"{path}: the file was saved for a base model with a different config ({diff}).", stacklevel=3)
    return plans


@torch.no_grad()
def check_adapted_finite(path, entry: ModuleEntry, weight: torch.Tensor, scale: float = 1.0) -> None:
    """Refuse a module whose adapted weight, W ⊙ M(t·sΔ) (Lie) or W + t·sBA (LoRA), would not be finite in W's
    dtype: a huge alpha or a corrupted factor loads without complaint and then renders NaN images.

    The Cauchy–Schwarz bound |Δᵢⱼ| ≤ |s|·‖Bᵢ‖·‖Aⱼ‖ clears sound files from the factors alone; only a module
    near the edge has its adapted weight built (once, in float32) and checked element by element.
    """
    if weight.is_meta:  # offloaded (accelerate's sequential offload): the values are not here to check
        return
    s = scale * entry.scaling
    bound = abs(s) * entry.B.flatten(1).norm(dim=1).max().item() * entry.A.flatten(1).norm(dim=0).max().item()
    largest = weight.detach().float().abs().max().item()  # float(): hosts may hold fp8 weights
    if entry.section == "lora":
        worst = largest + bound
    else:
        # max(·, 1): the multiplier itself must be finite too, or a zero in W gives 0 · inf = NaN
        worst = max(largest, 1.0) * (math.exp(min(bound, 700.0)) if entry.mode == "exp" else 1 + bound)
    limit = torch.finfo(weight.dtype).max
    if worst <= limit:
        return
    base = weight.detach().to("cpu", torch.float32)
    if entry.section == "lora":
        adapted = base + lie_delta(entry.A, entry.B, s, weight.shape)
    else:
        adapted = base * lie_multiplier([LieFactor(entry.A, entry.B, s, entry.mode)], weight.shape)
    bad = (~(adapted.abs() <= limit)).sum().item()  # NaN compares False
    if bad:
        raise ValueError(
            f"{path}: {entry.key_prefix}: the adapted weight {tuple(weight.shape)} would hold {bad} NaN/inf value(s) "
            f"in {weight.dtype} at strength {scale:g} (alpha {entry.alpha:g}, rank {entry.rank}, "
            f"|sΔ| ≤ {bound:.3g}); the file is corrupt or its alpha is wrong."
        )


def _component_plan(model: nn.Module, entries: dict[str, ModuleEntry], lie_linear: bool,
                    balance: str) -> _ComponentPlan:
    """Every module gets its file (rank, alpha) as an override: the balancing rule is never applied again."""
    reference = [e for e in entries.values() if e.section == "lie"] or list(entries.values())
    first = reference[0]
    convs = sorted(n for n in entries if isinstance(unwrap_layer(model.get_submodule(n)), nn.Conv2d))
    linears = sorted(n for n in entries if n not in convs)
    config = LieConfig(
        rank=first.rank,
        alpha=first.alpha,
        mode=first.mode or "exp",
        balance=balance,
        attn_adapter=("lie" if lie_linear else "lora") if linears else "none",
        conv_targets=tuple(re.escape(n) for n in convs),
        attn_targets=tuple(re.escape(n) for n in linears),
    )
    found = find_targets(model, config)
    if (sorted(found[0]), sorted(found[1])) != (convs, linears):
        raise RuntimeError(f"lie-diffusion: target selection mismatch for {sorted(entries)} (please report).")
    overrides = {name: (entry.rank, entry.alpha) for name, entry in entries.items()}
    return _ComponentPlan(model, config, overrides, entries)


def load_lie_weights(
    pipeline_or_unet, path_or_dir, adapter_name: str = "default", scale: float = 1.0, *, weight_name=None
):
    """Load an adapter file (both sections) into a pipeline, a UNet or a Flux/SD3 transformer as `adapter_name`.

    `path_or_dir`: a .safetensors file, a directory holding one, or a `LieFile` from `read_lie_file`.

    The whole file is checked against the model first; on any error the model is left exactly as it
    was. `scale` multiplies the adapter's alpha/rank scaling, like the weights of `set_adapters`.
    Returns the parsed file.
    """
    parsed = path_or_dir if isinstance(path_or_dir, LieFile) else read_lie_file(path_or_dir, weight_name)
    plans = _plan(parsed, _components_of(pipeline_or_unet), adapter_name, scale)
    trainable = {c: [(p, p.requires_grad) for p in plan.model.parameters()] for c, plan in plans.items()}
    injected = []
    try:
        for component, plan in plans.items():
            add_lie_adapters(plan.model, plan.config, adapter_name, overrides=plan.overrides)
            injected.append(component)
            _fill(plan, adapter_name, scale)
    except BaseException:
        for component in injected:
            remove_adapter(plans[component].model, adapter_name)
        for flags in trainable.values():
            for param, flag in flags:
                param.requires_grad_(flag)
        raise
    return parsed


@torch.no_grad()
def _fill(plan: _ComponentPlan, adapter_name: str, scale: float) -> None:
    for name, entry in plan.entries.items():
        layer = plan.model.get_submodule(name)
        layer.lora_A[adapter_name].weight.copy_(entry.A)
        layer.lora_B[adapter_name].weight.copy_(entry.B)
        if entry.section == "lie":
            layer.lie_mode[adapter_name] = entry.mode
        layer.set_scale(adapter_name, scale)
