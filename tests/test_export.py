"""`lie-diffusion export`: kohya names and formats, checked against the rules the tools apply.

The name tables and the apply rules below (kohya name -> module, then W + diff, W + up@down·alpha/rank)
are written here from ComfyUI's / A1111's behaviour, not taken from the exporter; the SGM names are
checked against diffusers' own single-file (LDM -> diffusers) converter; stock diffusers' kohya
conversion and `load_lora_weights` are run as they are.
"""

import json
import re
from types import SimpleNamespace

import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.lora_conversion_utils import (
    _convert_non_diffusers_lora_to_diffusers,
    _maybe_map_sgm_blocks_to_diffusers,
)
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
from safetensors import safe_open
from safetensors.torch import save_file
from test_io import _rewrite, max_diff, randomize_adapters
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from lie_diffusion import LieConfig, add_lie_adapters, read_lie_file, save_lie_weights
from lie_diffusion.cli import main
from lie_diffusion.naming import kohya_name, unet_name_to_sgm
from lie_diffusion.inject import find_targets
from lie_diffusion.tiny import UNET_CONFIGS, build_tiny_pipeline, tiny_text_encoder, tiny_vae, write_tiny_tokenizer

# The real UNet configs (as in the hub repos' unet/config.json, shape-relevant entries only).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
# The tiny SDXL UNet with real SDXL's block order: its first up block (the one with an upsampler) has
# attention. Stock diffusers' SGM remap assumes that order (see docs/hosts.md).
TINY_SDXL_ORDERED = dict(
    UNET_CONFIGS["sdxl"], down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
)
UNET_LAYOUTS = {"sd15": SD15_UNET, "sdxl": SDXL_UNET, "tiny-sd1": UNET_CONFIGS["sd1"], "tiny-sd2": UNET_CONFIGS["sd2"],
                "tiny-sdxl": UNET_CONFIGS["sdxl"], "tiny-sdxl-ordered": TINY_SDXL_ORDERED}
CLIP_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")

_gen = torch.Generator().manual_seed(7)
SAMPLE, TOKENS = torch.randn(1, 4, 16, 16, generator=_gen), torch.randint(0, 1000, (1, 8), generator=_gen)
HIDDEN_XL, POOLED_XL, TIME_IDS = torch.randn(1, 8, 64, generator=_gen), torch.randn(1, 32, generator=_gen), torch.randn(
    1, 6, generator=_gen
)


def meta_unet(config):
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def sgm_table(unet) -> dict[str, str]:
    """LDM/SGM module name -> diffusers module name, for every weight of `unet`; each pair checked by diffusers'
    single-file converter (which loads LDM checkpoints, the layout A1111 and ComfyUI hold in memory)."""
    keys = list(unet.state_dict())
    modules = {key.rpartition(".")[0] for key in keys if key.endswith(".weight")}
    table = {unet_name_to_sgm(name, unet.config): name for name in modules}
    assert len(table) == len(modules), "two diffusers modules share an SGM name"
    checkpoint = {}
    for key in keys:
        module, _, param = key.rpartition(".")
        checkpoint[f"model.diffusion_model.{unet_name_to_sgm(module, unet.config)}.{param}"] = key
    converted = convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))
    assert converted == {key: key for key in keys}  # every LDM name lands on the diffusers parameter it came from
    return table


def comfyui_table(unet, text_encoders: dict[str, int]) -> dict[str, tuple[str, str]]:
    """kohya name -> (component, diffusers module) under ComfyUI's rules: `lora_unet_` + the LDM name with `_`,
    or + the diffusers name with `_`; CLIP: `lora_te_` (`lora_te1_`/`lora_te2_` for two encoders) + the encoder
    layer's attention/MLP path with `_`."""
    table = {}
    for sgm, name in sgm_table(unet).items():
        table["lora_unet_" + sgm.replace(".", "_")] = ("unet", name)
        table["lora_unet_" + name.replace(".", "_")] = ("unet", name)
    prefixes = {"text_encoder": "lora_te1" if len(text_encoders) == 2 else "lora_te", "text_encoder_2": "lora_te2"}
    for component, layers in text_encoders.items():
        for layer in range(layers):
            for part in CLIP_PARTS:
                module = f"text_model.encoder.layers.{layer}.{part}"
                table[f"{prefixes[component]}_" + module.replace(".", "_")] = (component, module)
    return table


