"""A network module for kohya-ss/sd-scripts: `--network_module lie_diffusion.kohya`.

train_network.py / sdxl_train_network.py (and gen_img.py, `--base_weights`, `--dim_from_weights`) import a
module and call `create_network` / `create_network_from_weights`; the network they get adapts kohya's own
models the way lie-diffusion's training script adapts diffusers' (the same `LieConfig` targets and per-layer
balancing): Lie adapters on the ResNet convs, shortcuts and samplers, LoRA (or Lie, or nothing) on the
attention projections of the UNet and the text encoders.

Like kohya's networks it replaces the `forward` of the layers it adapts and leaves the models' module trees
alone; each adapted layer runs ONE op with W' = W ⊙ M(t·sΔ) (`functional.lie_conv2d` / `lie_linear`), or
W x + t·s·B(A x) for LoRA, where t is the network's multiplier. It saves a lie-diffusion file in kohya names
(`io.write_lie_file(kohya=True)`), which every lie-diffusion reader loads, with sd-scripts' `ss_*` metadata.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .functional import BALANCES, MODES, LieFactor, balance_factor, lie_conv2d, lie_delta, lie_linear, lie_weight
from .inject import ATTN_ADAPTERS, LieConfig, _suffix_regex
from .io import ModuleEntry, read_lie_file, unet_fingerprint, write_lie_file
from .naming import KOHYA_SECTIONS, is_sdxl, kohya_name, sgm_name_to_unet

logger = logging.getLogger(__name__)

TEXT_ENCODER_COMPONENTS = ("text_encoder", "text_encoder_2")
# Full-size UNet layouts kohya's own (config-less) UNet classes hard-code, as diffusers configs describe them.
_CROSS_ATTN_DOWN, _CROSS_ATTN_UP = "CrossAttnDownBlock2D", "CrossAttnUpBlock2D"
_SD_LAYOUT = {
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "addition_embed_type": None,
    "down_block_types": [_CROSS_ATTN_DOWN] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + [_CROSS_ATTN_UP] * 3,
}
KOHYA_FINGERPRINTS = {
    "sd1": {**_SD_LAYOUT, "cross_attention_dim": 768, "use_linear_projection": False},
    "sd2": {**_SD_LAYOUT, "cross_attention_dim": 1024, "use_linear_projection": True},
    "sdxl": {
        "block_out_channels": [320, 640, 1280], "layers_per_block": 2, "cross_attention_dim": 2048,
        "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True, "addition_embed_type": "text_time",
        "down_block_types": ["DownBlock2D", _CROSS_ATTN_DOWN, _CROSS_ATTN_DOWN],
        "up_block_types": [_CROSS_ATTN_UP, _CROSS_ATTN_UP, "UpBlock2D"],
    },
}
# What a structure arg is when the network comes from a file: the file decides, an arg is only checked.
STRUCTURE_ARGS = ("conv_dim", "conv_alpha", "attn", "mode", "balance")


# ------------------------------------------------------------------------------------------ network_args


def _probability(name: str, value) -> float:
    number = _number(name, value)
    if not 0.0 <= number < 1.0:
        raise ValueError(f"network_args {name}={value!r}: expected a probability in [0, 1).")
    return number


def _number(name: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"network_args {name}={value!r}: expected a number.") from None
    if not math.isfinite(number):
        raise ValueError(f"network_args {name}={value!r}: expected a finite number.")
    return number


def _positive_int(name: str, value) -> int:
    try:
        number = int(str(value))
    except ValueError:
        raise ValueError(f"network_args {name}={value!r}: expected a positive integer.") from None
    if number <= 0:
        raise ValueError(f"network_args {name}={value!r}: expected a positive integer.")
    return number


def _choice(choices: tuple[str, ...]) -> Callable[[str, object], str]:
    def parse(name: str, value) -> str:
        if str(value) not in choices:
            raise ValueError(f"network_args {name}={value!r}: expected one of {', '.join(choices)}.")
        return str(value)
    return parse


NETWORK_ARGS: dict[str, Callable[[str, object], object]] = {
    "conv_dim": _positive_int,  # rank of the Lie (conv) adapters; default: --network_dim
    "conv_alpha": _number,  # their alpha before balancing; default: --network_alpha
    "attn": _choice(ATTN_ADAPTERS),  # what the attention projections get
    "mode": _choice(MODES),
    "balance": _choice(BALANCES),
    "dropout": _probability,  # sd-scripts' --network_dropout (it passes it here too)
    "rank_dropout": _probability,
    "module_dropout": _probability,
}


def parse_network_args(kwargs: dict) -> dict:
    """`--network_args` (strings, as sd-scripts passes them) → typed values; an unknown or malformed arg raises,
    naming it. A value None (sd-scripts' `dropout` when --network_dropout is not given) means the default."""
    unknown = sorted(set(kwargs) - set(NETWORK_ARGS))
    if unknown:
        raise ValueError(f"lie_diffusion.kohya: unknown network_args {', '.join(unknown)}; "
                         f"known: {', '.join(NETWORK_ARGS)}.")
    return {name: NETWORK_ARGS[name](name, value) for name, value in kwargs.items() if value is not None}


def lie_config(network_dim, network_alpha, args: dict) -> LieConfig:
    """The LieConfig of kohya's arguments, as the training script builds it: --network_dim/--network_alpha are the
    attention adapters' rank/alpha and the conv ones' defaults."""
    rank = _positive_int("network_dim", 4 if network_dim is None else network_dim)
    alpha = float(rank if network_alpha is None else _number("network_alpha", network_alpha))
    conv_rank = args.get("conv_dim", rank)
    return LieConfig(rank=conv_rank, alpha=args.get("conv_alpha", alpha), attn_rank=rank, attn_alpha=alpha,
                     mode=args.get("mode", "exp"), balance=args.get("balance", "rms"),
                     attn_adapter=args.get("attn", "lora"), dropout=args.get("dropout", 0.0))


# ----------------------------------------------------------------------------------------------- models


def unet_layout(unet: nn.Module) -> dict:
    """The diffusers config entries of kohya's UNet that decide module names (the file's UNet fingerprint).

    kohya's UNet classes have no config: they hard-code SD 1.x/2.x (told apart by the cross-attention width) or
    SDXL (SGM module names). A UNet that carries a diffusers config (a diffusers UNet has kohya's SD names)
    gives it."""
    config = getattr(unet, "config", None)
    if isinstance(config, dict) and "block_out_channels" in config:
        return unet_fingerprint(unet)
    if hasattr(unet, "input_blocks"):
        return dict(KOHYA_FINGERPRINTS["sdxl"])
    context = {m.in_features for n, m in unet.named_modules() if n.endswith("attn2.to_k") and isinstance(m, nn.Linear)}
    if context == {768}:
        return dict(KOHYA_FINGERPRINTS["sd1"])
    if context == {1024}:
        return dict(KOHYA_FINGERPRINTS["sd2"])
    raise ValueError(f"lie_diffusion.kohya: {type(unet).__name__} is not an SD 1.x/2.x or SDXL UNet (cross-attention "
                     f"widths {sorted(context)}); sd-scripts' Flux, SD3 and other trainers are not supported.")


def adaptable_layers(text_encoders: list[nn.Module], unet: nn.Module | None, layout: dict):
    """kohya name → (component, diffusers module name, layer) for every Linear / Conv2d kohya's naming covers."""
    models = list(zip(TEXT_ENCODER_COMPONENTS, text_encoders))
    if unet is not None:
        models.append(("unet", unet))
    sgm = unet is not None and hasattr(unet, "input_blocks")
    layers = {}
    for component, model in models:
        for name, layer in model.named_modules():
            if not isinstance(layer, (nn.Linear, nn.Conv2d)):
                continue
            try:
                if component == "unet":
                    module = sgm_name_to_unet(name, layout) if sgm else name
                else:  # CLIP modules sit under `text_model.` in the names kohya and the files use
                    module = name if name.startswith("text_model.") else "text_model." + name
                stem = kohya_name(component, module, layout)
            except ValueError:
                continue  # embeddings, norms' neighbours, ... that no kohya network names
            if component == "unet" and stem != "lora_unet_" + name.replace(".", "_"):
                raise RuntimeError(f"lie_diffusion.kohya: {name} would be saved as {stem}; kohya names it "
                                   f"lora_unet_{name.replace('.', '_')} (an unknown UNet layout: please report).")
            layers[stem] = (component, module, layer)
    return layers


# ---------------------------------------------------------------------------------------------- modules


class _Factor(nn.Module):
    """Holds one factor as `.weight`, so state dict keys read `<kohya name>.lie_down.weight` like the file."""

    def __init__(self, tensor: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(tensor)


class LieKohyaModule(nn.Module):
    """One adapted layer of kohya's models: Lie (W ⊙ M(t·sΔ)) or LoRA (W + t·s·BA), t the multiplier.

    `apply_to` makes it the layer's forward, as kohya's LoRA modules do. Dropout (sd-scripts' --network_dropout)
    acts on the factor A for Lie (the forward stays one op, as in lie-diffusion's layers) and on A x for LoRA
    (as kohya's LoRA); rank dropout drops whole rank components (for Lie once per step, not per sample);
    module dropout skips the adapter for a step."""

    def __init__(self, stem: str, component: str, module: str, layer: nn.Module, section: str, rank: int,
                 alpha: float, mode: str | None, multiplier: float = 1.0, dropout: float = 0.0,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0):
        super().__init__()
        if isinstance(layer, nn.Conv2d):
            if section == "lora":
                raise ValueError(f"{stem}: LoRA on a Conv2d is not supported here (convolutions take Lie adapters).")
            if layer.groups != 1 or isinstance(layer.padding, str) or layer.padding_mode != "zeros":
                raise ValueError(f"{stem}: Lie adapters need a groups=1 Conv2d with numeric zero padding.")
        self.lora_name, self.component, self.module, self.section, self.mode = stem, component, module, section, mode
        self.multiplier, self.enabled = float(multiplier), True
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        weight = layer.weight
        down = torch.empty(rank, *weight.shape[1:], dtype=torch.float32, device=weight.device)
        nn.init.kaiming_uniform_(down.view(rank, -1), a=math.sqrt(5))  # LoRA's init: W' = W at step 0
        up = torch.zeros(weight.shape[0], rank, *([1] * (weight.ndim - 2)), dtype=torch.float32, device=weight.device)
        down_name, up_name = KOHYA_SECTIONS[section]
        self.add_module(down_name, _Factor(down))
        self.add_module(up_name, _Factor(up))
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        self.alpha_value = float(self.alpha)  # the float the forward uses (no device sync per call)
        self._layer = [layer]  # a list: the base layer is no submodule, its weights are not the network's

    @property
    def down(self) -> torch.Tensor:
        return getattr(self, KOHYA_SECTIONS[self.section][0]).weight

    @property
    def up(self) -> torch.Tensor:
        return getattr(self, KOHYA_SECTIONS[self.section][1]).weight

    @property
    def layer(self) -> nn.Module:
        return self._layer[0]

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scaling(self) -> float:
        return self.multiplier * self.alpha_value / self.rank

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.alpha_value = float(self.alpha)

    def apply_to(self) -> None:
        self.org_forward = self.layer.forward
        self.layer.forward = self.forward

    def forward(self, x, *args, **kwargs):
        skip = self.training and self.module_dropout and torch.rand(()) < self.module_dropout
        if not self.enabled or self.multiplier == 0 or skip:
            return self.org_forward(x, *args, **kwargs)
        layer, down, scaling = self.layer, self.down, self.scaling
        if self.training and self.rank_dropout:
            keep = (torch.rand(self.rank, device=down.device) > self.rank_dropout).to(down.dtype)
            down = down * keep.view(-1, *([1] * (down.ndim - 1)))
            scaling = scaling / (1 - self.rank_dropout)
        if self.section == "lora":
            hidden = F.linear(x, down.to(x.dtype))
            hidden = F.dropout(hidden, self.dropout, self.training) if self.dropout else hidden
            return self.org_forward(x, *args, **kwargs) + F.linear(hidden, self.up.to(x.dtype)) * scaling
        if self.dropout:
            down = F.dropout(down, self.dropout, self.training)
        factors = [LieFactor(down, self.up, scaling, self.mode)]
        if isinstance(layer, nn.Conv2d):
            return lie_conv2d(x, layer.weight, layer.bias, factors, layer.stride, layer.padding, layer.dilation)
        return lie_linear(x, layer.weight, layer.bias, factors)

    @torch.no_grad()
    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W' at the current multiplier, in W's dtype: W ⊙ M(t·sΔ) or W + t·s·BA (computed in float32 at least)."""
        down, up = self.down.to(weight.device), self.up.to(weight.device)
        if self.section == "lie":
            return lie_weight(weight, [LieFactor(down, up, self.scaling, self.mode)])
        return (weight.float() + lie_delta(down, up, self.scaling, weight.shape)).to(weight.dtype)

    def entry(self) -> ModuleEntry:
        to_cpu = lambda t: t.detach().to("cpu", torch.float32).contiguous()  # noqa: E731
        return ModuleEntry(self.component, self.module, self.section, to_cpu(self.down), to_cpu(self.up),
                           self.alpha_value, self.mode)


# ---------------------------------------------------------------------------------------------- network


class LieNetwork(nn.Module):
    """What sd-scripts trains, saves, reloads and merges: one `LieKohyaModule` per adapted layer, registered
    under its kohya name (so `state_dict()` keys are the file's keys)."""

    def __init__(self, modules: list[LieKohyaModule], layout: dict, balance: str, multiplier: float = 1.0):
        super().__init__()
        self.layout, self.balance, self.multiplier = layout, balance, float(multiplier)
        for module in modules:
            self.add_module(module.lora_name, module)

    @property
    def text_encoder_loras(self) -> list[LieKohyaModule]:
        return [m for m in self.children() if m.component != "unet"]

    @property
    def unet_loras(self) -> list[LieKohyaModule]:
        return [m for m in self.children() if m.component == "unet"]

    # --- sd-scripts' contract (train_network.py, gen_img.py)

    def set_multiplier(self, multiplier: float) -> None:
        """t: Lie layers become W ⊙ M(t·sΔ) (exactly the model at strength t; -1 inverts), LoRA W + t·s·BA."""
        self.multiplier = float(multiplier)
        for module in self.children():
            module.multiplier = self.multiplier

    def set_enabled(self, is_enabled: bool) -> None:
        for module in self.children():
            module.enabled = bool(is_enabled)

    def apply_to(self, text_encoder, unet, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        for module in list(self.children()):
            if not (apply_unet if module.component == "unet" else apply_text_encoder):
                delattr(self, module.lora_name)
        logger.info(f"lie_diffusion.kohya: {len(self.text_encoder_loras)} text encoder and {len(self.unet_loras)} "
                    f"UNet modules ({sum(m.section == 'lie' for m in self.children())} Lie)")
        for module in self.children():
            module.apply_to()

    def load_weights(self, file):
        """Factors, alphas and modes of a lie-diffusion file (either naming) into this network; a module of the file
        that the network lacks, or of another rank or kind, raises naming the file (the modules of a part this run
        does not train, e.g. the text encoders with --network_train_unet_only, are left out). Returns torch's
        load report."""
        adapter = read_lie_file(file)
        state, mismatched = {}, []
        applied = {m.component for m in self.children()}
        left_out = sorted({e.component for e in adapter.modules} - applied)
        if left_out:  # e.g. --network_train_unet_only on a file with text encoder modules
            logger.warning(f"lie_diffusion.kohya: {adapter.path}: its {', '.join(left_out)} modules are not trained "
                           "in this run and are left out (also of the file it saves)")
        for entry in (e for e in adapter.modules if e.component in applied):
            stem = kohya_name(entry.component, entry.module, _file_layout(adapter, self.layout))
            module = getattr(self, stem, None) if stem in self._modules else None
            if module is None or module.section != entry.section or module.rank != entry.rank:
                have = "no such module" if module is None else f"a {module.section} module of rank {module.rank}"
                mismatched.append(f"{stem} ({entry.section}, rank {entry.rank}; the network has {have})")
                continue
            module.mode = entry.mode
            state.update(_state(stem, entry))
        if mismatched:
            shown = "; ".join(mismatched[:5]) + (f"; ... (+{len(mismatched) - 5} more)" if len(mismatched) > 5 else "")
            raise ValueError(f"{adapter.path}: does not fit this network: {shown}. Use --dim_from_weights to build "
                             "the network from the file.")
        return self.load_state_dict(state, strict=False)

    def save_weights(self, file, dtype, metadata) -> None:
        """A lie-diffusion file in kohya names: factors in `dtype` (sd-scripts' --save_precision; None: float32),
        sd-scripts' `metadata` (`ss_*`) beside lie-diffusion's, and the content hash."""
        if os.path.splitext(str(file))[1] != ".safetensors":
            raise ValueError(f"{file}: lie_diffusion.kohya saves .safetensors only (--save_model_as safetensors).")
        header = {k: str(v) for k, v in (metadata or {}).items()}
        write_lie_file(file, [m.entry() for m in self.children()], {"unet": self.layout}, self.balance, kohya=True,
                       header=header, dtype=dtype)

    def is_mergeable(self) -> bool:
        return True

    @torch.no_grad()
    def merge_to(self, text_encoder, unet, weights_sd, dtype=None, device=None) -> None:
        """Fold the network at its multiplier into the layers' weights (W ← W', exact up to W's dtype); the modules
        are not applied afterwards. `weights_sd`: this network's state dict (as `create_network_from_weights` gives)."""
        if weights_sd is not None:
            self.load_state_dict(weights_sd, strict=True)
        for module in self.children():
            weight = module.layer.weight
            merged = module.merged_weight(weight.detach().to(device or weight.device, torch.float32))
            weight.copy_(merged.to(weight.device, weight.dtype))
        logger.info(f"lie_diffusion.kohya: merged {len(self._modules)} modules at multiplier {self.multiplier:g}")

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr=None):
        """Parameter groups (text encoders, UNet) with their learning rates, and their descriptions for the logs.
        `text_encoder_lr` may be a list, one per text encoder (SDXL: --text_encoder_lr lr1 lr2). A group whose
        learning rate is 0 is left out (frozen), as in kohya's networks."""
        self.requires_grad_(True)
        te_lrs = text_encoder_lr if isinstance(text_encoder_lr, (list, tuple)) else [text_encoder_lr]
        te_lrs = list(te_lrs) or [None]
        parts = []
        for index, component in enumerate(TEXT_ENCODER_COMPONENTS):
            lr = te_lrs[min(index, len(te_lrs) - 1)]
            parts.append(("textencoder" + (str(index + 1) if self._is_sdxl else ""), component, lr))
        parts.append(("unet", "unet", unet_lr))
        groups, descriptions = [], []
        for description, component, lr in parts:
            params = [p for m in self.children() if m.component == component for p in m.parameters()]
            lr = default_lr if lr is None else lr
            if not params:
                continue
            if lr == 0:
                logger.info(f"lie_diffusion.kohya: learning rate 0 for {description}: not trained")
                continue
            groups.append({"params": params, **({} if lr is None else {"lr": lr})})
            descriptions.append(description)
        return groups, descriptions

    prepare_optimizer_params_with_multiple_te_lrs = prepare_optimizer_params

    @property
    def _is_sdxl(self) -> bool:
        return is_sdxl(self.layout)

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: the Lie op already keeps W' for backward inside checkpointed blocks."""

    def prepare_grad_etc(self, text_encoder, unet) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder, unet) -> None:
        self.train()

    def get_trainable_params(self):
        return self.parameters()

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm_value, device):
        """sd-scripts' --scale_weight_norms: scale both factors of a module whose ‖sΔ‖ (the Lie algebra element, or
        LoRA's update) exceeds `max_norm_value` back to it. Returns (modules scaled, mean norm, max norm)."""
        scaled, norms = 0, []
        for module in self.children():
            s = module.alpha_value / module.rank
            norm = lie_delta(module.down.to(device), module.up.to(device), s, (module.up.shape[0], -1)).norm().item()
            if norm > max_norm_value:
                ratio = math.sqrt(max_norm_value / norm)
                module.down.mul_(ratio)
                module.up.mul_(ratio)
                scaled, norm = scaled + 1, max_norm_value
            norms.append(norm)
        return scaled, sum(norms) / max(len(norms), 1), max(norms, default=0.0)

    # --- gen_img.py's --network_pre_calc: fold at the current multiplier, restore before the next one

    @torch.no_grad()
    def backup_weights(self) -> None:
        for module in self.children():
            module._backup = module.layer.weight.detach().clone()

    @torch.no_grad()
    def pre_calculation(self) -> None:
        for module in self.children():
            module.layer.weight.copy_(module.merged_weight(module.layer.weight))
            module.enabled = False

    @torch.no_grad()
    def restore_weights(self) -> None:
        for module in self.children():
            backup = getattr(module, "_backup", None)
            if backup is not None:
                module.layer.weight.copy_(backup)
            module.enabled = True

    def set_region(self, *args, **kwargs):
        raise NotImplementedError("lie_diffusion.kohya: regional prompts (gen_img's AND masks) are not supported.")


def _state(stem: str, entry: ModuleEntry) -> dict[str, torch.Tensor]:
    down, up = KOHYA_SECTIONS[entry.section]
    return {f"{stem}.{down}.weight": entry.A, f"{stem}.{up}.weight": entry.B,
            f"{stem}.alpha": torch.tensor(entry.alpha, dtype=torch.float32)}


def _file_layout(adapter, layout: dict) -> dict:
    """The UNet layout the file was saved for; it must be this network's (same family, same names)."""
    saved = ((adapter.info or {}).get("fingerprint") or {}).get("unet")
    if not saved:
        raise ValueError(f"{adapter.path}: not a lie-diffusion file with a UNet fingerprint; kohya cannot place it.")
    differs = [k for k in ("layers_per_block", "block_out_channels", "addition_embed_type", "down_block_types",
                           "up_block_types") if k in saved and k in layout and saved[k] != layout[k]]
    if differs:
        raise ValueError(f"{adapter.path}: saved for another UNet: " +
                         "; ".join(f"{k} {saved[k]} (file) vs {layout[k]} (this model)" for k in differs) + ".")
    return saved


def _text_encoders(text_encoder) -> list[nn.Module]:
    if text_encoder is None:
        return []
    return list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]


