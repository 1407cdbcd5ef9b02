"""Opt-in: the ComfyUI node against a real ComfyUI checkout, for tiny SD1, SD2 and SDXL models.

Skipped unless LIE_COMFYUI_DIR names a ComfyUI folder whose requirements are installed beside lie-diffusion's.
ComfyUI's own classes build the models (its UNet from a config, its CLIP models, ModelPatcher), its custom-node
discovery imports the node that `lie-diffusion install comfyui` put in place, and its own code applies the patches: ModelPatcher.patch_model (fp32 weights), stock
LoraLoader for a plain LoRA before and after, and LowVramPatch (what its low-VRAM path runs on each fp16/bf16
weight). Every patched weight is compared with lie-diffusion's merge_lie_weights at the same strength.
"""

import asyncio
import importlib
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_export import _adapted
from test_io import _rewrite

from lie_diffusion import load_lie_weights, merge_lie_weights, read_lie_file
from lie_diffusion.cli import main
from lie_diffusion.hosts import LiePatch

COMFYUI = os.environ.get("LIE_COMFYUI_DIR")
pytestmark = pytest.mark.skipif(not COMFYUI, reason="set LIE_COMFYUI_DIR to a ComfyUI checkout to run these")
FP32_RTOL = 2**-22  # two float32 ulps (measured: all within one); ComfyUI sums W + W ⊙ expm1(sΔ), merge takes W ⊙ exp(sΔ)
CPU = torch.device("cpu")
KINDS = ("sd1", "sd2", "sdxl")


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    sys.path.insert(0, COMFYUI)
    cli_args = importlib.import_module("comfy.cli_args")
    cli_args.args.cpu = True
    names = ("comfy.lora", "comfy.model_patcher", "comfy.sd", "comfy.sd1_clip", "comfy.supported_models",
             "comfy.utils", "folder_paths", "nodes")
    host = SimpleNamespace(**{name.split(".")[-1]: importlib.import_module(name) for name in names})
    # `lie-diffusion install` into a folder with ComfyUI's layout, then ComfyUI's own custom-node discovery
    root = tmp_path_factory.mktemp("comfyui-root")
    for marker in ("comfy/lora.py", "nodes.py"):
        (root / marker).parent.mkdir(exist_ok=True)
        (root / marker).write_text("")
    assert main(["install", "comfyui", str(root)]) == 0
    host.folder_paths.folder_names_and_paths["custom_nodes"] = ([str(root / "custom_nodes")], set())
    asyncio.run(host.nodes.init_external_custom_nodes())
    assert "LieAdapterLoader" in host.nodes.NODE_CLASS_MAPPINGS
    host.loras = tmp_path_factory.mktemp("loras")
    host.folder_paths.add_model_folder_path("loras", str(host.loras), is_default=True)
    return host