def a1111_sd1_compvis(name: str) -> str:
    """A1111's conversion of kohya diffusers-style SD1 names to its compvis module names (SD1.5 layout: three
    input blocks per level, resnet at .0, transformer at .1; samplers after the level)."""
    resnet = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
              "conv_shortcut": "skip_connection"}
    if m := re.fullmatch(r"lora_unet_down_blocks_(\d)_(attentions|resnets)_(\d)_(.+)", name):
        block, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        inner = f"1_{rest}" if kind == "attentions" else f"0_{resnet[rest]}"
        return f"diffusion_model_input_blocks_{1 + 3 * block + index}_{inner}"
    if m := re.fullmatch(r"lora_unet_up_blocks_(\d)_(attentions|resnets)_(\d)_(.+)", name):
        block, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        inner = f"1_{rest}" if kind == "attentions" else f"0_{resnet[rest]}"
        return f"diffusion_model_output_blocks_{3 * block + index}_{inner}"
    if m := re.fullmatch(r"lora_unet_mid_block_(attentions|resnets)_(\d)_(.+)", name):
        kind, index, rest = m[1], int(m[2]), m[3]
        return f"diffusion_model_middle_block_1_{rest}" if kind == "attentions" else (
            f"diffusion_model_middle_block_{2 * index}_{resnet[rest]}")
    if m := re.fullmatch(r"lora_unet_down_blocks_(\d)_downsamplers_0_conv", name):
        return f"diffusion_model_input_blocks_{3 + 3 * int(m[1])}_0_op"
    if m := re.fullmatch(r"lora_unet_up_blocks_(\d)_upsamplers_0_conv", name):
        block = int(m[1])
        return f"diffusion_model_output_blocks_{2 + 3 * block}_{2 if block > 0 else 1}_conv"
    raise AssertionError(f"A1111 has no rule for {name}")


def stock_diffusers_modules(names: list[str], unet) -> set[str]:
    """The UNet modules stock diffusers' kohya path (SGM remap, kohya conversion, peft keys) puts these names on."""
    state_dict = {}
    for name in names:
        state_dict.update({f"{name}.lora_down.weight": torch.zeros(1), f"{name}.lora_up.weight": torch.zeros(1),
                           f"{name}.alpha": torch.ones(())})
    state_dict = _maybe_map_sgm_blocks_to_diffusers(state_dict, unet.config)
    state_dict, _ = _convert_non_diffusers_lora_to_diffusers(state_dict)
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state_dict.items()})
    return {key.rsplit(".lora_", 1)[0] for key in peft}


@pytest.mark.parametrize("layout", sorted(UNET_LAYOUTS))
def test_unet_names_map_to_real_modules_under_each_tools_rules(layout):
    unet = meta_unet(UNET_LAYOUTS[layout])
    sgm = {name: ldm for ldm, name in sgm_table(unet).items()}  # checked against diffusers' converter
    comfy = comfyui_table(unet, {})
    convs, attns = find_targets(unet, LieConfig())
    assert convs and attns
    names = {module: kohya_name("unet", module, unet.config) for module in convs + attns}
    assert len(set(names.values())) == len(names), "two modules share a kohya name"
    xl = layout in ("sdxl", "tiny-sdxl", "tiny-sdxl-ordered")
    for module, name in names.items():
        assert comfy[name] == ("unet", module)  # ComfyUI and Forge
        if xl:  # A1111 SDXL: the name is the SGM module path
            assert name == "lora_unet_" + sgm[module].replace(".", "_")
        elif layout == "sd15":  # A1111 SD1: converted from diffusers-style names
            assert name == "lora_unet_" + module.replace(".", "_")
            assert a1111_sd1_compvis(name) == "diffusion_model_" + sgm[module].replace(".", "_")
    misplaced = set(names) - stock_diffusers_modules(list(names.values()), unet)
    # stock diffusers' SGM remap takes an output block's index 1 for attention: wrong for tiny-sdxl's first up
    # block, which has an upsampler but no attention (real SDXL's has both; see docs/hosts.md)
    assert misplaced == ({"up_blocks.0.upsamplers.0.conv"} if layout == "tiny-sdxl" else set())
    if layout == "sdxl":
        assert names["down_blocks.1.resnets.0.conv1"] == "lora_unet_input_blocks_4_0_in_layers_2"
        assert names["up_blocks.0.upsamplers.0.conv"] == "lora_unet_output_blocks_2_2_conv"
        assert names["mid_block.attentions.0.transformer_blocks.9.attn2.to_out.0"] == (
            "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_out_0")


