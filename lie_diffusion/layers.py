"""Lie adapter layers for nn.Conv2d and nn.Linear, as peft LoRA tuner layers.

Subclassing peft's `lora.Conv2d` / `lora.Linear` keeps peft's factor modules (`lora_A`, `lora_B`),
init (A random, B zero: W' = W at step 0), dropout, scaling and adapter bookkeeping, so diffusers'
`fuse_lora`, `set_adapters`, `disable_adapters`, `delete_adapters` and peft's state-dict helpers act
on these layers unchanged. What changes is what an adapter *does*: forward, merge and unmerge apply
W' = W ⊙ M(Δ) (see `functional`) instead of W + BA.

Dropout acts on the factor A (entries of Δ's row space are dropped, rescaled by 1/(1-p)), the Lie
analogue of LoRA's input dropout that keeps the forward to one op.
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import warnings
import weakref
from dataclasses import dataclass, field

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraModel
from peft.tuners.lora import layer as lora_layer
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .functional import (BALANCES, MODES, LieFactor, _compute_dtype, _without_autocast, lie_conv2d, lie_linear,
                         lie_multiplier, lie_weight)


# The peft_type a LieLoraConfig writes to adapter_config.json. Stock peft looks it up among its own types and
# fails with this text (a KeyError) instead of silently rebuilding a plain LoraConfig without the Lie fields.
LIE_PEFT_TYPE = "LIE_LORA (lie-diffusion: load with config=lie_diffusion.LieLoraConfig.from_pretrained(path))"


@dataclass
class LieLoraConfig(LoraConfig):
    """A peft `LoraConfig` whose Conv2d (and, with `lie_linear`, Linear) targets get Lie adapters.

    `lie_mode` selects the group update ("exp") or its first-order form ("taylor"). The config
    registers its own layer classes, so `get_peft_model` / `add_adapter` / copies / configs read
    back from JSON always build Lie layers. Use `lie_diffusion.LieConfig` + `add_lie_adapters`
    rather than building this by hand.
    """

    # First of the Lie fields on purpose: stock `LoraConfig(**config.to_dict())` (diffusers' loaders) fails
    # with "unexpected keyword argument 'lie_diffusion'" rather than building plain LoRA layers.
    lie_diffusion: int = field(default=1, metadata={"help": "Marks a lie-diffusion config (version of its fields)."})
    # Tagged as a LoRA variant: peft's own LoRA layers refuse a config that requests a variant they lack, so an
    # existing plain LoRA layer fails loudly instead of taking a Lie adapter as additive LoRA.
    lie_mode: str = field(
        default="exp",
        metadata={"help": "Lie update: 'exp' (W ⊙ exp Δ) or 'taylor' (W + W ⊙ Δ).", "is_lora_variant": True},
    )
    lie_linear: bool = field(
        default=False, metadata={"help": "Linear targets get Lie adapters too (else LoRA that remembers merge scales)."}
    )
    # LieConfig.balance; named to sort after `lie_diffusion` too (diffusers writes configs with sorted keys).
    lie_scaling_rule: str = field(
        default="none",
        metadata={"help": "The balance rule that set the Lie modules' alphas (already in alpha_pattern)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.lie_mode not in MODES:
            raise ValueError(f"LieLoraConfig.lie_mode must be one of {MODES}, got {self.lie_mode!r}.")
        if self.lie_scaling_rule not in BALANCES:
            raise ValueError(f"LieLoraConfig.lie_scaling_rule must be one of {BALANCES}, "
                             f"got {self.lie_scaling_rule!r}.")
        self._register_custom_module({nn.Conv2d: LieConv2d, nn.Linear: LieLinear if self.lie_linear else LoraLinear})

    def to_dict(self) -> dict:
        return {**super().to_dict(), "peft_type": LIE_PEFT_TYPE}

    @classmethod
    def from_peft_type(cls, **kwargs):
        if kwargs.get("peft_type") == LIE_PEFT_TYPE:
            kwargs.pop("peft_type")
        return super().from_peft_type(**kwargs)


class WeightCacheBudget:
    """How many bytes of cached W' (unfused inference) all Lie layers together may hold on one device.

    Each cached W' is an extra copy of its layer's weight: on an SD UNet that is a GiB or two, on Flux's
    12 B-parameter transformer it would double the model. Layers cache in the order they are called until
    the budget is spent; the others rebuild W' on every call (no extra memory), and a warning says so
    once per device and budget. A cached W' counts until the tensor is freed, however that happens.
    """

    def __init__(self, limit: int | None):
        self.limit = limit
        self.held: collections.Counter[str] = collections.Counter()  # bytes per device
        self._warned: set[str] = set()

    def admit(self, nbytes: int, device: torch.device) -> bool:
        """Whether a new cached W' of `nbytes` on `device` fits; warn (once) when it does not."""
        device = str(device)
        if self.limit is None or self.held[device] + nbytes <= self.limit:
            return True
        if device not in self._warned:
            self._warned.add(device)
            warnings.warn(
                f"lie-diffusion: the W' cache of unfused Lie inference is full on {device} "
                f"({self.held[device] / 2**20:,.2f} MiB held, budget {self.limit / 2**20:,.2f} MiB): layers beyond it "
                "rebuild W' = W ⊙ M on every call instead of holding an extra copy of their weight (slower, no extra "
                "memory). For the fastest inference fuse the adapters (`fuse_lora()`); to change the budget call "
                "`lie_diffusion.set_lie_weight_cache_budget(bytes)` (None: no limit).",
                stacklevel=2,
            )
        return False

    def hold(self, tensor: torch.Tensor) -> None:
        """Count `tensor` against its device's budget until it is freed."""
        device, nbytes = str(tensor.device), tensor.numel() * tensor.element_size()
        self.held[device] += nbytes
        weakref.finalize(tensor, self._release, device, nbytes)

    def _release(self, device: str, nbytes: int) -> None:
        self.held[device] -= nbytes

    def set_limit(self, limit: int | None) -> None:
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ValueError(f"The W' cache budget must be a number of bytes >= 0 or None, got {limit!r}.")
        self.limit = limit
        self._warned.clear()