def ldm_unet_config(config) -> dict:
    """ComfyUI's UNetModel config for a diffusers UNet config (SD1/2/SDXL layouts)."""
    channels, per = config["block_out_channels"], config["layers_per_block"]
    depth = config["transformer_layers_per_block"]
    depth = [depth] * len(channels) if isinstance(depth, int) else list(depth)
    down = [d if kind.startswith("CrossAttn") else 0 for d, kind in zip(depth, config["down_block_types"])]
    up = [d if kind.startswith("CrossAttn") else 0 for d, kind in zip(reversed(depth), config["up_block_types"])]
    sdxl = config["addition_embed_type"] == "text_time"
    return {
        "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": channels[0],
        "num_res_blocks": [per] * len(channels), "channel_mult": [c // channels[0] for c in channels],
        "transformer_depth": [d for d in down for _ in range(per)],
        "transformer_depth_output": [d for d in up for _ in range(per + 1)][::-1],
        "transformer_depth_middle": depth[-1], "context_dim": config["cross_attention_dim"],
        "use_linear_in_transformer": config["use_linear_projection"], "use_spatial_transformer": True,
        "legacy": False, "use_checkpoint": False, "num_classes": "sequential" if sdxl else None,
        "adm_in_channels": config["projection_class_embeddings_input_dim"] if sdxl else None,
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }


def comfy_model(comfy, pipe, kind):
    """A ComfyUI MODEL holding the pipeline's UNet weights, and ComfyUI key -> diffusers key."""
    config = dict(pipe.unet.config)
    family = {"sd1": comfy.supported_models.SD15, "sd2": comfy.supported_models.SD20,
              "sdxl": comfy.supported_models.SDXL}[kind]
    model_config = family(ldm_unet_config(config))
    model_config.unet_config.update(num_heads=-1, num_head_channels=4)  # the class default: 0 heads at toy width
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    to_ldm = comfy.utils.unet_to_diffusers(model_config.unet_config)  # ComfyUI's own diffusers -> LDM names
    model.diffusion_model.load_state_dict({to_ldm[k]: v for k, v in pipe.unet.state_dict().items()}, strict=True)
    names = {f"diffusion_model.{to_ldm[k]}": ("unet", k) for k in pipe.unet.state_dict()}
    return comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU), names


def comfy_clip(comfy, pipe, kind):
    """A ComfyUI CLIP holding the pipeline's text encoders (clip_l, and clip_g for SDXL; clip_h for SD2)."""
    encoders = {"clip_h" if kind == "sd2" else "clip_l": "text_encoder", "clip_g": "text_encoder_2"}
    stage, names = torch.nn.Module(), {}
    for clip_name, component in encoders.items():
        encoder = getattr(pipe, component, None)
        if encoder is None:
            continue
        clip = comfy.sd1_clip.SDClipModel(textmodel_json_config=encoder.config.to_dict(), dtype=torch.float32)
        # transformers 5 drops CLIPTextModel's leading `text_model.`; ComfyUI keeps it. ComfyUI's token table has
        # CLIP's 49408 rows whatever the config says: it keeps its own (adapters never touch it).
        keys = {k: k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"
                for k in encoder.state_dict() if "token_embedding" not in k}
        weights = {keys[k]: v for k, v in encoder.state_dict().items() if k in keys}
        result = clip.transformer.load_state_dict(weights, strict=False)
        assert not result.unexpected_keys, result
        assert set(result.missing_keys) <= {"text_model.embeddings.token_embedding.weight", "text_projection.weight"}
        setattr(stage, clip_name, clip)
        names.update({f"{clip_name}.transformer.{comfy_key}": (component, k) for k, comfy_key in keys.items()})
    wrapper = comfy.sd.CLIP(no_init=True)
    wrapper.cond_stage_model, wrapper.patcher = stage, comfy.model_patcher.ModelPatcher(stage, CPU, CPU)
    wrapper.tokenizer, wrapper.layer_idx, wrapper.tokenizer_options = None, None, {}
    wrapper.use_clip_schedule, wrapper.apply_hooks_to_conds = False, None
    return wrapper, names


@pytest.fixture(scope="module")
def files(comfy, tmp_path_factory):
    """An adapted tiny pipeline per layout, its adapter file in ComfyUI's loras folder."""
    out = {}
    for kind in KINDS:
        out[kind] = _adapted(tmp_path_factory.mktemp(f"comfy-{kind}"), kind)
        (comfy.loras / f"lie-{kind}.safetensors").write_bytes(out[kind].path.read_bytes())
    return out


@pytest.fixture(scope="module", params=KINDS)
def setup(request, comfy, files):
    adapted = files[request.param]
    pipe = adapted.cls.from_pretrained(str(adapted.base))
    model, unet_names = comfy_model(comfy, pipe, request.param)
    clip, clip_names = comfy_clip(comfy, pipe, request.param)
    names = {**unet_names, **clip_names}
    return SimpleNamespace(adapted=adapted, kind=request.param, model=model, clip=clip, names=names,
                           lora=plain_lora(comfy, request.param, model, clip, names),
                           file=f"lie-{request.param}.safetensors", base=diffusers_weights(adapted))


