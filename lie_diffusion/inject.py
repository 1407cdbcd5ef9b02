"""Which modules get which adapter: `LieConfig` → peft LoRA config with Lie layers registered.

One adapter name covers two groups: Conv2d targets get Lie adapters, Linear targets ("attn") get
standard LoRA, Lie, or nothing. Both live in one peft config, so diffusers' adapter controls
(`set_adapters`, `fuse_lora`, `delete_adapters`, ...) treat the pair as one adapter.

A target preset per model family names both groups: on UNets the convs (Lie) and the attention
projections (LoRA); on diffusion transformers (Flux.1, SD3/SD3.5), which are Linear layers almost
throughout, the Linear group itself takes Lie adapters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Iterable

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .functional import BALANCES, MODES, balance_factor
from .layers import LieLayerMixin, LieLoraConfig, unwrap_layer

# Targets are regexes matched against the end of a module's dotted name ("resnets.*.conv1" matches
# "down_blocks.0.resnets.1.conv1"). Conv targets select among nn.Conv2d modules, attention targets
# among nn.Linear modules, so one preset serves both the UNet and the CLIP text encoder.
RESNET_CONV_TARGETS = (r"resnets\.\d+\.conv1", r"resnets\.\d+\.conv2", r"resnets\.\d+\.conv_shortcut")
SAMPLER_CONV_TARGETS = (r"downsamplers\.0\.conv", r"upsamplers\.0\.conv")
CONV_TARGETS = RESNET_CONV_TARGETS + SAMPLER_CONV_TARGETS
UNET_ATTN_TARGETS = (r"attn[12]\.to_q", r"attn[12]\.to_k", r"attn[12]\.to_v", r"attn[12]\.to_out\.0")
TEXT_ENCODER_ATTN_TARGETS = (r"self_attn\.q_proj", r"self_attn\.k_proj", r"self_attn\.v_proj", r"self_attn\.out_proj")
ATTN_TARGETS = UNET_ATTN_TARGETS + TEXT_ENCODER_ATTN_TARGETS
ATTN_ADAPTERS = ("lora", "lie", "none")

# Diffusion transformers (diffusers' FluxTransformer2DModel, SD3Transformer2DModel). diffusers' DreamBooth LoRA
# scripts target the joint attention (image and context projections) of every block, and on Flux also the
# feed-forwards; as there, "attn." leaves out SD3.5's second self-attention "attn2.".
DIT_ATTN_TARGETS = (r"attn\.to_[qkv]", r"attn\.to_out\.0", r"attn\.add_[qkv]_proj", r"attn\.to_add_out")
DIT_FF_TARGETS = (r"ff\.net\.0\.proj", r"ff\.net\.2", r"ff_context\.net\.0\.proj", r"ff_context\.net\.2")
# Every Linear inside the blocks, as kohya's Flux network: + attn2, the single blocks' MLP in/out, the modulations.
DIT_BLOCK_LINEAR_TARGETS = DIT_ATTN_TARGETS + DIT_FF_TARGETS + (
    r"attn2\.to_[qkv]", r"attn2\.to_out\.0",
    r"proj_mlp", r"single_transformer_blocks\.\d+\.proj_out",
    r"norm1\.linear", r"norm1_context\.linear", r"single_transformer_blocks\.\d+\.norm\.linear",
)
# + the layers outside the blocks: patch and text embedders, time/guidance/pooled-text embedders, the output.
DIT_ALL_LINEAR_TARGETS = DIT_BLOCK_LINEAR_TARGETS + (
    r"x_embedder", r"context_embedder", r"time_text_embed\..+", r"norm_out\.linear", r"proj_out",
)
SD3_PATCH_CONV_TARGETS = (r"pos_embed\.proj",)  # SD3 embeds 2x2 patches with a stride-2 conv: a Lie kernel


@dataclass(frozen=True)
class TargetPreset:
    """A family's named choice of targets, and the adapter its Linear group gets unless the config says."""

    family: str
    conv_targets: tuple[str, ...]
    attn_targets: tuple[str, ...]
    attn_adapter: str
    description: str


