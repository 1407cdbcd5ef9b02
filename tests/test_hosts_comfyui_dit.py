"""Opt-in: the ComfyUI node on Flux.1 and SD3.5 transformers, against a real ComfyUI checkout (LIE_COMFYUI_DIR).

ComfyUI's own code throughout: its Flux / MMDiT model classes, its conversion of a diffusers transformer state dict
into the original checkpoints' fused layout (`model_detection.convert_diffusers_mmdit`, what its diffusion-model
loader runs on diffusers files), its key maps (`model_lora_keys_unet`: diffusers names → rows of fused weights),
its LoRA loader for the file's LoRA section and for a plain Flux LoRA, `ModelPatcher.patch_model` and
`LowVramPatch`. Every adapted module's weight is read back from ComfyUI's patched model through ComfyUI's own
diffusers map and compared with the formula, W ⊙ exp(t·sΔ) per module, written out in test_hosts_dit.
"""

import copy
import importlib
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from test_hosts_comfyui import COMFYUI, CPU, comfy, comfy_clip  # noqa: F401  (comfy: the ComfyUI fixture)
from test_hosts_dit import lie_file, linears, random_transformer, reference

from lie_diffusion.hosts import LiePatch
from lie_diffusion.integrations.comfyui import load_lie_adapter
from lie_diffusion.tiny import TRANSFORMER_CONFIGS

pytestmark = pytest.mark.skipif(not COMFYUI, reason="set LIE_COMFYUI_DIR to a ComfyUI checkout to run these")
# ComfyUI's MMDiT has 64-wide heads, as many as blocks (it reads the depth off the width): an SD3.5-shaped model
# of that kind (qk RMS-norm, dual attention in block 0, the last block context_pre_only)
SD35 = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=64,
            num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=128, pooled_projection_dim=64,
            pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,))
FAMILIES = ("flux", "sd3.5")
# modules in the file's LoRA section (ComfyUI's own LoRA math on them), the rest Lie; and the plain LoRA's target
LORA_SECTION = {"flux": ("transformer_blocks.0.attn.add_k_proj", "single_transformer_blocks.1.proj_out"),
                "sd3.5": ("transformer_blocks.0.attn2.to_v", "transformer_blocks.1.ff.net.0.proj")}
PLAIN_TARGET = {"flux": "single_transformer_blocks.0.attn.to_k", "sd3.5": "transformer_blocks.1.attn.add_q_proj"}
RTOL = 2**-22  # as for the SD models: float32 round-off of W + ΔW relative to the terms


def diffusers_model(family):
    return random_transformer(family, TRANSFORMER_CONFIGS["flux"], SD35)


def comfy_model(comfy, family, model):
    """A ComfyUI MODEL holding `model`'s weights, converted by ComfyUI; and ComfyUI's diffusers map of it."""
    detection = importlib.import_module("comfy.model_detection")
    state = detection.convert_diffusers_mmdit({k: v.clone() for k, v in model.state_dict().items()}, "")
    config = model.config
    if family == "flux":  # ComfyUI's detection assumes Flux-dev's 24 heads of 128: give it the tiny model's
        hidden = config.num_attention_heads * config.attention_head_dim
        unet_config = dict(image_model="flux", in_channels=config.in_channels // 4, out_channels=4, patch_size=2,
                           vec_in_dim=config.pooled_projection_dim, context_in_dim=config.joint_attention_dim,
                           hidden_size=hidden, mlp_ratio=4.0, num_heads=config.num_attention_heads,
                           depth=config.num_layers, depth_single_blocks=config.num_single_layers,
                           axes_dim=list(config.axes_dims_rope), theta=10000, qkv_bias=True, guidance_embed=True,
                           txt_ids_dims=[])
        model_config = comfy.supported_models.Flux(unet_config)
        to_comfy = comfy.utils.flux_to_diffusers(unet_config, output_prefix="diffusion_model.")
    else:
        unet_config = detection.detect_unet_config(state, "")
        model_config = comfy.supported_models.SD3(unet_config)
        to_comfy = comfy.utils.mmdit_to_diffusers(unet_config, output_prefix="diffusion_model.")
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({})
    base.diffusion_model.load_state_dict(state, strict=True)
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=CPU, offload_device=CPU)
    return patcher, {k: v for k, v in to_comfy.items() if k.endswith(".weight")}