def test_text_encoder_names():
    sd1, xl = {}, {"addition_embed_type": "text_time"}
    q = "text_model.encoder.layers.3.self_attn.q_proj"
    assert kohya_name("text_encoder", q, sd1) == "lora_te_text_model_encoder_layers_3_self_attn_q_proj"
    assert kohya_name("text_encoder", q.removeprefix("text_model."), sd1) == kohya_name("text_encoder", q, sd1)
    assert kohya_name("text_encoder", q, xl) == "lora_te1_text_model_encoder_layers_3_self_attn_q_proj"
    assert kohya_name("text_encoder_2", q, xl) == "lora_te2_text_model_encoder_layers_3_self_attn_q_proj"
    with pytest.raises(ValueError, match="attention projections and MLP only"):
        kohya_name("text_encoder", "text_model.embeddings.token_embedding", sd1)


# ------------------------------------------------------------------------------------- tiny pipelines


def build_tiny_sdxl_pipeline(directory):
    """A saved tiny StableDiffusionXLPipeline (two CLIP encoders; real SDXL's block order)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_SDXL_ORDERED)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, bos_token_id=512, eos_token_id=513, pad_token_id=513, projection_dim=32))
    tokenizer = CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(directory / "tokenizer-src")))
    StableDiffusionXLPipeline(
        vae=tiny_vae(0), text_encoder=tiny_text_encoder(0), text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=EulerDiscreteScheduler(),
    ).save_pretrained(str(directory))
    return directory


@torch.no_grad()
def outputs(pipe):
    """Text-encoder hidden states and the UNet's noise prediction on fixed inputs."""
    if isinstance(pipe, StableDiffusionXLPipeline):
        conditions = dict(added_cond_kwargs={"text_embeds": POOLED_XL, "time_ids": TIME_IDS})
        return (pipe.text_encoder(TOKENS)[0], pipe.text_encoder_2(TOKENS)[0],
                pipe.unet(SAMPLE, 10, HIDDEN_XL, **conditions).sample)
    hidden = pipe.text_encoder(TOKENS)[0]
    return hidden, pipe.unet(SAMPLE, 10, hidden).sample


def _adapted(root, kind):
    """A base pipeline folder and a saved adapter with: Lie convs (one in taylor mode, one rank/alpha override),
    LoRA attention with alpha != rank, and per text encoder LoRA or Lie-on-Linear."""
    if kind in ("sd1", "sd2"):
        base, cls = build_tiny_pipeline(root / "base", kind), StableDiffusionPipeline
    else:
        base, cls = build_tiny_sdxl_pipeline(root / "base"), StableDiffusionXLPipeline
    pipe = cls.from_pretrained(str(base))
    # balance="none": random N(0, 0.1) factors under the balanced scalings (alpha / RMS(W)) would give exp(Δ) ~ 1e7
    add_lie_adapters(pipe.unet, LieConfig(rank=4, alpha=8, attn_rank=2, attn_alpha=1, balance="none"),
                     overrides={"mid_block.resnets.0.conv2": (6, 3.0)})
    randomize_adapters(pipe.unet, 0)
    pipe.unet.get_submodule("mid_block.resnets.0.conv1").lie_mode["default"] = "taylor"
    add_lie_adapters(pipe.text_encoder, LieConfig(rank=2, alpha=1, attn_adapter="lie"))
    randomize_adapters(pipe.text_encoder, 1)
    encoders = {"text_encoder": pipe.text_encoder}
    if kind == "sdxl":
        add_lie_adapters(pipe.text_encoder_2, LieConfig(rank=2, alpha=3))
        randomize_adapters(pipe.text_encoder_2, 2)
        encoders["text_encoder_2"] = pipe.text_encoder_2
    path = save_lie_weights(root / "adapter", pipe.unet, **encoders)
    return SimpleNamespace(base=base, path=path, cls=cls, outputs=outputs(pipe), kind=kind, root=root)


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def adapted(request, tmp_path_factory):
    return _adapted(tmp_path_factory.mktemp(f"export-{request.param}"), request.param)


def export(adapted, name, *options):
    output = adapted.root / name
    assert main(["export", str(adapted.path), "--base", str(adapted.base), "--output", str(output), *options]) == 0
    with safe_open(str(output), framework="pt") as file:
        tensors = {key: file.get_tensor(key) for key in file.keys()}
        report = json.loads(file.metadata()["lie_diffusion_export"])
    return tensors, report