# Text encoders (CLIP) keep their attention targets under every preset; T5 encoders match none of them.
PRESETS = {
    "unet": TargetPreset("unet", CONV_TARGETS, ATTN_TARGETS, "lora",
                         "ResNet and sampler convs (Lie), attention projections (LoRA)"),
    "flux": TargetPreset("flux", (), DIT_ATTN_TARGETS + DIT_FF_TARGETS + TEXT_ENCODER_ATTN_TARGETS, "lie",
                         "diffusers' DreamBooth LoRA targets: joint attention incl. context projections, "
                         "feed-forwards"),
    "flux-attn": TargetPreset("flux", (), DIT_ATTN_TARGETS + TEXT_ENCODER_ATTN_TARGETS, "lie",
                              "attention only: the joint attention incl. context projections (no feed-forwards)"),
    "flux-all-linear": TargetPreset("flux", (), DIT_BLOCK_LINEAR_TARGETS + TEXT_ENCODER_ATTN_TARGETS, "lie",
                                    "every Linear in the double and single blocks (kohya's Flux network)"),
    "flux-all": TargetPreset("flux", (), DIT_ALL_LINEAR_TARGETS + TEXT_ENCODER_ATTN_TARGETS, "lie",
                             "every Linear of the transformer, embedders and output layer included"),
    "sd3": TargetPreset("sd3", (), DIT_ATTN_TARGETS + TEXT_ENCODER_ATTN_TARGETS, "lie",
                        "diffusers' DreamBooth LoRA targets: joint attention incl. context projections"),
    "sd3-all-linear": TargetPreset("sd3", (), DIT_BLOCK_LINEAR_TARGETS + TEXT_ENCODER_ATTN_TARGETS, "lie",
                                   "every Linear in the joint blocks (SD3.5's attn2, modulations, feed-forwards)"),
    "sd3-all": TargetPreset("sd3", SD3_PATCH_CONV_TARGETS, DIT_ALL_LINEAR_TARGETS + TEXT_ENCODER_ATTN_TARGETS, "lie",
                            "every Linear of the transformer and the patch-embedding conv pos_embed.proj"),
}
# The preset a model gets when its config names none. Provisional for the transformers: diffusers' targets,
# until a measurement on a pretrained tiny DiT picks one.
DEFAULT_PRESETS = {"UNet2DConditionModel": "unet", "FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3"}


def denoiser_class(model: nn.Module) -> str | None:
    """The diffusers denoiser class `model` is (or subclasses), by name; None for anything else (text encoders)."""
    return next((c.__name__ for c in type(model).__mro__ if c.__name__ in DEFAULT_PRESETS), None)


def model_family(model: nn.Module) -> str | None:
    """"unet", "flux" or "sd3" for the denoisers lie-diffusion knows; None for anything else (text encoders)."""
    name = denoiser_class(model)
    return PRESETS[DEFAULT_PRESETS[name]].family if name else None