# 3 GiB per device: every SD1.x/2.x and SDXL UNet with the default targets fits in fp16 and fp32 (SD1.5: 1.05 /
# 2.1 GiB); FLUX.1-dev (5.4 B weights under diffusers' DreamBooth targets, 10 GiB in bf16) gets a partial cache.
DEFAULT_WEIGHT_CACHE_BUDGET = 3 * 2**30
WEIGHT_CACHE_BUDGET = WeightCacheBudget(DEFAULT_WEIGHT_CACHE_BUDGET)


def set_lie_weight_cache_budget(nbytes: int | None = DEFAULT_WEIGHT_CACHE_BUDGET) -> None:
    """The most bytes of cached W' that Lie layers hold per device for unfused inference (None: no limit, 0:
    no cache). It applies to every model in the process; layers called first cache first, and caches already
    held stay until released (fuse, disable, move, delete the adapter, or `set_lie_speed_options`)."""
    WEIGHT_CACHE_BUDGET.set_limit(nbytes)


# Packages whose layer or weight classes store weights quantized; diffusers and transformers keep theirs (GGUF, ...)
# under a `quantizers` package.
QUANTIZATION_PACKAGES = ("bitsandbytes", "torchao", "optimum", "gguf", "hqq", "awq", "auto_gptq", "gptqmodel")


def weight_quantization(layer: nn.Module) -> str | None:
    """How `layer` stores its weight quantized, in words (e.g. "bitsandbytes Linear4bit, Params4bit weight,
    nf4"), or None for a plain floating-point weight."""
    weight = layer.weight
    for cls in (type(layer), type(weight)):
        path = cls.__module__.split(".")
        if path[0] in QUANTIZATION_PACKAGES or "quantizers" in path:
            details = [getattr(weight, key, None) for key in ("quant_type", "qtype")]
            return ", ".join([f"{path[0]} {type(layer).__name__}", f"{type(weight).__name__} weight",
                              *(str(d) for d in details if d is not None)])
    if not weight.dtype.is_floating_point or weight.dtype.itemsize == 1:
        return f"{weight.dtype} weight"
    return None