def module_weights(to_comfy, state):
    """diffusers module → its weight in a ComfyUI state dict, read through ComfyUI's own map (rows, row order)."""
    out = {}
    for key, target in to_comfy.items():
        if (target if isinstance(target, str) else target[0]) not in state:
            continue  # a map entry for a layer this model has not (Flux's ControlNet input)
        if isinstance(target, str):
            weight = state[target]
        else:
            name, offset, *function = target
            weight = state[name] if offset is None else state[name].narrow(*offset)
            weight = function[0](weight) if function else weight
        out[key.removesuffix(".weight")] = weight.detach().clone()
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request, comfy, tmp_path_factory):  # noqa: F811
    family, tmp = request.param, tmp_path_factory.mktemp(f"comfy-{request.param}")
    model = diffusers_model(family)
    patcher, to_comfy = comfy_model(comfy, family, model)
    modules = list(linears(model))
    adapter = lie_file(model, modules, tmp, mode="mixed", lora=LORA_SECTION[family])
    base = {m: w.detach().clone() for m, w in ((m, layer.weight) for m, layer in linears(model).items())}
    assert module_weights(to_comfy, patcher.model.state_dict()).keys() >= base.keys()
    return SimpleNamespace(family=family, model=model, patcher=patcher, to_comfy=to_comfy, adapter=adapter,
                           base=base, tmp=tmp)


def patched(setup, patcher):
    """Every module's weight while ComfyUI's patch_model is in force (float32 weights)."""
    patcher.patch_model()
    try:
        return module_weights(setup.to_comfy, patcher.model.state_dict())
    finally:
        patcher.unpatch_model()


def expected(setup, strength, base=None):
    base = base or setup.base
    out = dict(base)
    for entry in setup.adapter.modules:
        out[entry.module] = reference(base[entry.module], entry, strength).float()
    return out


def plain_factors(weight):
    """(down, up) of a plain rank-2 LoRA for `weight`, seeded."""
    generator = torch.Generator().manual_seed(9)
    return (torch.randn(2, weight.shape[1], generator=generator) * 0.2,
            torch.randn(weight.shape[0], 2, generator=generator) * 0.2)


def chained(setup, target, update, order, strength=0.5):
    """The formula for the Lie file at `strength` with a plain LoRA's `update` on `target` before or after it."""
    if order == "lora first":
        return expected(setup, strength, {**setup.base, target: setup.base[target] + update})
    want = expected(setup, strength)
    want[target] = want[target] + update
    return want


def assert_same(got, want, rtol=RTOL):
    worst = {}
    for module, value in want.items():
        scale = (value.abs() + value.abs().max()).double() * rtol
        worst[module] = ((got[module].double() - value.double()).abs() / scale).max().item()
    name = max(worst, key=worst.get)
    assert worst[name] <= 1, f"{name}: off by {worst[name]:.2f}x the tolerance"


@pytest.mark.parametrize("strength", [1.0, 0.5, -1.0])
def test_node_patches_every_module_exactly(comfy, setup, strength):  # noqa: F811
    model, _ = load_lie_adapter(setup.patcher, None, setup.adapter.path, strength, 0)
    assert any(len(patches) >= 3 for patches in model.patches.values())  # q, k, v (Flux: and MLP) share a weight
    got = patched(setup, model)
    assert_same(got, expected(setup, strength))
    assert not setup.patcher.patches  # the input was cloned
    assert any(not torch.equal(got[m], setup.base[m]) for m in setup.base)


def test_plus_one_then_minus_one_undoes_exp_modules(comfy, setup):  # noqa: F811
    model, _ = load_lie_adapter(setup.patcher, None, setup.adapter.path, 1.0, 0)
    model, _ = load_lie_adapter(model, None, setup.adapter.path, -1.0, 0)
    got = patched(setup, model)
    assert_same(got, expected(setup, -1.0, expected(setup, 1.0)))
    exact = {e.module for e in setup.adapter.modules if e.mode == "exp"}
    assert_same({m: got[m] for m in exact}, {m: setup.base[m] for m in exact})