# ----------------------------------------------------------------------------------------- entry points


def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout=None, **kwargs):
    """sd-scripts' `create_network`: a fresh network for `--network_module lie_diffusion.kohya` (`kwargs`: the
    `--network_args`, strings). Lie alphas get the balancing rule from the base weights, as in training."""
    if "dropout" not in kwargs and neuron_dropout is not None:
        kwargs["dropout"] = neuron_dropout
    args = parse_network_args(kwargs)
    config = lie_config(network_dim, network_alpha, args).resolved(unet)
    layout = unet_layout(unet)
    conv_re = _suffix_regex(config.conv_targets)
    attn_re = _suffix_regex(config.attn_targets if config.attn_adapter != "none" else ())
    modules = []
    for stem, (component, name, layer) in adaptable_layers(_text_encoders(text_encoder), unet, layout).items():
        if isinstance(layer, nn.Conv2d) and conv_re is not None and conv_re.fullmatch(name):
            section, (rank, alpha) = "lie", config.conv_rank_alpha
        elif isinstance(layer, nn.Linear) and attn_re is not None and attn_re.fullmatch(name):
            section, (rank, alpha) = ("lie" if config.attn_adapter == "lie" else "lora"), config.attn_rank_alpha
        else:
            continue
        if section == "lie":
            alpha *= balance_factor(layer.weight, config.balance)
        alpha = float(torch.tensor(alpha, dtype=torch.float32))  # the value the file's .alpha tensor holds
        modules.append(LieKohyaModule(stem, component, name, layer, section, rank, alpha,
                                      config.mode if section == "lie" else None, multiplier, config.dropout,
                                      args.get("rank_dropout", 0.0), args.get("module_dropout", 0.0)))
    if not modules:
        raise ValueError("lie_diffusion.kohya: the network_args select no layer of these models.")
    logger.info(f"lie_diffusion.kohya: conv rank {config.rank} alpha {config.alpha} ({config.mode}, balance "
                f"{config.balance}), attention {config.attn_adapter} rank {config.attn_rank} alpha {config.attn_alpha}")
    return LieNetwork(modules, layout, config.balance, multiplier)


