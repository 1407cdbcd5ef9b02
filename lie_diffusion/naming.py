"""kohya names of lie-diffusion modules: the one place every room that speaks kohya reads (export, hosts).

SD1.x/2.x UNets use kohya's diffusers-style names (`lora_unet_down_blocks_0_resnets_0_conv1`), which
diffusers, ComfyUI, Forge and A1111 all map. SDXL uses the SGM/LDM names kohya trains with
(`lora_unet_input_blocks_4_0_in_layers_2`), which A1111 needs for SDXL. Text encoders: `lora_te_`
(SD1/2), `lora_te1_` / `lora_te2_` (SDXL).

Diffusion transformers (Flux.1, SD3/SD3.5): the hosts hold them in the original checkpoints' layout (BFL's Flux,
SAI's MMDiT), where one weight can hold several diffusers modules (`checkpoint_slot`), and read LoRA files in
diffusers' own names (`dit_host_name`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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


# ----------------------------------------------------------------------------------- diffusion transformers
# diffusers module -> (checkpoint module, part). `{}` is a block index. A part is the module's place in a fused
# weight: 0-2 q, k, v of a fused qkv (each `hidden` rows), 3 the MLP after them in Flux's single-block `linear1`
# (4 · hidden rows); SWAPPED: the same rows with its (scale, shift) halves in the checkpoint's (shift, scale) order
# (diffusers' AdaLayerNormContinuous); LAST_SWAPPED: swapped in the last block only (SD3's context_pre_only block).
SWAPPED, LAST_SWAPPED = "swapped", "swapped in the last block"
_FLUX_LAYOUT = {
    "transformer_blocks.{}.attn.to_q": ("double_blocks.{}.img_attn.qkv", 0),
    "transformer_blocks.{}.attn.to_k": ("double_blocks.{}.img_attn.qkv", 1),
    "transformer_blocks.{}.attn.to_v": ("double_blocks.{}.img_attn.qkv", 2),
    "transformer_blocks.{}.attn.add_q_proj": ("double_blocks.{}.txt_attn.qkv", 0),
    "transformer_blocks.{}.attn.add_k_proj": ("double_blocks.{}.txt_attn.qkv", 1),
    "transformer_blocks.{}.attn.add_v_proj": ("double_blocks.{}.txt_attn.qkv", 2),
    "transformer_blocks.{}.attn.to_out.0": ("double_blocks.{}.img_attn.proj", None),
    "transformer_blocks.{}.attn.to_add_out": ("double_blocks.{}.txt_attn.proj", None),
    "transformer_blocks.{}.norm1.linear": ("double_blocks.{}.img_mod.lin", None),
    "transformer_blocks.{}.norm1_context.linear": ("double_blocks.{}.txt_mod.lin", None),
    "transformer_blocks.{}.ff.net.0.proj": ("double_blocks.{}.img_mlp.0", None),
    "transformer_blocks.{}.ff.net.2": ("double_blocks.{}.img_mlp.2", None),
    "transformer_blocks.{}.ff_context.net.0.proj": ("double_blocks.{}.txt_mlp.0", None),
    "transformer_blocks.{}.ff_context.net.2": ("double_blocks.{}.txt_mlp.2", None),
    "single_transformer_blocks.{}.attn.to_q": ("single_blocks.{}.linear1", 0),
    "single_transformer_blocks.{}.attn.to_k": ("single_blocks.{}.linear1", 1),
    "single_transformer_blocks.{}.attn.to_v": ("single_blocks.{}.linear1", 2),
    "single_transformer_blocks.{}.proj_mlp": ("single_blocks.{}.linear1", 3),
    "single_transformer_blocks.{}.proj_out": ("single_blocks.{}.linear2", None),
    "single_transformer_blocks.{}.norm.linear": ("single_blocks.{}.modulation.lin", None),
    "x_embedder": ("img_in", None),
    "context_embedder": ("txt_in", None),
    "time_text_embed.timestep_embedder.linear_1": ("time_in.in_layer", None),
    "time_text_embed.timestep_embedder.linear_2": ("time_in.out_layer", None),
    "time_text_embed.text_embedder.linear_1": ("vector_in.in_layer", None),
    "time_text_embed.text_embedder.linear_2": ("vector_in.out_layer", None),
    "time_text_embed.guidance_embedder.linear_1": ("guidance_in.in_layer", None),
    "time_text_embed.guidance_embedder.linear_2": ("guidance_in.out_layer", None),
    "norm_out.linear": ("final_layer.adaLN_modulation.1", SWAPPED),
    "proj_out": ("final_layer.linear", None),
}
_SD3_LAYOUT = {
    "transformer_blocks.{}.attn.to_q": ("joint_blocks.{}.x_block.attn.qkv", 0),
    "transformer_blocks.{}.attn.to_k": ("joint_blocks.{}.x_block.attn.qkv", 1),
    "transformer_blocks.{}.attn.to_v": ("joint_blocks.{}.x_block.attn.qkv", 2),
    "transformer_blocks.{}.attn.add_q_proj": ("joint_blocks.{}.context_block.attn.qkv", 0),
    "transformer_blocks.{}.attn.add_k_proj": ("joint_blocks.{}.context_block.attn.qkv", 1),
    "transformer_blocks.{}.attn.add_v_proj": ("joint_blocks.{}.context_block.attn.qkv", 2),
    "transformer_blocks.{}.attn2.to_q": ("joint_blocks.{}.x_block.attn2.qkv", 0),  # SD3.5's dual attention
    "transformer_blocks.{}.attn2.to_k": ("joint_blocks.{}.x_block.attn2.qkv", 1),
    "transformer_blocks.{}.attn2.to_v": ("joint_blocks.{}.x_block.attn2.qkv", 2),
    "transformer_blocks.{}.attn.to_out.0": ("joint_blocks.{}.x_block.attn.proj", None),
    "transformer_blocks.{}.attn.to_add_out": ("joint_blocks.{}.context_block.attn.proj", None),
    "transformer_blocks.{}.attn2.to_out.0": ("joint_blocks.{}.x_block.attn2.proj", None),
    "transformer_blocks.{}.norm1.linear": ("joint_blocks.{}.x_block.adaLN_modulation.1", None),
    "transformer_blocks.{}.norm1_context.linear": ("joint_blocks.{}.context_block.adaLN_modulation.1", LAST_SWAPPED),
    "transformer_blocks.{}.ff.net.0.proj": ("joint_blocks.{}.x_block.mlp.fc1", None),
    "transformer_blocks.{}.ff.net.2": ("joint_blocks.{}.x_block.mlp.fc2", None),
    "transformer_blocks.{}.ff_context.net.0.proj": ("joint_blocks.{}.context_block.mlp.fc1", None),
    "transformer_blocks.{}.ff_context.net.2": ("joint_blocks.{}.context_block.mlp.fc2", None),
    "pos_embed.proj": ("x_embedder.proj", None),
    "context_embedder": ("context_embedder", None),
    "time_text_embed.timestep_embedder.linear_1": ("t_embedder.mlp.0", None),
    "time_text_embed.timestep_embedder.linear_2": ("t_embedder.mlp.2", None),
    "time_text_embed.text_embedder.linear_1": ("y_embedder.mlp.0", None),
    "time_text_embed.text_embedder.linear_2": ("y_embedder.mlp.2", None),
    "norm_out.linear": ("final_layer.adaLN_modulation.1", SWAPPED),
    "proj_out": ("final_layer.linear", None),
}
# CLIP text encoders by family; the T5 encoders (Flux's text_encoder_2, SD3's text_encoder_3) have no name there
_DIT_CLIP_ENCODERS = {"flux": ("text_encoder",), "sd3": ("text_encoder", "text_encoder_2")}


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{\}", r"(\d+)"))


def _compiled(layout: dict) -> list[tuple[re.Pattern, re.Pattern, str, str, int | str | None]]:
    """(diffusers pattern, checkpoint pattern, diffusers template, checkpoint template, part) per entry."""
    return [(_pattern(module), _pattern(checkpoint), module, checkpoint, part)
            for module, (checkpoint, part) in layout.items()]


_LAYOUTS = {"flux": _compiled(_FLUX_LAYOUT), "sd3": _compiled(_SD3_LAYOUT)}


@dataclass(frozen=True)
class CheckpointSlot:
    """Where a diffusers module's weight lives in a checkpoint-layout model: `key`'s rows [start, start + length)
    (all rows if `rows` is None), with the (scale, shift) halves swapped if `swapped`."""

    key: str
    rows: tuple[int, int] | None = None
    swapped: bool = False


def dit_family(transformer_config) -> str:
    """"flux" (FluxTransformer2DModel: single-stream blocks) or "sd3" (SD3Transformer2DModel: a caption projection),
    from a model's config or a file's fingerprint of it."""
    name = transformer_config.get("_class_name")
    if name == "FluxTransformer2DModel" or (name is None and "num_single_layers" in transformer_config):
        return "flux"
    if name == "SD3Transformer2DModel" or (name is None and "caption_projection_dim" in transformer_config):
        return "sd3"
    raise ValueError(f"not the config of a Flux.1 or SD3/SD3.5 transformer ({name or 'no class name'}, neither "
                     "num_single_layers nor caption_projection_dim in it).")


def _slot(key: str, part, block: tuple[str, ...], transformer_config) -> CheckpointSlot:
    """The slot of a layout entry's `part` in checkpoint weight `key` of block `block` (its index, if any)."""
    if part in (SWAPPED, LAST_SWAPPED):
        return CheckpointSlot(key, swapped=part == SWAPPED or int(block[0]) == transformer_config["num_layers"] - 1)
    if part is None:
        return CheckpointSlot(key)
    hidden = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
    return CheckpointSlot(key, (part * hidden, 4 * hidden if part == 3 else hidden))  # Flux's MLP ratio: 4