@pytest.mark.parametrize("order", ["lora first", "lie first"])
def test_chained_with_a_plain_lora_loaded_by_comfyui(comfy, setup, order):  # noqa: F811
    """A diffusers-format Flux/SD3 LoRA (its rows of a fused weight that the Lie file also adapts), loaded by
    ComfyUI's stock LoraLoaderModelOnly, before or after the node."""
    target = PLAIN_TARGET[setup.family]
    down, up = plain_factors(setup.base[target])
    name = f"plain-{setup.family}.safetensors"
    save_file({f"transformer.{target}.lora_A.weight": down, f"transformer.{target}.lora_B.weight": up},
              str(comfy.loras / name))
    plain = lambda m: comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(m, name, 0.7)[0]  # noqa: E731
    lie = lambda m: load_lie_adapter(m, None, setup.adapter.path, 0.5, 0)[0]  # noqa: E731
    model = setup.patcher
    for step in (plain, lie) if order == "lora first" else (lie, plain):
        model = step(model)
    assert_same(patched(setup, model), chained(setup, target, 0.7 * up @ down, order))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_vram_path_on_half_weights(comfy, setup, dtype):  # noqa: F811
    """LowVramPatch, what ComfyUI's low-VRAM path runs on each weight as it loads it, in the weight's dtype: on
    a fused weight every module's patch writes its own rows of the same tensor."""
    model, _ = load_lie_adapter(setup.patcher, None, setup.adapter.path, 1.0, 0)
    state = model.model.state_dict()
    lie_keys = [k for k, patches in model.patches.items() if all(isinstance(p[1], LiePatch) for p in patches)]
    out = {k: comfy.model_patcher.LowVramPatch(k, model.patches)(state[k].to(dtype)) for k in lie_keys}
    assert all(v.dtype == dtype for v in out.values())
    got = module_weights({k: t for k, t in setup.to_comfy.items() if (t if isinstance(t, str) else t[0]) in out},
                         out)
    rounded = {m: w.to(dtype).float() for m, w in setup.base.items()}
    want = {m: w for m, w in expected(setup, 1.0, rounded).items() if m in got}
    modules = {e.module for e in setup.adapter.modules if e.section == "lie"}
    assert set(want) == modules - {m for m in modules if any(  # every Lie module on a weight no LoRA module shares
        e.section == "lora" and setup.to_comfy[f"{e.module}.weight"][0] == setup.to_comfy[f"{m}.weight"][0]
        for e in setup.adapter.modules if not isinstance(setup.to_comfy[f"{m}.weight"], str)
        and not isinstance(setup.to_comfy[f"{e.module}.weight"], str))}
    half_ulp = 2**-11 if dtype == torch.float16 else 2**-8
    for module, value in want.items():
        assert ((got[module].float() - value).abs() <= value.abs() * half_ulp + 2**-25).all(), module


def test_files_for_other_models_are_refused_and_nothing_patched(comfy, setup):  # noqa: F811
    """The other transformer family's file, and an SD1 UNet file: one error naming the file and its base model."""
    from test_export import _adapted

    other = "sd3.5" if setup.family == "flux" else "flux"
    wrong = lie_file(diffusers_model(other), list(linears(diffusers_model(other)))[:6], setup.tmp / "other")
    with pytest.raises(ValueError, match=r"other/adapter.safetensors: does not fit this model \(the file was saved "
                                         r"for a (FLUX|SD3) transformer"):
        load_lie_adapter(setup.patcher, None, wrong.path, 1.0, 0)
    sd1 = _adapted(setup.tmp / "sd1", "sd1").path
    with pytest.raises(ValueError, match=r"sd1/.*: does not fit this model \(the file was saved for an SD 1.x/2.x UNet"):
        load_lie_adapter(setup.patcher, None, sd1, 1.0, 0)
    assert not setup.patcher.patches


@pytest.mark.parametrize("family", FAMILIES)
def test_clip_encoders_through_the_node(comfy, family, tmp_path):  # noqa: F811
    """Adapters on the CLIP encoders (Flux: CLIP-L; SD3: CLIP-L and CLIP-G) reach ComfyUI's CLIP models through
    its diffusers-name key map, with the transformer's in the same file; a T5 module is refused by name."""
    from lie_diffusion.io import ModuleEntry
    from lie_diffusion.tiny import tiny_text_encoder

    pipe = SimpleNamespace(text_encoder=tiny_text_encoder(0), text_encoder_2=tiny_text_encoder(1, with_projection=True)
                           if family != "flux" else None)
    clip, names = comfy_clip(comfy, pipe, "sd1" if family == "flux" else "sdxl")
    model = diffusers_model(family)
    generator, text_entries = torch.Generator().manual_seed(4), []
    targets = [("text_encoder", "encoder.layers.0.self_attn.q_proj", "lie"),
               ("text_encoder", "encoder.layers.1.mlp.fc1", "lora")]
    if family != "flux":
        targets.append(("text_encoder_2", "encoder.layers.1.self_attn.out_proj", "lie"))
    for component, suffix, section in targets:  # CLIPTextModelWithProjection keeps `text_model.` in its names
        module = next(n for n, _ in getattr(pipe, component).named_modules() if n.endswith(suffix))
        weight = getattr(pipe, component).get_submodule(module).weight
        text_entries.append(ModuleEntry(component, module, section, torch.randn(2, weight.shape[1], generator=generator)
                                        * 0.3, torch.randn(weight.shape[0], 2, generator=generator) * 0.3, 2.5,
                                        "exp" if section == "lie" else None))
    adapter = lie_file(model, list(linears(model))[:3], tmp_path, extra=text_entries)
    for strength in (1.0, -0.5):
        _, patched_clip = load_lie_adapter(None, clip, adapter.path, 0, strength)
        patched_clip.patcher.patch_model()
        try:
            state = patched_clip.cond_stage_model.state_dict()
            for entry in (e for e in adapter.modules if e.component != "transformer"):
                key = next(k for k, v in names.items() if v == (entry.component, f"{entry.module}.weight"))
                base = getattr(pipe, entry.component).get_submodule(entry.module).weight.detach()
                want = reference(base, entry, strength)
                assert ((state[key].double() - want).abs() <= RTOL * (want.abs() + want.abs().max())).all(), key
        finally:
            patched_clip.patcher.unpatch_model()
    if family == "flux":
        t5 = ModuleEntry("text_encoder_2", "encoder.block.0.layer.0.SelfAttention.q", "lie", torch.zeros(1, 4),
                         torch.zeros(4, 1), 1.0, "exp")
        with_t5 = lie_file(model, list(linears(model))[:3], tmp_path / "t5", extra=text_entries + [t5])
        with pytest.raises(ValueError, match="t5/adapter.safetensors: .*text_encoder_2.*T5"):
            load_lie_adapter(None, clip, with_t5.path, 0, 1.0)