def plain_lora(comfy, kind, model, clip, names):
    """A kohya LoRA (named by ComfyUI's own key maps) on a conv the Lie file also adapts, an attention
    projection and a text-encoder projection; returns its file name and diffusers key -> ΔW at strength 1."""
    keys = {**comfy.lora.model_lora_keys_unet(model.model, {}),
            **comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})}
    weights = {**model.model.state_dict(), **clip.cond_stage_model.state_dict()}
    targets = ["down_blocks.1.resnets.0.conv1.weight", "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight",
               "encoder.layers.0.self_attn.q_proj.weight"]
    generator, tensors, updates = torch.Generator().manual_seed(7), {}, {}
    for stem, comfy_key in keys.items():
        name = names.get(comfy_key)
        if not stem.startswith("lora_") or name is None or name[1].removeprefix("text_model.") not in targets:
            continue
        if name in updates:
            continue
        weight, rank, alpha = weights[comfy_key], 2, 3.0
        down = torch.randn(rank, *weight.shape[1:], generator=generator) * 0.2
        up = torch.randn(weight.shape[0], rank, *[1] * (weight.ndim - 2), generator=generator) * 0.2
        tensors.update({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
                        f"{stem}.alpha": torch.tensor(alpha)})
        updates[name] = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * (alpha / rank)
    assert len(updates) == 3 + (kind == "sdxl"), updates.keys()  # SDXL: the q_proj of both encoders
    save_file(tensors, str(comfy.loras / f"plain-{kind}.safetensors"))
    return SimpleNamespace(file=f"plain-{kind}.safetensors", updates=updates)


def diffusers_weights(adapted, *scales, before=None):
    """(component, key) -> weight of the diffusers pipeline, with `before` added, then the adapter merged at
    each of `scales` in turn."""
    pipe = adapted.cls.from_pretrained(str(adapted.base))
    with torch.no_grad():
        for (component, key), update in (before or {}).items():
            getattr(pipe, component).state_dict()[key].add_(update)
    for scale in scales:
        load_lie_weights(pipe, adapted.path, scale=scale)
        merge_lie_weights(pipe)
    return pipeline_weights(pipe)


def together_weights(adapted, paths, scales):
    """The diffusers way of stacking: each file loaded as a named adapter, all active at `scales`
    (set_adapters), then merged."""
    pipe = adapted.cls.from_pretrained(str(adapted.base))
    names = [f"stacked{k}" for k in range(len(paths))]
    for path, name in zip(paths, names):
        load_lie_weights(pipe, path, adapter_name=name)
    pipe.set_adapters(names, list(scales))
    merge_lie_weights(pipe)
    return pipeline_weights(pipe)


def pipeline_weights(pipe):
    """(component, key) -> weight of every model component of a diffusers pipeline."""
    return {(c, k): v.detach().clone() for c in ("unet", "text_encoder", "text_encoder_2")
            if getattr(pipe, c, None) is not None for k, v in getattr(pipe, c).state_dict().items()}


def second_subject(adapted, target):
    """Another adapter for the same base, as a second subject's would be: the same layers and modes (taylor
    included), every factor perturbed."""
    generator = torch.Generator().manual_seed(11)

    def perturb(tensors):
        for key, value in tensors.items():
            tensors[key] = value + 0.05 * torch.randn(value.shape, generator=generator)

    return _rewrite(adapted.path, target, edit_tensors=perturb)


