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

import warnings
from dataclasses import dataclass, field

import torch
from peft import LoraConfig
from peft.tuners.lora import layer as lora_layer
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .functional import MODES, LieFactor, lie_conv2d, lie_linear, lie_multiplier


@dataclass
class LieLoraConfig(LoraConfig):
    """A peft `LoraConfig` whose Conv2d (and, on request, Linear) targets get Lie adapters.

    `lie_mode` selects the group update ("exp") or its first-order form ("taylor"). Use
    `lie_diffusion.LieConfig` + `add_lie_adapters` rather than building this by hand.
    """

    lie_mode: str = field(default="exp", metadata={"help": "Lie update: 'exp' (W ⊙ exp Δ) or 'taylor' (W + W ⊙ Δ)."})


def unwrap_layer(module: nn.Module) -> nn.Module:
    """The plain module under a peft tuner layer (or the module itself when it is not adapted)."""
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


class LieLayerMixin:
    """Forward / merge / unmerge of Lie adapters; shared by the conv and linear layers."""

    other_param_names = lora_layer.LoraLayer.other_param_names + ("lie_mode",)

    @property
    def lora_variants(self):
        # No LoRA variant (DoRA, aLoRA, ...) has a Lie meaning: peft refuses any that a config requests.
        return {(): None}

    def _check_supported(self, config: LoraConfig, name: str) -> None:
        mode = getattr(config, "lie_mode", None)
        if mode not in MODES:
            raise ValueError(
                f"{name}: this layer carries Lie adapters and cannot take adapter config "
                f"{type(config).__name__} with lie_mode={mode!r}; Lie modes are {MODES}. "
                "Plain LoRA and Lie adapters cannot share one layer."
            )
        unsupported = [key for key in ("use_dora", "lora_bias") if getattr(config, key)]
        # Other inits (PiSSA, OLoRA, ...) rewrite W additively as W - sBA, which is wrong for W ⊙ M.
        if config.init_lora_weights not in (True, False, "gaussian"):
            unsupported.append(f"init_lora_weights={config.init_lora_weights!r}")
        if unsupported:
            raise ValueError(f"{name}: Lie adapters do not support {unsupported}.")

    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
        self._check_supported(config, kwargs.get("target_name") or type(self.get_base_layer()).__name__)
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        if not hasattr(self, "lie_mode"):
            self.lie_mode: dict[str, str] = {}
        self.lie_mode[adapter_name] = config.lie_mode

    def _factor(self, adapter: str, scaling: float | None = None, train_dropout: bool = False) -> LieFactor:
        A = self.lora_A[adapter].weight
        if train_dropout:
            A = self.lora_dropout[adapter](A)
        scaling = self.scaling[adapter] if scaling is None else scaling
        return LieFactor(A, self.lora_B[adapter].weight, scaling, self.lie_mode[adapter])

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("Lie layers do not support per-sample `adapter_names` (mixed-batch inference).")
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        unmerged = [a for a in self.active_adapters if a in self.lora_A and a not in self.merged_adapters]
        if not unmerged:
            return self.base_layer(x, *args, **kwargs)
        return self._lie_forward(x, [self._factor(a, train_dropout=True) for a in unmerged])

    def _multiplier(self, adapter: str, scaling: float) -> torch.Tensor:
        return lie_multiplier([self._factor(adapter, scaling)], self.get_base_layer().weight.shape)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """W ← W ⊙ M(sΔ) for each adapter, in float32 at least; the scaling used is remembered, so
        unmerge is exact even when `set_adapters` changes the scale in between."""
        weight = self.get_base_layer().weight
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A:
                continue
            scaling = self.scaling[adapter]
            merged = (weight * self._multiplier(adapter, scaling)).to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaN/inf detected while merging Lie adapter {adapter!r}; the adapter seems broken.")
            weight.copy_(merged)
            self._caches[f"lie_merged_scaling-{adapter}"] = scaling
            self.merged_adapters.append(adapter)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Divide the merged multipliers back out, last merged first. An adapter deleted while merged
        stays baked into W (as with peft's LoRA layers)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            scaling = self._caches.pop(f"lie_merged_scaling-{adapter}", None)
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

    def _lie_forward(self, x, factors):
        conv = self.get_base_layer()
        padding = (0, 0) if conv.padding == "valid" else conv.padding
        if conv.padding_mode != "zeros":
            x = nn.functional.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            padding = (0, 0)
        return lie_conv2d(x, conv.weight, conv.bias, factors, conv.stride, padding, conv.dilation, conv.groups)


class LieLinear(LieLayerMixin, lora_layer.Linear):
    """A Linear with Lie adapters: one matmul with W ⊙ M(Δ)."""

    def _lie_forward(self, x, factors):
        linear = self.get_base_layer()
        return lie_linear(x, linear.weight, linear.bias, factors)
