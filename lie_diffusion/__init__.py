"""lie-diffusion: Lie-group adapters (LieRA) for diffusers' Stable Diffusion UNets, Flux.1 and SD3/SD3.5
transformers and CLIP encoders."""

from .combine import combine_lie_files
from .functional import LieFactor, lie_conv2d, lie_delta, lie_linear, lie_multiplier, lie_update, lie_weight
from .inject import PRESETS, LieConfig, add_lie_adapters, merge_lie_weights
from .io import load_lie_weights, read_lie_file, save_lie_weights
from .layers import LieConv2d, LieLinear, LieLoraConfig, set_lie_speed_options, set_lie_weight_cache_budget

__version__ = "0.1.0"

__all__ = [
    "LieConfig",
    "LieConv2d",
    "LieFactor",
    "LieLinear",
    "LieLoraConfig",
    "PRESETS",
    "add_lie_adapters",
    "combine_lie_files",
    "lie_conv2d",
    "lie_delta",
    "lie_linear",
    "lie_multiplier",
    "lie_update",
    "lie_weight",
    "load_lie_weights",
    "merge_lie_weights",
    "read_lie_file",
    "save_lie_weights",
    "set_lie_speed_options",
    "set_lie_weight_cache_budget",
]