def kohya_written(adapted, path):
    """An adapter as `--network_module lie_diffusion.kohya` saves it in sd-scripts (kohya names, `ss_*` metadata,
    random factors up to |sΔ| ≈ 0.4), on `adapted`'s base; the pipeline's models stand in for kohya's, the SDXL
    UNet under its SGM names (tests/test_kohya.py)."""
    from test_kohya import sgm_stand_in

    from lie_diffusion.kohya import create_network

    pipe = adapted.cls.from_pretrained(str(adapted.base))
    encoders = [c for c in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if c is not None]
    unet = sgm_stand_in(pipe.unet) if len(encoders) == 2 else pipe.unet
    network = create_network(1.0, 4, 2, None, encoders if len(encoders) == 2 else encoders[0], unet, conv_dim="3")
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.03)
    network.save_weights(str(path), None, {"ss_network_module": "lie_diffusion.kohya"})
    with safe_open(str(path), "pt") as file:
        keys, metadata = set(file.keys()), file.metadata()
    assert metadata["ss_network_module"] == "lie_diffusion.kohya"
    assert all(k.startswith(("lora_unet_", "lora_te")) for k in keys)
    assert any(k.endswith(".lie_down.weight") for k in keys) and any(k.endswith(".lora_down.weight") for k in keys)
    return SimpleNamespace(cls=adapted.cls, base=adapted.base, path=Path(path))


def merged_with_lora(adapted, strength, lora_updates, order):
    """merge_lie_weights at `strength`, with a plain LoRA's updates added before ("lora first") or after it."""
    if order == "lora first":
        return diffusers_weights(adapted, strength, before=lora_updates)
    merged = diffusers_weights(adapted, strength)
    return {k: v + lora_updates[k] if k in lora_updates else v for k, v in merged.items()}


def host_weights(setup, patchers, apply, restore):
    """Every weight the host's `patchers` hold while `apply(patcher)` is in force, by diffusers name."""
    out = {}
    for patcher in patchers:
        apply(patcher)
        try:
            out.update({setup.names[k]: v.detach().clone() for k, v in patcher.model.state_dict().items()
                        if k in setup.names})
        finally:
            restore(patcher)
    assert out.keys() == set(setup.names.values())
    return out


def patched_weights(setup, model, clip):
    """ComfyUI's weights after it applies the patches (ModelPatcher.patch_model)."""
    return host_weights(setup, (model, clip.patcher), lambda p: p.patch_model(), lambda p: p.unpatch_model())


def assert_same(got, expected, rtol=FP32_RTOL):
    """|got − expected| ≤ rtol·(|expected| + max|expected|) per tensor: the round-off of sums such as W + ΔW
    scales with their terms, which can be far larger than an element that nearly cancels."""
    assert got.keys() <= expected.keys()
    ratios = {k: ((g - expected[k]).abs() / ((expected[k].abs() + expected[k].abs().max()) * rtol)).max().item()
              for k, g in got.items()}
    worst = max(ratios, key=ratios.get)
    assert ratios[worst] <= 1, f"{worst}: off by {ratios[worst]:.2f}x the tolerance"


def node(comfy, name):
    return comfy.nodes.NODE_CLASS_MAPPINGS[name]()


@pytest.mark.parametrize("strength", [1.0, 0.5, -1.0])
def test_node_matches_merge_at_every_strength(comfy, setup, strength):
    model, clip = node(comfy, "LieAdapterLoader").load(setup.model, setup.clip, setup.file, strength, strength)
    expected = diffusers_weights(setup.adapted, strength)
    changed = [k for k in expected if not torch.equal(expected[k], setup.base[k])]
    assert any(c == "unet" for c, _ in changed) and any(c != "unet" for c, _ in changed)
    assert_same(patched_weights(setup, model, clip), expected)
    assert not setup.model.patches and not setup.clip.patcher.patches  # the inputs were cloned, not patched