@dataclass
class LieConfig:
    """What to adapt and how. `alpha=None` means alpha = rank; attention rank/alpha default to these.

    `preset` names the targets (see `PRESETS`): None picks the model's family default ("unet" for UNets and
    CLIP text encoders, "flux" / "sd3" — diffusers' DreamBooth targets — for the transformers). `conv_targets`,
    `attn_targets` and `attn_adapter` left at None come from the preset; given, they replace its choice. The
    "attn" group is every targeted Linear layer: on the transformers, feed-forwards and modulations included.

    `balance` scales each Lie adapter's alpha by a factor of its own kernel (`functional.balance_factor`):
    with "rms" (the default) one learning rate moves Lie kernels as far as LoRA ones, so the Lie convs
    and the LoRA attention of one adapter train well together. The resulting per-module alphas are what
    the adapter uses and what its file stores; "none" keeps alpha / rank as in LoRA.
    """

    rank: int = 4
    alpha: float | None = None
    mode: str = "exp"
    balance: str = "rms"
    attn_adapter: str | None = None
    attn_rank: int | None = None
    attn_alpha: float | None = None
    conv_targets: tuple[str, ...] | None = None
    attn_targets: tuple[str, ...] | None = None
    dropout: float = 0.0
    preset: str | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"LieConfig.mode must be one of {MODES}, got {self.mode!r}.")
        if self.balance not in BALANCES:
            raise ValueError(f"LieConfig.balance must be one of {BALANCES}, got {self.balance!r}.")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"LieConfig.preset must be one of {sorted(PRESETS)} or None, got {self.preset!r}.")
        if self.attn_adapter is not None and self.attn_adapter not in ATTN_ADAPTERS:
            raise ValueError(f"LieConfig.attn_adapter must be one of {ATTN_ADAPTERS}, got {self.attn_adapter!r}.")
        for name in ("rank", "attn_rank"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"LieConfig.{name} must be a positive integer, got {value!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LieConfig.dropout must be in [0, 1), got {self.dropout!r}.")
        # A lone string is one pattern (tuple("conv1") would be five one-letter patterns).
        self.conv_targets, self.attn_targets = _as_patterns(self.conv_targets), _as_patterns(self.attn_targets)
        for pattern in (self.conv_targets or ()) + (self.attn_targets or ()):
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"LieConfig target {pattern!r} is not a valid regex: {error}.") from None

    def resolved(self, model: nn.Module) -> "LieConfig":
        """This config for `model`: the preset (given, or the model's default) fills what is left at None.

        A preset of another family than the model's is refused (text encoders take any preset)."""
        family = model_family(model)
        name = self.preset or DEFAULT_PRESETS.get(denoiser_class(model), "unet")
        preset = PRESETS[name]
        if family is not None and preset.family != family:
            choices = sorted(n for n, p in PRESETS.items() if p.family == family)
            raise ValueError(f"LieConfig preset {name!r} is for {preset.family} models, not {type(model).__name__}; "
                             f"choose one of {choices}.")
        return replace(
            self,
            preset=name,
            conv_targets=preset.conv_targets if self.conv_targets is None else self.conv_targets,
            attn_targets=preset.attn_targets if self.attn_targets is None else self.attn_targets,
            attn_adapter=preset.attn_adapter if self.attn_adapter is None else self.attn_adapter,
        )

    @property
    def conv_rank_alpha(self) -> tuple[int, float]:
        return self.rank, float(self.rank if self.alpha is None else self.alpha)

    @property
    def attn_rank_alpha(self) -> tuple[int, float]:
        rank = self.attn_rank or self.rank
        alpha = self.attn_alpha if self.attn_alpha is not None else self.alpha
        return rank, float(rank if alpha is None else alpha)


def _as_patterns(targets: str | Iterable[str] | None) -> tuple[str, ...] | None:
    if targets is None:
        return None
    return (targets,) if isinstance(targets, str) else tuple(targets)


def _suffix_regex(patterns: Iterable[str]) -> re.Pattern | None:
    patterns = list(patterns)
    return re.compile(r"(?:.*\.)?(?:" + "|".join(f"(?:{p})" for p in patterns) + ")") if patterns else None