def expected_weights(adapted, pipe) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """(component, module) -> (W, merged W', fp16 round-off bound) from the adapter's factors and the formulas:
    W ⊙ exp(sΔ), W + W ⊙ sΔ (taylor), W + s·BA (LoRA), computed in float64."""
    result = {}
    for entry in read_lie_file(adapted.path).modules:
        module = canonical(entry.component, entry.module)
        weight = base_weight(pipe, entry.component, module)
        delta = (entry.alpha / entry.rank) * (entry.B.double().flatten(1) @ entry.A.double().flatten(1))
        delta = delta.reshape(weight.shape)
        if entry.section == "lora":
            merged = weight + delta
            # fp16 factors: each product term is off by at most ~2·2^-11 of its size
            half = (entry.alpha / entry.rank) * (entry.B.double().abs().flatten(1) @ entry.A.double().abs().flatten(1))
            half = half.reshape(weight.shape) * 2**-10
        else:
            merged = weight * (delta.exp() if entry.mode == "exp" else 1 + delta)
            half = (merged - weight).abs() * 2**-11  # fp16 holds ΔW itself to 2^-11 relative
        result[(entry.component, module)] = (weight, merged, half + 2**-24 + weight.abs() * 1e-7)
    return result


def canonical(component: str, module: str) -> str:
    """CLIP module paths as kohya spells them (transformers 5 drops the leading `text_model.`)."""
    return module if component == "unet" or module.startswith("text_model.") else "text_model." + module


def base_weight(pipe, component: str, module: str) -> torch.Tensor:
    model = getattr(pipe, component)
    names = {name for name, _ in model.named_modules()}
    name = module if module in names else module.removeprefix("text_model.")
    return model.get_submodule(name).weight.detach().double()


def apply_like_comfyui(tensors, pipe) -> dict[tuple[str, str], torch.Tensor]:
    """Group keys by module, place each by name, then W + diff or W + up@down·alpha/rank (float64)."""
    encoders = {c: getattr(pipe, c).config.num_hidden_layers for c in ("text_encoder", "text_encoder_2")
                if getattr(pipe, c, None) is not None}
    table = comfyui_table(pipe.unet, encoders)
    groups = {}
    for key, tensor in tensors.items():
        stem, _, part = key.partition(".")
        assert stem in table, f"{key}: no module under ComfyUI's naming rules"
        groups.setdefault(table[stem], {})[part] = tensor.double()
    applied = {}
    for (component, module), parts in groups.items():
        weight = base_weight(pipe, component, module)
        if set(parts) == {"diff"}:
            applied[(component, module)] = weight + parts["diff"]
            continue
        assert set(parts) == {"lora_down.weight", "lora_up.weight", "alpha"}, parts.keys()
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        update = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * (parts["alpha"].item() / down.shape[0])
        applied[(component, module)] = weight + update
    return applied


def test_exact_export_applied_by_independent_rules_reproduces_merged_weights(adapted):
    tensors, report = export(adapted, "exact.safetensors", "--conv", "exact", "--dtype", "fp16")
    pipe = adapted.cls.from_pretrained(str(adapted.base))
    expected = expected_weights(adapted, pipe)
    applied = apply_like_comfyui(tensors, pipe)
    assert sorted(applied) == sorted(expected)  # every targeted module, nothing left over
    for key, (weight, merged, fp16_bound) in expected.items():
        assert ((applied[key] - merged).abs() <= fp16_bound).all(), key
    kinds = {row["written"] for row in report["modules"]}
    assert kinds == {"diff", "lora"} and report["total"]["diff_modules"] == 23 + 8  # UNet convs, Lie CLIP projections
    assert all(t.dtype == torch.float16 for k, t in tensors.items() if not k.endswith(".alpha"))


def test_full_rank_lowrank_export_loads_with_stock_diffusers(adapted):
    tensors, report = export(adapted, "full.safetensors", "--conv", "lowrank", "--max-rel-error", "0",
                             "--dtype", "fp32")
    assert all(key.startswith(("lora_unet_", "lora_te")) for key in tensors)
    assert all(row["rank"] == row["max_rank"] for row in report["modules"] if row["written"] == "locon")
    pipe = adapted.cls.from_pretrained(str(adapted.base))
    pipe.load_lora_weights(str(adapted.root / "full.safetensors"))  # the kohya path of stock diffusers
    assert max_diff(outputs(pipe), adapted.outputs) < 2e-5
    plain = adapted.cls.from_pretrained(str(adapted.base))
    assert max_diff(outputs(plain), adapted.outputs) > 0.05  # the adapter does act