def create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False,
                                **kwargs):
    """sd-scripts' `create_network_from_weights`: the network a lie-diffusion file describes (modules, ranks,
    alphas, modes; either naming), filled with its factors, and its state dict (kohya keys) for `merge_to` /
    `load_state_dict`. `weights_sd` is ignored: the file holds the metadata the tensors alone lack."""
    args = parse_network_args(kwargs)
    ignored = [name for name in STRUCTURE_ARGS if name in args]
    if ignored:
        logger.warning(f"lie_diffusion.kohya: network_args {', '.join(ignored)} are taken from {file}, not the args")
    adapter = read_lie_file(file)
    layout = unet_layout(unet)
    file_layout = _file_layout(adapter, layout)
    layers = adaptable_layers(_text_encoders(text_encoder), unet, layout)
    modules, problems = [], []
    for entry in adapter.modules:
        stem = kohya_name(entry.component, entry.module, file_layout)
        component, name, layer = layers.get(stem, (None, None, None))
        shape = (entry.B.shape[0], *entry.A.shape[1:])
        if layer is None or tuple(layer.weight.shape) != shape:
            found = "no such layer" if layer is None else f"{type(layer).__name__} {tuple(layer.weight.shape)}"
            problems.append(f"{stem}: factors for {shape}, the model has {found}")
            continue
        modules.append(LieKohyaModule(stem, component, name, layer, entry.section, entry.rank, entry.alpha,
                                      entry.mode, multiplier, args.get("dropout", 0.0), args.get("rank_dropout", 0.0),
                                      args.get("module_dropout", 0.0)))
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... (+{len(problems) - 5} more)" if len(problems) > 5 else "")
        raise ValueError(f"{adapter.path}: does not fit these models: {shown}.")
    network = LieNetwork(modules, layout, (adapter.info or {}).get("balance", "none"), multiplier)
    state = {key: value for entry, module in zip(adapter.modules, modules)
             for key, value in _state(module.lora_name, entry).items()}
    network.load_state_dict(state, strict=True)
    return network, network.state_dict()