def find_targets(model: nn.Module, config: LieConfig) -> tuple[list[str], list[str]]:
    """(conv module names, attention module names) that `config` selects in `model`."""
    config = config.resolved(model)
    conv_re = _suffix_regex(config.conv_targets)
    attn_re = _suffix_regex(config.attn_targets if config.attn_adapter != "none" else ())
    convs, attns, tuner_prefix = [], [], None
    for name, module in model.named_modules():
        if tuner_prefix and name.startswith(tuner_prefix):
            continue  # the parts of an adapted layer (base_layer, lora_A, ...) are never targets themselves
        if isinstance(module, BaseTunerLayer):
            tuner_prefix = name + "."
        base = unwrap_layer(module)
        if isinstance(base, nn.Conv2d) and conv_re is not None and conv_re.fullmatch(name):
            convs.append(name)
        elif isinstance(base, nn.Linear) and attn_re is not None and attn_re.fullmatch(name):
            attns.append(name)
    return convs, attns


def build_peft_config(config: LieConfig, convs: list[str], attns: list[str], overrides=None) -> LieLoraConfig:
    """The peft config for `config` on the given modules. `overrides` maps module → (rank, alpha)."""
    rank, alpha = config.conv_rank_alpha
    per_module = {name: config.attn_rank_alpha for name in attns}
    per_module.update(overrides or {})
    rank_pattern = {re.escape(n): r for n, (r, a) in per_module.items() if r != rank}
    alpha_pattern = {re.escape(n): a for n, (r, a) in per_module.items() if a != alpha}
    peft_config = LieLoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=config.dropout,
        target_modules=sorted(convs + attns),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        init_lora_weights=True,
        lie_mode=config.mode,
        lie_linear=config.attn_adapter == "lie",
        lie_scaling_rule=config.balance,
    )
    return peft_config


def balanced_overrides(model: nn.Module, config: LieConfig, convs: list[str], attns: list[str],
                       overrides=None) -> dict[str, tuple[int, float]]:
    """`overrides` plus (rank, alpha × balance factor of its kernel) for every other Lie module."""
    result = dict(overrides or {})
    lie_modules = [(n, config.conv_rank_alpha) for n in convs]
    if config.attn_adapter == "lie":
        lie_modules += [(n, config.attn_rank_alpha) for n in attns]
    for name, (rank, alpha) in lie_modules:
        if name not in result:
            weight = unwrap_layer(model.get_submodule(name)).weight
            result[name] = (rank, alpha * balance_factor(weight, config.balance))
    return result


def _check_targets(model: nn.Module, config: LieConfig, convs, attns, adapter_name: str, overrides) -> None:
    if not convs and not attns:
        raise ValueError(
            f"LieConfig (preset {config.preset!r}) selects no module of {type(model).__name__}: "
            f"conv_targets={config.conv_targets} matched no nn.Conv2d and attn_targets={config.attn_targets} "
            f"(attn_adapter={config.attn_adapter!r}) no nn.Linear."
        )
    if adapter_name in (getattr(model, "peft_config", None) or {}):
        raise ValueError(f"{type(model).__name__} already has an adapter named {adapter_name!r}.")
    for name, (rank, _) in (overrides or {}).items():
        if name not in convs and name not in attns:
            raise ValueError(f"overrides name {name!r}, which the LieConfig does not target in {type(model).__name__}.")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise ValueError(f"overrides give {name} rank {rank!r}; ranks are positive integers.")
    modules = dict(model.named_modules())
    wants_lie = set(convs) | (set(attns) if config.attn_adapter == "lie" else set())
    for name in convs + attns:
        module = modules[name]
        if isinstance(module, LoraLayer) and module.lora_A and isinstance(module, LieLayerMixin) != (name in wants_lie):
            have, want = ("Lie", "plain LoRA") if isinstance(module, LieLayerMixin) else ("plain LoRA", "Lie")
            raise ValueError(
                f"{name} already carries {have} adapters {list(module.lora_A)}; a {want} adapter cannot share the "
                "layer. Unload or delete the other adapters first."
            )


