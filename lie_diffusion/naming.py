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


# ------------------------------------------------------------------------------ kohya names -> modules
# The reverse of `kohya_name`, for files written in kohya names (lie_diffusion.kohya in sd-scripts) that `io` reads
# and the network module places. A key stem is the dotted path with "." replaced by "_"; the identifiers below keep
# their own "_" when the dots come back.
_UNDERSCORED = frozenset(
    part
    for name in (*_RESNET_TO_SGM, *_RESNET_TO_SGM.values(), *_TOP_LEVEL_TO_SGM, *_TOP_LEVEL_TO_SGM.values())
    for part in name.split(".") if "_" in part
) | {"down_blocks", "up_blocks", "mid_block", "input_blocks", "middle_block", "output_blocks", "transformer_blocks",
     "to_q", "to_k", "to_v", "to_out", "proj_in", "proj_out", "text_model", "self_attn", "q_proj", "k_proj", "v_proj",
     "out_proj"}
_LONGEST = max(part.count("_") + 1 for part in _UNDERSCORED)
_SGM_ROOTS = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out")


def _dotted(flat: str) -> str:
    """`down_blocks_0_resnets_0_conv_shortcut` -> `down_blocks.0.resnets.0.conv_shortcut` (longest known match)."""
    words, parts, i = flat.split("_"), [], 0
    while i < len(words):
        for n in range(min(_LONGEST, len(words) - i), 0, -1):
            joined = "_".join(words[i:i + n])
            if n == 1 or joined in _UNDERSCORED:
                parts.append(joined)
                i += n
                break
    return ".".join(parts)


def sgm_name_to_unet(name: str, unet_config) -> str:
    """The diffusers name of an SGM/LDM UNet module (the inverse of `unet_name_to_sgm`)."""
    per_block = unet_config["layers_per_block"]
    if not isinstance(per_block, int):
        raise ValueError(f"SGM names need one layers_per_block for every block; this UNet has {per_block}.")
    for diffusers_name, sgm in _TOP_LEVEL_TO_SGM.items():
        if name == sgm or name.startswith(sgm + "."):
            return diffusers_name + name[len(sgm):]
    parts = name.split(".")
    try:
        if parts[0] == "input_blocks" and len(parts) > 3 and int(parts[1]) > 0:
            block, index = divmod(int(parts[1]) - 1, per_block + 1)
            if block < len(unet_config["down_block_types"]) and index == per_block and parts[2:4] == ["0", "op"]:
                return f"down_blocks.{block}.downsamplers.0.conv" + _tail(parts[4:])
            if block < len(unet_config["down_block_types"]) and index < per_block:
                return f"down_blocks.{block}." + _outer(int(parts[2]), index, parts[3:], name)
        if parts[0] == "middle_block" and len(parts) > 2 and parts[1] in ("0", "1", "2"):
            position = int(parts[1])
            if position == 1:
                return "mid_block.attentions.0" + _tail(parts[2:])
            return f"mid_block.resnets.{position // 2}." + _resnet_part(parts[2:], name)
        if parts[0] == "output_blocks" and len(parts) > 3 and int(parts[1]) < len(unet_config["up_block_types"]) * (
                per_block + 1):
            block, index = divmod(int(parts[1]), per_block + 1)
            with_attention = unet_config["up_block_types"][block].startswith("CrossAttn")
            if index == per_block and parts[2] == str(2 if with_attention else 1) and parts[3] == "conv":
                return f"up_blocks.{block}.upsamplers.0.conv" + _tail(parts[4:])
            return f"up_blocks.{block}." + _outer(int(parts[2]), index, parts[3:], name)
    except (ValueError, IndexError):
        pass
    raise ValueError(f"UNet module {name!r} has no diffusers name (not part of the SD/SDXL UNet layout).")


def _outer(position: int, index: int, rest: list[str], name: str) -> str:
    """Position 0 of an SGM block is its resnet, position 1 its transformer."""
    if position == 0:
        return f"resnets.{index}." + _resnet_part(rest, name)
    if position == 1:
        return f"attentions.{index}" + _tail(rest)
    raise ValueError(f"UNet module {name!r}: unknown SGM block part {position}.")


def _resnet_part(rest: list[str], name: str) -> str:
    sub = ".".join(rest)
    for diffusers_sub, sgm_sub in _RESNET_TO_SGM.items():
        if sub == sgm_sub or sub.startswith(sgm_sub + "."):
            return diffusers_sub + sub[len(sgm_sub):]
    raise ValueError(f"UNet module {name!r}: unknown resnet part {sub!r}.")


def module_of_kohya_name(stem: str, unet_config) -> tuple[str, str]:
    """(component, diffusers module name) of a kohya key stem: the inverse of `kohya_name`, for SD 1.x/2.x (diffusers
    or SGM UNet names) and SDXL. Raises, naming the stem, for a name `kohya_name` would not give."""
    family = "sdxl" if is_sdxl(unet_config) else "sd"
    prefixes = {"unet": "lora_unet"} | {component: prefix for component, prefix in _KOHYA_PREFIX[family].items()}
    for component, prefix in prefixes.items():
        if stem.startswith(prefix + "_"):
            path = _dotted(stem[len(prefix) + 1:])
            sgm = component == "unet" and path.split(".")[0] in _SGM_ROOTS
            try:
                module = sgm_name_to_unet(path, unet_config) if sgm else path
                if component == "unet" and not sgm:  # a diffusers name: it must have a place in the layout too
                    sgm_name_to_unet(unet_name_to_sgm(module, unet_config), unet_config)
                if kohya_name(component, module, unet_config, sgm_unet=sgm) == stem:
                    return component, module
            except (ValueError, KeyError, IndexError):
                pass
            break
    family_name = "SDXL" if family == "sdxl" else "SD 1.x/2.x"
    raise ValueError(f"{stem}: not a kohya name of an {family_name} UNet or text encoder module this file format "
                     "covers.")


# The factor keys of a file in kohya names: LoRA modules as kohya writes them (every kohya/LyCORIS loader reads
# them), Lie modules under names no such loader takes for LoRA; every module has its `<stem>.alpha`.
KOHYA_SECTIONS = {"lora": ("lora_down", "lora_up"), "lie": ("lie_down", "lie_up")}
_KOHYA_KEY_RE = re.compile(r"(?P<stem>lora_(?:unet|te[12]?)_[A-Za-z0-9_]+)\.(?:(?P<kind>lora|lie)_(?P<factor>down|up)"
                           r"\.weight|alpha)")


def parse_kohya_key(key: str) -> tuple[str, str | None, str] | None:
    """(stem, section, "A" | "B" | "alpha") of a key in a kohya-named file (section None for `.alpha`), else None."""
    match = _KOHYA_KEY_RE.fullmatch(key)
    if match is None:
        return None
    if match["kind"] is None:
        return match["stem"], None, "alpha"
    return match["stem"], match["kind"], "A" if match["factor"] == "down" else "B"