def test_minus_one_undoes_the_adapter(comfy, setup):
    loader = node(comfy, "LieAdapterLoader")
    model, clip = loader.load(setup.model, setup.clip, setup.file, 1.0, 1.0)
    model, clip = loader.load(model, clip, setup.file, -1.0, -1.0)
    got = patched_weights(setup, model, clip)
    assert_same(got, diffusers_weights(setup.adapted, 1.0, -1.0))
    # exp is a group: W ⊙ exp(sΔ) ⊙ exp(−sΔ) = W. taylor is not: W(1 + sΔ)(1 − sΔ) = W(1 − s²Δ²)
    taylor = {(m.component, f"{m.module}.weight") for m in read_lie_file(setup.adapted.path).modules if m.mode == "taylor"}
    assert taylor and all(key[1].startswith("mid_block.resnets.0.conv1") for key in taylor)
    assert_same({k: v for k, v in got.items() if k not in taylor}, setup.base)


@pytest.mark.parametrize("order", ["lora first", "lie first"])
def test_composes_with_a_plain_lora_loaded_by_comfyui(comfy, setup, order):
    lie, lora, strength = node(comfy, "LieAdapterLoader"), comfy.nodes.LoraLoader(), 0.7
    model, clip = setup.model, setup.clip
    steps = [lambda m, c: lora.load_lora(m, c, setup.lora.file, strength, strength),
             lambda m, c: lie.load(m, c, setup.file, 0.5, 0.5)]
    for step in steps if order == "lora first" else steps[::-1]:
        model, clip = step(model, clip)
    lora_updates = {k: strength * v for k, v in setup.lora.updates.items()}
    assert_same(patched_weights(setup, model, clip), merged_with_lora(setup.adapted, 0.5, lora_updates, order))


@pytest.mark.parametrize("strengths", [(1.0, 0.7), (0.5, -1.0)])
def test_two_chained_nodes_equal_both_adapters_active_in_diffusers(comfy, setup, strengths):
    """Stacking in ComfyUI is a chain of loader nodes, each patching the weight the previous one left:
    W ⊙ exp(s₁Δ₁) ⊙ exp(s₂Δ₂) = W ⊙ exp(s₁Δ₁ + s₂Δ₂), what diffusers gives with both adapters active (taylor
    layers multiply in both)."""
    second = second_subject(setup.adapted, comfy.loras / f"second-{setup.kind}.safetensors")
    loader, model, clip = node(comfy, "LieAdapterLoader"), setup.model, setup.clip
    for name, strength in zip((setup.file, second.name), strengths):
        model, clip = loader.load(model, clip, name, strength, strength)
    assert_same(patched_weights(setup, model, clip),
                together_weights(setup.adapted, [setup.adapted.path, second], strengths))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_vram_path_on_half_weights(comfy, setup, dtype):
    """LowVramPatch is what ComfyUI's low-VRAM path runs on each weight, in the weight's own dtype."""
    model, clip = node(comfy, "LieAdapterLoader").load(setup.model, setup.clip, setup.file, 1.0, 1.0)
    expected = diffusers_weights(setup.adapted, 1.0, before={
        k: v.to(dtype).float() - v for k, v in setup.base.items() if v.is_floating_point()})  # merge on rounded W
    half_ulp = 2**-11 if dtype == torch.float16 else 2**-8  # relative: W' computed in fp32, rounded once to dtype
    checked = 0
    for patcher in (model, clip.patcher):
        weights = patcher.model.state_dict()
        for key, patches in patcher.patches.items():
            if not isinstance(patches[0][1], LiePatch):
                continue  # the LoRA section: ComfyUI's own LoRA math, in the weight's dtype there
            got = comfy.model_patcher.LowVramPatch(key, patcher.patches)(weights[key].to(dtype))
            want = expected[setup.names[key]]
            assert got.dtype == dtype
            assert ((got.float() - want).abs() <= want.abs() * half_ulp + 2**-25).all(), key
            checked += 1
    assert checked == len(read_lie_file(setup.adapted.path).section("lie"))


def test_model_only_variant_patches_the_unet_only(comfy, setup):
    (model,) = node(comfy, "LieAdapterLoaderModelOnly").load_model_only(setup.model, setup.file, 1.0)
    assert model.patches and {k.split(".")[0] for k in model.patches} == {"diffusion_model"}