@pytest.mark.parametrize("adapted", ["sd1"], indirect=True)  # one layout is enough
def test_lowrank_error_report_matches_measured_error(adapted):
    tensors, report = export(adapted, "rank2.safetensors", "--conv", "lowrank", "--rank", "2", "--dtype", "fp32")
    pipe = adapted.cls.from_pretrained(str(adapted.base))
    expected, applied = expected_weights(adapted, pipe), apply_like_comfyui(tensors, pipe)
    rows = {}
    for row in report["modules"]:
        component, module = row["module"].split(".", 1)
        rows[(component, canonical(component, module))] = row
    checked = 0
    for (component, module), (weight, merged, _) in expected.items():
        row = rows[(component, module)]
        if row["source"] != "lie":
            continue
        update = merged - weight
        measured = (applied[(component, module)] - merged).norm().item()
        singular = torch.linalg.svdvals(update.flatten(1))
        tail = singular[2:].square().sum().sqrt().item()  # √(Σ_{i>k} σᵢ²) at k = 2
        assert row["rank"] == 2 and tensors[f"{row['name']}.alpha"].item() == 2.0
        assert measured == pytest.approx(tail, rel=1e-4)
        assert row["abs_error"] == pytest.approx(measured, rel=1e-4)
        assert row["rel_error"] == pytest.approx(measured / update.norm().item(), rel=1e-4)
        checked += 1
    assert checked == 23 + 8  # UNet convs and the Lie text-encoder projections
    total = report["total"]
    assert total["rel_error"] == pytest.approx(
        (sum(r["abs_error"] ** 2 for r in rows.values()) / sum(r["update_norm"] ** 2 for r in rows.values())) ** 0.5
    )


@pytest.mark.parametrize("adapted", ["sd1"], indirect=True)  # one layout is enough
def test_auto_uses_locon_only_where_it_meets_the_target_in_fewer_bytes(adapted):
    target = 0.3
    tensors, report = export(adapted, "auto.safetensors", "--conv", "auto", "--max-rel-error", str(target),
                             "--dtype", "fp32")
    pipe = adapted.cls.from_pretrained(str(adapted.base))
    expected = expected_weights(adapted, pipe)
    by_name = {row["name"]: row for row in report["modules"]}
    for (component, module), (weight, merged, _) in expected.items():
        row = by_name[kohya_name(component, module, pipe.unet.config)]
        if row["source"] == "lora":
            entry = next(e for e in read_lie_file(adapted.path).modules if row["module"] == e.ref)
            assert tensors[f"{row['name']}.alpha"].item() == entry.alpha != entry.rank  # the true alpha
            continue
        singular = torch.linalg.svdvals((merged - weight).flatten(1)).double()
        tails = [singular[k:].square().sum().sqrt() for k in range(len(singular) + 1)]
        rank = next(k for k, tail in enumerate(tails) if tail <= target * tails[0])
        rows, fan_in = weight.shape[0], weight[0].numel()
        if row["written"] == "locon":
            assert row["rank"] == rank and rank * (rows + fan_in) < rows * fan_in and row["rel_error"] <= target
        else:
            assert row["written"] == "diff" and rank * (rows + fan_in) >= rows * fan_in


def _fails(capsys, argv, *words):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(word in err for word in words), err
    return err


@pytest.mark.parametrize("adapted", ["sd1"], indirect=True)  # one layout is enough
def test_bad_input_gives_one_line_and_no_file(adapted, tiny_sd2_pipeline_dir, capsys):
    out = adapted.root / "bad.safetensors"
    argv = ["export", str(adapted.path), "--base", str(adapted.base), "--output", str(out)]
    _fails(capsys, ["export", str(adapted.path), "--base", str(tiny_sd2_pipeline_dir), "--output", str(out)],
           "another base model", "use_linear_projection")
    kohya = adapted.root / "kohya-input.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(1, 4, 3, 3)}, str(kohya))
    _fails(capsys, ["export", str(kohya), "--base", str(adapted.base), "--output", str(out)],
           "a kohya LoRA/LyCORIS file, not a lie-diffusion one")
    _fails(capsys, [*argv, "--format", "lycoris-loha"], "unknown format 'lycoris-loha'", "kohya")
    _fails(capsys, [*argv, "--conv", "lowrank", "--rank", "100000"], "--rank 100000 is larger than", "at most")
    _fails(capsys, [*argv, "--conv", "exact", "--rank", "2"], "--rank applies to --conv lowrank")
    huge = _rewrite(adapted.path, adapted.root / "huge-alpha.safetensors", edit_info=lambda i: i.update(alpha=1e30))
    _fails(capsys, ["export", str(huge), *argv[2:]], "the adapted weight", "NaN/inf", "alpha 1e+30")
    assert not out.exists() and not list(adapted.root.glob(".bad.safetensors*"))


def test_help_states_the_strength_caveat(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "W(1 + t·expm1(sΔ))" in text and "W ⊙ exp(t·sΔ)" in text