def checkpoint_slot(module: str, transformer_config) -> CheckpointSlot:
    """The checkpoint weight (without `.weight`) holding a diffusers Flux/SD3 transformer module, and its rows."""
    family = dit_family(transformer_config)
    for pattern, _, _, checkpoint, part in _LAYOUTS[family]:
        match = pattern.fullmatch(module)
        if match:
            return _slot(checkpoint.format(*match.groups()), part, match.groups(), transformer_config)
    raise ValueError(f"transformer.{module}: not a {family.upper()} transformer module with a checkpoint name "
                     "(attention, feed-forward, modulation and embedding Linears have one).")


def diffusers_module(slot: CheckpointSlot, transformer_config) -> str:
    """The inverse of `checkpoint_slot`: the diffusers module a checkpoint weight (or rows of it) holds."""
    family = dit_family(transformer_config)
    for _, pattern, module, _, part in _LAYOUTS[family]:
        match = pattern.fullmatch(slot.key)
        if match and _slot(slot.key, part, match.groups(), transformer_config) == slot:
            return module.format(*match.groups())
    raise ValueError(f"{slot}: no {family.upper()} transformer module is stored there.")


def dit_host_name(component: str, module: str, transformer_config) -> str:
    """The name ComfyUI and Forge read a Flux/SD3 LoRA module by: diffusers' own (`transformer.<module>`, CLIP
    layers `text_encoder[_2].text_model.<module>`); the host maps it to its checkpoint-layout weight."""
    family = dit_family(transformer_config)
    if component == "transformer":
        checkpoint_slot(module, transformer_config)  # raises for a module the checkpoint layout has not
        return f"transformer.{module}"
    if component not in _DIT_CLIP_ENCODERS[family]:
        raise ValueError(f"{component}.{module}: the hosts read no adapter on a {family.upper()} pipeline's "
                         f"{component} (T5 layers have no host name; CLIP encoders: {_DIT_CLIP_ENCODERS[family]}).")
    module = module if module.startswith("text_model.") else "text_model." + module
    if not _TEXT_MODULE_RE.fullmatch(module):
        raise ValueError(f"{component}.{module}: the hosts name a text encoder's attention projections and MLP only.")
    return f"{component}.{module}"


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