def test_bad_files_raise_naming_the_file_and_patch_nothing(comfy, setup):
    other = "sd1" if setup.kind == "sdxl" else "sdxl"
    huge = _rewrite(setup.adapted.path, comfy.loras / f"huge-{setup.kind}.safetensors",
                    edit_info=lambda info: info.update(alpha=1e30))
    cases = {huge.name: "NaN/inf", setup.lora.file: "not a lie-diffusion file",
             f"lie-{other}.safetensors": "does not fit this model"}
    loader = node(comfy, "LieAdapterLoader")
    for name, message in cases.items():
        with pytest.raises(ValueError, match=message) as error:
            loader.load(setup.model, setup.clip, name, 1.0, 1.0)
        assert name in str(error.value)
        assert not setup.model.patches and not setup.clip.patcher.patches


@pytest.fixture(scope="module")
def kohya_file(comfy, setup):
    return kohya_written(setup.adapted, comfy.loras / f"kohya-{setup.kind}.safetensors")


@pytest.mark.parametrize("strength", [1.0, 0.5, -1.0])
def test_a_file_written_by_the_kohya_network_matches_merge(comfy, setup, kohya_file, strength):
    """Train in sd-scripts, load in ComfyUI: the node on a file `lie_diffusion.kohya` saved."""
    model, clip = node(comfy, "LieAdapterLoader").load(setup.model, setup.clip, kohya_file.path.name, strength,
                                                       strength)
    expected = diffusers_weights(kohya_file, strength)
    changed = [k for k in expected if not torch.equal(expected[k], setup.base[k])]
    assert any(c == "unet" for c, _ in changed) and any(c != "unet" for c, _ in changed)
    assert_same(patched_weights(setup, model, clip), expected)


def test_a_file_trained_by_the_dreambooth_script(comfy, tmp_path):
    """The issue's case: train with train_scripts/train_dreambooth_lie.py (UNet and text encoder), load the
    result through the node, compare with merge_lie_weights."""
    import subprocess

    from diffusers import StableDiffusionPipeline

    from lie_diffusion.tiny import build_tiny_pipeline

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo / "examples"))
    from synthetic_data import make_instance_images

    base, images = build_tiny_pipeline(tmp_path / "base", "sd1"), tmp_path / "images"
    make_instance_images(images, count=2, size=48)
    command = [sys.executable, str(repo / "train_scripts" / "train_dreambooth_lie.py"),
               "--pretrained_model_name_or_path", str(base), "--instance_data_dir", str(images),
               "--instance_prompt", "a photo of sks toy", "--output_dir", str(tmp_path / "out"), "--resolution", "32",
               "--train_batch_size", "1", "--max_train_steps", "3", "--learning_rate", "0.01", "--lr_warmup_steps",
               "0", "--seed", "0", "--train_text_encoder", "--num_inference_steps", "2"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    trained = tmp_path / "out" / "pytorch_lora_weights.safetensors"
    (comfy.loras / "trained.safetensors").write_bytes(trained.read_bytes())
    adapted = SimpleNamespace(base=base, path=trained, cls=StableDiffusionPipeline)
    pipe = StableDiffusionPipeline.from_pretrained(str(base))
    model, unet_names = comfy_model(comfy, pipe, "sd1")
    clip, clip_names = comfy_clip(comfy, pipe, "sd1")
    setup = SimpleNamespace(names={**unet_names, **clip_names})
    base_weights = diffusers_weights(adapted)
    for strength in (1.0, 0.5):
        patched = node(comfy, "LieAdapterLoader").load(model, clip, "trained.safetensors", strength, strength)
        expected = diffusers_weights(adapted, strength)
        changed = {c for c, k in expected if not torch.equal(expected[(c, k)], base_weights[(c, k)])}
        assert changed == {"unet", "text_encoder"}
        assert_same(patched_weights(setup, *patched), expected)