def saved_adapter(model, family, directory):
    """save_lie_weights' file for `model` adapted by lie-diffusion (every Linear, and SD3's patch conv; balanced
    alphas), its factors random as if trained (B is zero at init)."""
    from lie_diffusion import LieConfig, add_lie_adapters, save_lie_weights

    adapted = copy.deepcopy(model)
    add_lie_adapters(adapted, LieConfig(rank=2, preset="flux-all" if family == "flux" else "sd3-all"))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for key, parameter in adapted.named_parameters():
            if "lora_" in key:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return save_lie_weights(directory, transformer=adapted)


def merged_in_diffusers(model, path, strength):
    """Module → weight of `model` with the file loaded by load_lie_weights at `strength`, then merged."""
    from lie_diffusion import load_lie_weights, merge_lie_weights

    model = copy.deepcopy(model)
    load_lie_weights(model, path, scale=strength)
    merge_lie_weights(model)
    return {m: layer.weight.detach() for m, layer in linears(model).items()}


@pytest.mark.parametrize("strength", [1.0, 0.5, -1.0])
def test_a_saved_file_through_the_node_equals_diffusers_merge(comfy, setup, strength):  # noqa: F811
    """A file written by save_lie_weights, read by the model-only node from ComfyUI's loras folder, against
    diffusers: the same file loaded by load_lie_weights at that strength and merged."""
    name = f"saved-{setup.family}.safetensors"
    if not (comfy.loras / name).exists():
        path = saved_adapter(setup.model, setup.family, setup.tmp / "saved")
        (comfy.loras / name).write_bytes(path.read_bytes())
    (model,) = comfy.nodes.NODE_CLASS_MAPPINGS["LieAdapterLoaderModelOnly"]().load_model_only(
        setup.patcher, name, strength)
    want = merged_in_diffusers(setup.model, comfy.loras / name, strength)
    assert all(not torch.equal(want[m], setup.base[m]) for m in want)  # every layer adapted
    assert_same(patched(setup, model), want)


def test_an_exported_file_through_comfyuis_stock_lora_loader(comfy, setup):  # noqa: F811
    """`export` (conv exact: ΔW whole, `.diff`) of a Lie file, read by ComfyUI's stock LoraLoaderModelOnly at
    strength 1: the Lie model on every module, fused rows and swapped halves included."""
    from lie_diffusion.export import export_kohya

    adapter = lie_file(setup.model, list(linears(setup.model)), setup.tmp / "export", mode="mixed")
    tensors, rows = export_kohya(adapter, {"transformer": setup.model}, conv="exact", dtype=torch.float32)
    assert len(rows) == len(setup.base)
    name = f"exported-{setup.family}.safetensors"
    save_file(tensors, str(comfy.loras / name))
    model = comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(setup.patcher, name, 1.0)[0]
    targets = [setup.to_comfy[f"{m}.weight"] for m in setup.base]
    assert set(model.patches) == {t if isinstance(t, str) else t[0] for t in targets}  # ComfyUI took every key
    want = dict(setup.base)
    want.update({e.module: reference(setup.base[e.module], e, 1.0).float() for e in adapter.modules})
    assert_same(patched(setup, model), want)
