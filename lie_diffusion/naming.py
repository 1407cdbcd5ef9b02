"""kohya names of lie-diffusion modules: the one place every room that speaks kohya reads (export, hosts).

SD1.x/2.x UNets use kohya's diffusers-style names (`lora_unet_down_blocks_0_resnets_0_conv1`), which
diffusers, ComfyUI, Forge and A1111 all map. SDXL uses the SGM/LDM names kohya trains with
(`lora_unet_input_blocks_4_0_in_layers_2`), which A1111 needs for SDXL. Text encoders: `lora_te_`
(SD1/2), `lora_te1_` / `lora_te2_` (SDXL).
"""

from __future__ import annotations

import re

# diffusers ResnetBlock2D submodule -> SGM/LDM ResBlock submodule
_RESNET_TO_SGM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP_LEVEL_TO_SGM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# The CLIP modules kohya names and ComfyUI maps: per encoder layer, attention projections and the MLP.
_TEXT_MODULE_RE = re.compile(r"text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])")
_KOHYA_PREFIX = {"sd": {"text_encoder": "lora_te"}, "sdxl": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}}


def is_sdxl(unet_config) -> bool:
    """SDXL UNets condition on pooled text + image sizes ("text_time"); SD1/2 do not."""
    return unet_config.get("addition_embed_type") == "text_time"


def unet_name_to_sgm(name: str, unet_config) -> str:
    """The SGM/LDM (`input_blocks` / `middle_block` / `output_blocks`) name of a diffusers UNet module."""
    per_block = unet_config["layers_per_block"]
    if not isinstance(per_block, int):
        raise ValueError(f"SGM names need one layers_per_block for every block; this UNet has {per_block}.")
    for diffusers_name, sgm in _TOP_LEVEL_TO_SGM.items():
        if name == diffusers_name or name.startswith(diffusers_name + "."):
            return sgm + name[len(diffusers_name):]
    parts = name.split(".")
    if parts[0] == "down_blocks" and len(parts) > 4:
        block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "downsamplers":  # the sampler is its own input block, after the block's layers
            return f"input_blocks.{(block + 1) * (per_block + 1)}.0.op" + _tail(rest[1:])
        return f"input_blocks.{1 + block * (per_block + 1) + index}." + _inner(kind, rest, name)
    if parts[0] == "mid_block" and len(parts) > 3:
        kind, index, rest = parts[1], int(parts[2]), parts[3:]
        position = 1 if kind == "attentions" else 2 * index  # resnet, transformer, resnet
        return f"middle_block.{position}." + _inner(kind, rest, name, sequential=True)
    if parts[0] == "up_blocks" and len(parts) > 4:
        block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        first = block * (per_block + 1)
        if kind == "upsamplers":  # inside the block's last output block, after its resnet (and transformer)
            with_attention = unet_config["up_block_types"][block].startswith("CrossAttn")
            return f"output_blocks.{first + per_block}.{2 if with_attention else 1}.conv" + _tail(rest[1:])
        return f"output_blocks.{first + index}." + _inner(kind, rest, name)
    raise ValueError(f"UNet module {name!r} has no SGM name (not part of the SD/SDXL UNet layout).")


def _tail(rest: list[str]) -> str:
    return "".join("." + part for part in rest)


def _inner(kind: str, rest: list[str], name: str, sequential: bool = False) -> str:
    """A resnet's or transformer's submodule path inside one SGM block."""
    if kind == "resnets":
        sub = ".".join(rest)
        for diffusers_sub, sgm_sub in _RESNET_TO_SGM.items():
            if sub == diffusers_sub or sub.startswith(diffusers_sub + "."):
                return ("" if sequential else "0.") + sgm_sub + sub[len(diffusers_sub):]
        raise ValueError(f"UNet module {name!r}: unknown resnet part {sub!r}.")
    if kind == "attentions":
        return ("" if sequential else "1.") + ".".join(rest)
    raise ValueError(f"UNet module {name!r}: unknown block part {kind!r}.")


def kohya_name(component: str, module: str, unet_config, sgm_unet: bool = False) -> str:
    """The kohya key stem of a module (`lora_unet_…`, `lora_te_…`, `lora_te1_…`, `lora_te2_…`).

    UNet modules get SGM names for SDXL, as kohya trains them, and diffusers names otherwise; `sgm_unet` asks for
    SGM names for SD 1.x/2.x too (A1111 maps diffusers names as if every block had SD's two layers)."""
    family = "sdxl" if is_sdxl(unet_config) else "sd"
    if component == "unet":
        name = unet_name_to_sgm(module, unet_config) if family == "sdxl" or sgm_unet else module
        return "lora_unet_" + name.replace(".", "_")
    prefix = _KOHYA_PREFIX[family].get(component)
    if prefix is None:
        raise ValueError(f"{component}.{module}: an {family.upper()} pipeline has no {component}.")
    module = module if module.startswith("text_model.") else "text_model." + module
    if not _TEXT_MODULE_RE.fullmatch(module):
        raise ValueError(
            f"{component}.{module}: kohya names cover a text encoder's attention projections and MLP only."
        )
    return f"{prefix}_" + module.replace(".", "_")


# ----------------------------------------------------------------------------------------------- models