def _plain_weight(weight: torch.Tensor) -> bool:
    """The per-call fast check: a plain tensor of a 2-byte or wider floating dtype is never quantized."""
    return type(weight) in (nn.Parameter, torch.Tensor) and weight.is_floating_point() and weight.element_size() > 1


def unwrap_layer(module: nn.Module) -> nn.Module:
    """The plain module under a peft tuner layer (or the module itself when it is not adapted)."""
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def layer_class_for(config: LoraConfig, base_layer: nn.Module) -> type:
    """The tuner layer class peft builds for `base_layer` under `config`: a registered one, else its own."""
    for base_type, cls in (getattr(config, "_custom_modules", None) or {}).items():
        if isinstance(base_layer, base_type):
            return cls
    return lora_layer.Conv2d if isinstance(base_layer, nn.Conv2d) else lora_layer.Linear


def _weighted_adapter_call():
    """(LoraModel, adapters, combination_type) while peft's `add_weighted_adapter` builds an adapter, else None.

    That method fills the new factors itself after creating the layers; the layers' `update_layer` is the only
    point where lie-diffusion runs in between, so it looks up the call's arguments there.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is LoraModel.add_weighted_adapter.__code__:
            return frame.f_locals["self"], frame.f_locals["adapters"], frame.f_locals["combination_type"]
        frame = frame.f_back
    return None


class AdapterLayerMixin:
    """What lie-diffusion's tuner layers share: one kind of adapter per layer, exact unmerge.

    A layer holds either Lie or additive LoRA adapters. Once its last adapter is deleted (diffusers'
    `delete_adapters`), it takes the kind of the next adapter it gets. The scale an adapter was merged
    with is remembered, so unmerge is exact even when `set_adapters` changed the scale in between.
    """

    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
        name = kwargs.get("target_name") or type(self.get_base_layer()).__name__
        wanted, lie = layer_class_for(config, self.get_base_layer()), is_lie_class(type(self))
        # A Lie layer takes any LieLoraConfig adapter (the config's mapping decides only which layers it creates).
        if (lie and not isinstance(config, LieLoraConfig)) or (not lie and is_lie_class(wanted)):
            if self.lora_A:
                have, want = ("Lie", "plain LoRA") if lie else ("plain LoRA", "Lie")
                raise ValueError(
                    f"{name}: this layer carries {have} adapters {list(self.lora_A)} and cannot take a {want} adapter "
                    f"from {type(config).__name__}. Plain LoRA and Lie adapters cannot share one layer; delete the "
                    "other adapters first."
                )
            if getattr(self, "_kind_fixed", False):  # emptied since: same state, the other kind
                self.__class__ = wanted if is_lie_class(wanted) else additive_class(self.get_base_layer())
                self.__dict__.pop("lie_mode", None)
                return self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        checked = self._check_config(adapter_name, config, name)
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        self._kind_fixed = True
        self._register_adapter(adapter_name, checked)

    def _check_config(self, adapter_name: str, config: LoraConfig, name: str):
        """Raise for what these layers do not support; return what `_register_adapter` needs."""
        unsupported = [f.name for f in dataclasses.fields(config) if f.metadata.get("is_lora_variant")
                       and f.name != "lie_mode" and getattr(config, f.name)]
        unsupported += [key for key in ("lora_bias",) if getattr(config, key)]
        # Other inits (PiSSA, OLoRA, ...) rewrite W additively as W - sBA, which is wrong for W ⊙ M.
        if config.init_lora_weights not in (True, False, "gaussian"):
            unsupported.append(f"init_lora_weights={config.init_lora_weights!r}")
        if unsupported:
            kind = "Lie adapters" if is_lie_class(type(self)) else "lie-diffusion's LoRA layers"
            raise ValueError(f"{name}: {kind} do not support {unsupported}.")

    def _register_adapter(self, adapter_name: str, checked) -> None:
        pass

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs):
        return None  # variants are refused in update_layer; `lie_mode` is the base case here, not a variant

    def _remember_merge_scale(self, adapter: str) -> None:
        self._caches[f"merged_scaling-{adapter}"] = self.scaling[adapter]

    def _merge_scale(self, adapter: str) -> float:
        return self._caches.pop(f"merged_scaling-{adapter}", self.scaling.get(adapter))


class LieLayerMixin(AdapterLayerMixin):
    """Forward / merge / unmerge of Lie adapters; shared by the conv and linear layers.

    In state dicts (`model.state_dict()`, peft's `get_peft_model_state_dict`) lora_B carries one extra
    trailing dimension of size 1: a tool that takes the factors for plain LoRA (diffusers'
    `load_lora_weights`, peft without the LieLoraConfig) then fails on a shape mismatch instead of
    silently building an additive adapter. Loading reads both shapes.
    """

    other_param_names = lora_layer.LoraLayer.other_param_names + ("lie_mode",)
    # Speed switches (see `set_lie_speed_options`): reuse W' across no-grad calls, and keep W' from
    # forward for backward instead of rebuilding it.
    lie_weight_cache = True
    lie_keep_adapted = False
    _lie_cache = None  # (key, snapshots of the factors, W') of the last no-grad call

    def _check_config(self, adapter_name: str, config: LoraConfig, name: str) -> str:
        """The new adapter's mode: the config's, or that of the adapters add_weighted_adapter combines."""
        super()._check_config(adapter_name, config, name)
        self.lie_target_name = name
        self._check_unquantized()
        mode = getattr(config, "lie_mode", None)
        if mode not in MODES:
            raise ValueError(
                f"{name}: this layer carries Lie adapters and cannot take adapter config {type(config).__name__} "
                f"with lie_mode={mode!r}; Lie modes are {MODES}. Plain LoRA and Lie adapters cannot share one layer."
            )
        weighted = _weighted_adapter_call()
        return mode if weighted is None else self._combined_mode(name, adapter_name, *weighted)

    def _check_unquantized(self) -> None:
        """Refuse a quantized base weight: W' = W ⊙ M needs W itself, and W ⊙ M of packed bytes or of a
        quantized tensor's storage would be silently wrong."""
        base = self.get_base_layer()
        if torch.compiler.is_compiling() or _plain_weight(base.weight):
            return
        quantization = weight_quantization(base)
        if quantization is not None:
            raise ValueError(
                f"{self.lie_target_name}: Lie adapters need the layer's full-precision weight W (W' = W ⊙ exp(Δ)), but "
                f"it is quantized ({quantization}). Keep the adapted layers unquantized (e.g. diffusers' "
                "BitsAndBytesConfig(llm_int8_skip_modules=[...]) or TorchAoConfig(modules_to_not_convert=[...]), no "
                "fp8 layerwise casting on them), or load the base in bf16/fp16."
            )

    def _register_adapter(self, adapter_name: str, mode: str) -> None:
        if not hasattr(self, "lie_mode"):
            self.lie_mode: dict[str, str] = {}
        self.lie_mode[adapter_name] = mode

    def _combined_mode(self, name: str, new: str, lora_model, adapters, combination_type) -> str:
        """The mode of an adapter that `add_weighted_adapter` combines here, if the result is exact; else raise.

        `cat` concatenates factors, so Δ_new = Σ wᵢsᵢΔᵢ: exact for exp adapters (W ⊙ exp Σ wᵢsᵢΔᵢ is their
        product) and for a single taylor adapter; the other combination types mix additive deltas.
        """
        here = [a for a in adapters if a in self.lora_A]
        modes = sorted({self.lie_mode[a] for a in here})
        problem = None
        if combination_type != "cat":
            problem = f"combination_type={combination_type!r} combines additive LoRA deltas"
        elif len(modes) > 1:
            problem = f"it would give one mode to adapters {here} of modes {modes}"
        elif modes == ["taylor"] and len(here) > 1:
            problem = "taylor adapters would give 1 + Δ1 + Δ2, not (1 + Δ1)(1 + Δ2)"
        if problem is None:
            return modes[0] if modes else "exp"
        for module in lora_model.model.modules():  # leave the model as it was: drop what peft built so far
            if isinstance(module, BaseTunerLayer) and new in getattr(module, "lora_A", {}):
                module.delete_adapter(new)
        lora_model.peft_config.pop(new, None)
        raise ValueError(
            f"{name}: add_weighted_adapter cannot combine Lie adapters {here} exactly: {problem}. Exact cases: "
            "combination_type='cat' of exp adapters, or of adapters on different layers. Otherwise use "
            "set_adapters(names, weights), which composes Lie adapters exactly."
        )

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        if not kwargs.get("keep_vars", False) and not args:
            prefix = kwargs.get("prefix", "")
            for adapter in self.lora_B:
                key = f"{prefix}lora_B.{adapter}.weight"
                if key in state:
                    state[key] = state[key].unsqueeze(-1)
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for adapter in self.lora_B:
            key = f"{prefix}lora_B.{adapter}.weight"
            value = state_dict.get(key)
            if value is not None and value.ndim == self.lora_B[adapter].weight.ndim + 1 and value.shape[-1] == 1:
                state_dict[key] = value.squeeze(-1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _factor(self, adapter: str, scaling: float | None = None, train_dropout: bool = False) -> LieFactor:
        A = self.lora_A[adapter].weight
        dropout = self.lora_dropout[adapter]
        if train_dropout and not isinstance(dropout, nn.Identity):
            A = dropout(A)
        scaling = self.scaling[adapter] if scaling is None else scaling
        return LieFactor(A, self.lora_B[adapter].weight, scaling, self.lie_mode[adapter])

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("Lie layers do not support per-sample `adapter_names` (mixed-batch inference).")
        if self.disable_adapters:
            self._lie_cache = None
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        unmerged = [a for a in self.active_adapters if a in self.lora_A and a not in self.merged_adapters]
        if not unmerged:
            return self.base_layer(x, *args, **kwargs)
        self._check_unquantized()  # quantized after the adapter was added (torchao's quantize_, layerwise casting)
        factors = [self._factor(a, train_dropout=True) for a in unmerged]
        base = self.get_base_layer()
        cached = self._cached_weight(x, base, unmerged, factors)
        if cached is not None:
            with _without_autocast(x.device.type):  # in the dtype of W', as the op runs
                return self._run(x, base, cached)
        return self._lie_forward(x, base, factors)

    def _cached_weight(self, x: torch.Tensor, base: nn.Module, adapters: list[str],
                       factors: list[LieFactor]) -> torch.Tensor | None:
        """W' for a call that needs no grad, rebuilt only when something it depends on changed.

        None (build W' inside the op as usual, and drop any cached one) when grad is needed, dropout
        acts, torch.compile traces, the cache is off or its budget (`WEIGHT_CACHE_BUDGET`) is spent. The key holds W's storage, version (in-place
        updates), dtype and device, the adapters, scales, modes and the compute dtype; the factors are
        compared by value against small snapshots, so writes that bypass version counters
        (`param.data.copy_`, EMA swaps) are seen too.
        """
        if torch.compiler.is_compiling():
            return None
        weight = base.weight
        tensors = [x, weight, base.bias, *(t for f in factors for t in (f.A, f.B))]
        if (not self.lie_weight_cache
                or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))
                or (self.training and any(not isinstance(self.lora_dropout[a], nn.Identity) for a in adapters))):
            self._lie_cache = None  # e.g. training resumes after a no-grad validation pass: free the kernels
            return None
        dtype = _compute_dtype(x, weight)
        key = (tuple(adapters), tuple(f.scaling for f in factors), tuple(f.mode for f in factors),
               weight.data_ptr(), weight._version, weight.dtype, weight.device, dtype)
        factor_tensors = [t for f in factors for t in (f.A, f.B)]
        cache = self._lie_cache
        if cache is None or cache[0] != key or not all(
            old.shape == new.shape and old.dtype == new.dtype and old.device == new.device and torch.equal(old, new)
            for old, new in zip(cache[1], factor_tensors)
        ):
            self._lie_cache = None  # never two kernels at once
            if not WEIGHT_CACHE_BUDGET.admit(weight.numel() * dtype.itemsize, weight.device):
                return None
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):  # W' from float32 math, as the op
                cache = (key, [t.detach().clone() for t in factor_tensors], lie_weight(weight, factors, dtype))
            WEIGHT_CACHE_BUDGET.hold(cache[2])
            self._lie_cache = cache
        return cache[2]

    def _apply(self, fn, *args, **kwargs):
        self._lie_cache = None  # a dtype/device move: rebuilt where the weight now lives, old memory released
        return super()._apply(fn, *args, **kwargs)

    def delete_adapter(self, adapter_name: str) -> None:
        self._lie_cache = None
        super().delete_adapter(adapter_name)

    def _multiplier(self, adapter: str, scaling: float) -> torch.Tensor:
        return lie_multiplier([self._factor(adapter, scaling)], self.get_base_layer().weight.shape)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """W ← W ⊙ M(sΔ) for each adapter, in float32 at least; the scaling used is remembered, so
        unmerge is exact even when `set_adapters` changes the scale in between."""
        self._check_unquantized()
        weight = self.get_base_layer().weight
        self._lie_cache = None  # a fused layer needs no second kernel
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A:
                continue
            scaling = self.scaling[adapter]
            merged = lie_weight(weight, [self._factor(adapter, scaling)])
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaN/inf detected while merging Lie adapter {adapter!r}; the adapter seems broken.")
            weight.copy_(merged)
            self._remember_merge_scale(adapter)
            self.merged_adapters.append(adapter)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Divide the merged multipliers back out, last merged first. An adapter deleted while merged
        stays baked into W (as with peft's LoRA layers)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        weight = self.get_base_layer().weight
        self._lie_cache = None
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            scaling = self._merge_scale(adapter)
            if adapter in self.lora_A:
                weight.copy_(weight / self._multiplier(adapter, scaling))

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The additive equivalent W' - W = W ⊙ (M - 1), for tools that think in LoRA deltas."""
        weight = self.get_base_layer().weight
        return (weight * (self._multiplier(adapter, self.scaling[adapter]) - 1)).to(weight.dtype)


class LieConv2d(LieLayerMixin, lora_layer.Conv2d):
    """A Conv2d with Lie adapters: one convolution with W ⊙ M(Δ)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs) -> None:
        conv = unwrap_layer(base_layer)
        name = kwargs.get("target_name", "Conv2d")
        if conv.groups != 1:
            raise ValueError(f"{name}: Lie adapters support groups=1 convolutions only (got groups={conv.groups}).")
        if isinstance(conv.padding, str) and conv.padding != "valid":
            raise ValueError(f"{name}: Lie adapters need numeric padding (got padding={conv.padding!r}).")
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    def _lie_forward(self, x, conv, factors):
        padding = (0, 0) if conv.padding == "valid" else conv.padding
        if conv.padding_mode != "zeros":
            x = nn.functional.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            padding = (0, 0)
        return lie_conv2d(x, conv.weight, conv.bias, factors, conv.stride, padding, conv.dilation, conv.groups,
                          keep_adapted=self.lie_keep_adapted)

    def _run(self, x, conv, adapted):
        bias = None if conv.bias is None else conv.bias.to(adapted.dtype)
        return conv._conv_forward(x.to(adapted.dtype), adapted, bias)


class LieLinear(LieLayerMixin, lora_layer.Linear):
    """A Linear with Lie adapters: one matmul with W ⊙ M(Δ)."""

    def _lie_forward(self, x, linear, factors):
        return lie_linear(x, linear.weight, linear.bias, factors, keep_adapted=self.lie_keep_adapted)

    def _run(self, x, linear, adapted):
        bias = linear.bias
        return nn.functional.linear(x.to(adapted.dtype), adapted, None if bias is None else bias.to(adapted.dtype))


class AdditiveLoraMixin(AdapterLayerMixin):
    """peft's additive LoRA, for the layers lie-diffusion adapts with LoRA (attention projections, and
    emptied Lie layers that take a plain LoRA adapter).

    Two fixes over peft 0.21 under several adapters: unmerge subtracts what merge added even when
    `set_adapters` changed the scale in between, and active adapters that are not merged still act
    when another one is merged (peft then runs the base layer alone).
    """

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters or not self.merged or kwargs.get("adapter_names") is not None:
            return super().forward(x, *args, **kwargs)
        kwargs.pop("adapter_names", None)
        result = self.base_layer(x, *args, **kwargs)
        for adapter in self.active_adapters:
            if adapter in self.lora_A and adapter not in self.merged_adapters:
                A, B = self.lora_A[adapter], self.lora_B[adapter]
                delta = B(A(self.lora_dropout[adapter](self._cast_input_dtype(x, A.weight.dtype))))
                result = result + (delta * self.scaling[adapter]).to(result.dtype)
        return result

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter in self.lora_A:
                self._remember_merge_scale(adapter)
            super().merge(safe_merge=safe_merge, adapter_names=[adapter])

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            scaling = self._merge_scale(adapter)
            if adapter in self.lora_A:
                current, self.scaling[adapter] = self.scaling[adapter], scaling
                try:
                    weight.data -= self.get_delta_weight(adapter)
                finally:
                    self.scaling[adapter] = current


class LoraLinear(AdditiveLoraMixin, lora_layer.Linear):
    """Additive LoRA on a Linear (see `AdditiveLoraMixin`)."""


class LoraConv2d(AdditiveLoraMixin, lora_layer.Conv2d):
    """Additive LoRA on a Conv2d (see `AdditiveLoraMixin`)."""


def additive_class(base_layer: nn.Module) -> type:
    return LoraConv2d if isinstance(base_layer, nn.Conv2d) else LoraLinear


def is_lie_class(cls: type) -> bool:
    return issubclass(cls, LieLayerMixin)


def set_lie_speed_options(model: nn.Module, weight_cache: bool | None = None, keep_adapted: bool | None = None) -> int:
    """Set the speed switches of every Lie layer in `model` (None leaves one as it is); returns how many layers.

    `weight_cache` (default on): a call without grad reuses W' = W ⊙ M from the previous one while W, the
    factors, adapters, scales, dtype and device are unchanged, so unfused inference runs at the base
    model's speed. Memory: one extra kernel per adapted layer, the size of a fused model's weight, held
    until the layer is fused, disabled, moved, its adapter deleted or the cache switched off (released then),
    and never more than the per-device budget all layers share (`set_lie_weight_cache_budget`, 3 GiB by default).
    `keep_adapted` (default off): training saves W' for backward instead of rebuilding it, one extra kernel
    per adapted layer from its forward to its backward. Inside blocks under gradient checkpointing W' is
    always kept (it costs no memory across the step there; see `functional`), so the switch only
    changes the layers outside them.
    """
    layers = [m for m in model.modules() if isinstance(m, LieLayerMixin)]
    for layer in layers:
        if weight_cache is not None:
            layer.lie_weight_cache = weight_cache
            if not weight_cache:
                layer._lie_cache = None
        if keep_adapted is not None:
            layer.lie_keep_adapted = keep_adapted
    return len(layers)