def add_lie_adapters(model: nn.Module, config: LieConfig, adapter_name: str = "default", overrides=None) -> nn.Module:
    """Inject adapter `adapter_name` into `model` in place; only adapter parameters stay trainable.

    Works on a diffusers UNet2DConditionModel (SD1.x/2.x/SDXL), FluxTransformer2DModel (Flux.1),
    SD3Transformer2DModel (SD3/SD3.5) and on a transformers CLIP text encoder. `overrides` maps module
    name → (rank, alpha) for modules that differ from `config`; their alphas are used as given (the
    balancing rule applies to the other Lie modules).
    The new factors are kept in float32 on a half-precision model (peft would cast them to the base
    dtype), so optimizer steps are not lost to rounding. On any error the model is left as it was.
    """
    config = config.resolved(model)
    convs, attns = find_targets(model, config)
    _check_targets(model, config, convs, attns, adapter_name, overrides)
    peft_config = build_peft_config(config, convs, attns, balanced_overrides(model, config, convs, attns, overrides))
    # Layers whose adapters were all deleted (e.g. diffusers' delete_adapters) are plain modules again.
    _replace_empty_tuner_layers(model, names=set(convs + attns))
    peft_loaded = getattr(model, "_hf_peft_config_loaded", None)
    try:
        if hasattr(model, "add_adapter"):
            model.add_adapter(peft_config, adapter_name=adapter_name)
        else:
            from peft import inject_adapter_in_model

            inject_adapter_in_model(peft_config, model, adapter_name)
    except Exception:
        remove_adapter(model, adapter_name)
        if peft_loaded is not None:  # diffusers' add_adapter sets this flag before injecting
            model._hf_peft_config_loaded = peft_loaded
        raise
    for name, param in model.named_parameters():
        is_new_factor = f".{adapter_name}." in name and (".lora_A." in name or ".lora_B." in name)
        if is_new_factor and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
        param.requires_grad_(is_new_factor)
    return model


def remove_adapter(model: nn.Module, adapter_name: str) -> None:
    """Delete `adapter_name` from every layer (and the model's peft config); emptied layers go back to plain."""
    for module in list(model.modules()):
        if isinstance(module, BaseTunerLayer) and adapter_name in getattr(module, "lora_A", {}):
            module.delete_adapter(adapter_name)
    _replace_empty_tuner_layers(model)
    peft_config = getattr(model, "peft_config", None)
    if peft_config is not None:
        peft_config.pop(adapter_name, None)
        if not peft_config:
            del model.peft_config
            if hasattr(model, "_hf_peft_config_loaded"):
                model._hf_peft_config_loaded = False


def _replace_empty_tuner_layers(model: nn.Module, merge: bool = False, names=None) -> None:
    for name, module in list(model.named_modules()):
        if not isinstance(module, BaseTunerLayer) or (module.lora_A and not merge):
            continue
        if names is not None and name not in names:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())


def _components(model_or_pipeline) -> list[nn.Module]:
    if isinstance(model_or_pipeline, nn.Module):
        return [model_or_pipeline]
    names = ("unet", "transformer", "text_encoder", "text_encoder_2")
    return [c for c in (getattr(model_or_pipeline, n, None) for n in names) if isinstance(c, nn.Module)]


def merge_lie_weights(model_or_pipeline, adapter_names: list[str] | None = None):
    """Fold adapters into the base weights and drop the adapter layers (in place; returns the input).

    Lie: W ← W ⊙ M(sΔ); LoRA: W ← W + sBA, with each adapter's current scale (`set_adapters`).
    `adapter_names=None` merges the active adapters. The result holds plain nn.Conv2d / nn.Linear
    modules, so `save_pretrained` writes a stock model.
    """
    for model in _components(model_or_pipeline):
        tuner_layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        for layer in tuner_layers:
            if not layer.disable_adapters:
                layer.merge(adapter_names=adapter_names)
        _replace_empty_tuner_layers(model, merge=True)
        if getattr(model, "peft_config", None) is not None:
            del model.peft_config
            if hasattr(model, "_hf_peft_config_loaded"):
                model._hf_peft_config_loaded = False
    return model_or_pipeline
