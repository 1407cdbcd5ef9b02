"""The injector on tiny SD1 / SD2 / SDXL UNets, the CLIP text encoder and a tiny pipeline, driven
through diffusers' own adapter controls (fuse_lora, set_adapters, disable/enable, delete)."""

import copy
import warnings

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from lie_diffusion import LieConfig, add_lie_adapters, merge_lie_weights
from lie_diffusion.inject import find_targets, remove_adapter
from lie_diffusion.layers import LieConv2d, LieLayerMixin, LieLinear
from lie_diffusion.tiny import tiny_text_encoder, tiny_unet

pytestmark = pytest.mark.filterwarnings(
    "ignore:Already following adapters", "ignore:All adapters are already", "ignore:Already found a `peft_config`"
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def unet_inputs(unet, batch=2):
    g = torch.Generator().manual_seed(1)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 32, generator=g),
                                       "time_ids": torch.randn(batch, 6, generator=g)}
    return (torch.randn(batch, 4, 16, 16, generator=g), torch.tensor([10, 700][:batch]),
            torch.randn(batch, 7, unet.config.cross_attention_dim, generator=g)), kwargs


def run(unet):
    args, kwargs = unet_inputs(unet)
    with torch.no_grad():
        return unet(*args, **kwargs).sample


def randomize(model, adapter=None, std=0.1):
    """Give the adapters' B (zero at init) random values so they change the model. Lie layers with a scaling
    s > 1 (the balancing rule's, alpha / RMS(W)) get B ~ N(0, std / s), so that s·B stays of the usual size."""
    with torch.no_grad():
        for layer in model.modules():
            if not isinstance(layer, LoraLayer):
                continue
            for name, B in layer.lora_B.items():
                if adapter is None or name == adapter:
                    lie = isinstance(layer, LieLayerMixin)
                    B.weight.normal_(0, std / max(1.0, layer.scaling[name]) if lie else std)
    return model


def base_weights(model):
    """{module name: its (base) weight}, for every Conv2d / Linear, adapted or not."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, BaseTunerLayer):
            out[name] = m.get_base_layer().weight.detach().clone()
        elif isinstance(m, (nn.Conv2d, nn.Linear)) and ".lora_" not in name and not name.endswith("base_layer"):
            out[name] = m.weight.detach().clone()
    return out


def expected_unet_targets(unet):
    """Default targets found from the module types (independently of the config's regexes)."""
    convs, attns = set(), set()
    for name, m in unet.named_modules():
        if isinstance(m, ResnetBlock2D):
            convs |= {f"{name}.conv1", f"{name}.conv2"} | ({f"{name}.conv_shortcut"} if m.conv_shortcut else set())
        elif isinstance(m, (Downsample2D, Upsample2D)):
            convs.add(f"{name}.conv")
        elif isinstance(m, Attention) and name.rsplit(".", 1)[-1] in ("attn1", "attn2"):
            attns |= {f"{name}.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")}
    return convs, attns


def adapted_names(model):
    lie = {n for n, m in model.named_modules() if isinstance(m, LieLayerMixin)}
    lora = {n for n, m in model.named_modules() if isinstance(m, LoraLayer) and not isinstance(m, LieLayerMixin)}
    return lie, lora


def factor_count(module, r):
    base = module.get_base_layer()
    if isinstance(base, nn.Conv2d):
        kh, kw = base.kernel_size
        return r * base.in_channels * kh * kw + base.out_channels * r
    return r * (base.in_features + base.out_features)


def ref_delta(layer, adapter, weight_scale=1.0):
    A, B = layer.lora_A[adapter].weight.double(), layer.lora_B[adapter].weight.double()
    s = weight_scale * layer.lora_alpha[adapter] / layer.r[adapter]
    return (B.flatten(1) @ A.flatten(1)).reshape(layer.get_base_layer().weight.shape) * s


# --- targets, identity, trainability ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_default_targets_identity_and_trainable_parameters(kind):
    unet = tiny_unet(kind)
    before = run(unet)
    add_lie_adapters(unet, LieConfig(rank=3))

    convs, attns = expected_unet_targets(unet)
    assert len(convs) > 15 and len(attns) >= 32
    lie, lora = adapted_names(unet)
    assert lie == convs, f"Lie targets differ: extra {sorted(lie - convs)}, missing {sorted(convs - lie)}"
    assert lora == attns, f"LoRA targets differ: extra {sorted(lora - attns)}, missing {sorted(attns - lora)}"
    assert all(isinstance(unet.get_submodule(n), LieConv2d) for n in convs)

    torch.testing.assert_close(run(unet), before, rtol=0, atol=1e-6)  # identity at init

    trainable = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    assert all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    expected = sum(factor_count(unet.get_submodule(n), 3) for n in lie | lora)
    assert sum(p.numel() for p in trainable.values()) == expected

    randomize(unet)
    args, kwargs = unet_inputs(unet)
    unet(*args, **kwargs).sample.square().mean().backward()
    with_grad = {n for n, p in unet.named_parameters() if p.grad is not None}
    assert with_grad == set(trainable), f"unexpected grads: {sorted(with_grad ^ set(trainable))[:5]}"
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in trainable.values())


def test_broad_patterns_never_target_the_parts_of_adapted_layers():
    unet = add_lie_adapters(tiny_unet("sd1"), LieConfig(), "a")
    broad = LieConfig(conv_targets=(r"conv.*",), attn_targets=(r"to_.*",))
    convs, attns = find_targets(unet, broad)
    assert not [n for n in convs + attns if ".lora_" in n or ".base_layer" in n]
    add_lie_adapters(unet, broad, "b")
    for name, m in unet.named_modules():
        if isinstance(m, LoraLayer):
            assert ".lora_" not in name and ".base_layer" not in name, name
            assert not isinstance(m.get_base_layer(), LoraLayer), f"{name} wraps an adapter layer"
    lie, lora = adapted_names(unet)
    assert {"conv_in", "conv_out", "down_blocks.0.resnets.0.conv1"} <= lie
    assert {n for n in lora if n.endswith("to_out.0")} and not {n for n in lora if "lora" in n}


def test_gradient_checkpointing_gives_the_same_gradients():
    """Checkpointing re-runs the op's forward; with dropout the RNG replay must give the same masks."""
    unet = randomize(add_lie_adapters(tiny_unet("sd1"), LieConfig(dropout=0.3))).train()
    args, kwargs = unet_inputs(unet)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet.zero_grad()
        torch.manual_seed(5)
        unet(*args, **kwargs).sample.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7)


def test_unet_adapter_gradients_match_finite_differences():
    """Acceptance: in float64, the analytic directional derivative along a random direction of all adapter
    parameters (Lie convs and LoRA projections) equals the central finite difference of the loss."""
    unet = randomize(add_lie_adapters(tiny_unet("sd1"), LieConfig(rank=2)), std=0.2).double()
    args, kwargs = unet_inputs(unet, batch=1)
    args = tuple(a.double() if a.is_floating_point() else a for a in args)
    params = [p for p in unet.parameters() if p.requires_grad]
    direction = [torch.randn_like(p) for p in params]

    def loss():
        return unet(*args, **kwargs).sample.square().mean()

    loss().backward()
    analytic = sum((p.grad * d).sum() for p, d in zip(params, direction)).item()
    eps, values = 1e-6, []
    with torch.no_grad():
        for sign in (1, -2, 1):  # +eps, then -eps, then back
            for p, d in zip(params, direction):
                p.add_(sign * eps * d)
            values.append(loss().item())
    numeric = (values[0] - values[1]) / (2 * eps)
    assert abs(analytic) > 1e-6
    assert numeric == pytest.approx(analytic, rel=1e-5), (numeric, analytic)


@pytest.mark.parametrize("attn_adapter", ["lie", "none"])
def test_attention_adapter_kinds(attn_adapter):
    unet = tiny_unet("sd1")
    add_lie_adapters(unet, LieConfig(attn_adapter=attn_adapter, mode="taylor"))
    convs, attns = expected_unet_targets(unet)
    lie, lora = adapted_names(unet)
    assert lora == set()
    assert lie == (convs | attns if attn_adapter == "lie" else convs)
    if attn_adapter == "lie":
        assert all(isinstance(unet.get_submodule(n), LieLinear) for n in attns)
    assert all(unet.get_submodule(n).lie_mode == {"default": "taylor"} for n in lie)


@pytest.mark.parametrize("balance", ["none", "rms"])
def test_ranks_alphas_and_overrides(balance):
    unet = tiny_unet("sd1")
    conv, attn = "down_blocks.1.resnets.0.conv1", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
    other_conv = "down_blocks.0.resnets.0.conv2"
    rms = unet.get_submodule(other_conv).weight.detach().double().pow(2).mean().sqrt().item()
    config = LieConfig(rank=4, alpha=2.0, attn_rank=2, attn_alpha=8.0, balance=balance)
    add_lie_adapters(unet, config, overrides={conv: (6, 3.0), attn: (1, 1.0)})
    checks = {
        other_conv: (4, 0.5 / rms if balance == "rms" else 0.5),  # LoRA attention is never balanced
        conv: (6, 0.5),  # overrides are used as given
        "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (2, 4.0),
        attn: (1, 1.0),
    }
    for name, (r, scaling) in checks.items():
        layer = unet.get_submodule(name)
        assert layer.r["default"] == r and layer.scaling["default"] == pytest.approx(scaling), name
        assert layer.lora_A["default"].weight.shape[0] == r
    total = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    lie, lora = adapted_names(unet)
    assert total == sum(factor_count(unet.get_submodule(n), unet.get_submodule(n).r["default"]) for n in lie | lora)


def test_text_encoder_targets_and_identity():
    encoder = tiny_text_encoder()
    ids = torch.randint(0, 1000, (2, 8))
    before = encoder(ids)[0].detach()
    add_lie_adapters(encoder, LieConfig())
    expected = {f"{n}.{p}" for n, m in encoder.named_modules() if n.endswith("self_attn")
                for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
    assert len(expected) == 8 and adapted_names(encoder) == (set(), expected)
    torch.testing.assert_close(encoder(ids)[0], before, rtol=0, atol=1e-6)
    assert all(".lora_" in n for n, p in encoder.named_parameters() if p.requires_grad)

    lie_encoder = add_lie_adapters(tiny_text_encoder(), LieConfig(attn_adapter="lie"))
    assert adapted_names(lie_encoder) == (expected, set())


# --- diffusers' controls on the UNet ------------------------------------------------------------------


def test_fuse_unfuse_round_trip_and_fused_structure():
    unet = tiny_unet("sd1")
    add_lie_adapters(unet, LieConfig(rank=2))
    randomize(unet)
    W0 = base_weights(unet)
    adapted = run(unet)

    unet.fuse_lora()
    torch.testing.assert_close(run(unet), adapted, rtol=1e-5, atol=1e-5)
    for name in adapted_names(unet)[0]:
        layer = unet.get_submodule(name)
        fused, W = layer.get_base_layer().weight.detach().double(), W0[name].double()
        assert torch.equal(torch.sign(fused), torch.sign(W)), f"{name}: a sign flipped"
        log_ratio = (fused / W).log().flatten(1)
        torch.testing.assert_close(log_ratio, ref_delta(layer, "default").flatten(1), rtol=1e-4, atol=1e-5)
        assert torch.linalg.matrix_rank(log_ratio, rtol=1e-3).item() <= 2, name

    unet.unfuse_lora()
    for name, W in base_weights(unet).items():
        torch.testing.assert_close(W, W0[name], rtol=1e-6, atol=1e-7, msg=lambda m: f"{name} not restored: {m}")
    # float32 round-off of outputs of size ~1 through the network (the weights match to 1e-7 above)
    torch.testing.assert_close(run(unet), adapted, rtol=1e-6, atol=2e-6)


def test_set_adapters_scales_minus_one_is_the_inverse_and_zero_is_identity():
    unet = tiny_unet("sd1")
    W0, base = base_weights(unet), run(unet)
    add_lie_adapters(unet, LieConfig(rank=2), "plus")
    randomize(unet)
    add_lie_adapters(unet, LieConfig(rank=2), "minus")
    with torch.no_grad():  # the same factors under a second name
        params = dict(unet.named_parameters())
        for name, p in params.items():
            if ".minus." in name:
                p.copy_(params[name.replace(".minus.", ".plus.")])

    unet.set_adapters(["plus"], [0.0])
    torch.testing.assert_close(run(unet), base, rtol=0, atol=1e-6)
    unet.set_adapters(["plus"], [1.0])
    plus = run(unet)
    assert (plus - base).abs().max() > 1e-3, "the adapter should change the output"

    unet.set_adapters(["plus", "minus"], [1.0, -1.0])  # W ⊙ exp(Δ) ⊙ exp(-Δ) = W
    torch.testing.assert_close(run(unet), base, rtol=0, atol=1e-5)
    unet.fuse_lora(adapter_names=["plus"])
    lie = adapted_names(unet)[0]
    for name in lie:
        layer = unet.get_submodule(name)
        expected = W0[name].double() * ref_delta(layer, "plus").exp()
        torch.testing.assert_close(layer.get_base_layer().weight.double(), expected, rtol=1e-5, atol=1e-7)
    unet.fuse_lora(adapter_names=["minus"])
    for name, W in base_weights(unet).items():
        torch.testing.assert_close(W, W0[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(run(unet), base, rtol=0, atol=1e-5)
    unet.unfuse_lora()
    for name, W in base_weights(unet).items():
        torch.testing.assert_close(W, W0[name], rtol=1e-6, atol=1e-7)


def test_two_adapters_compose_exactly_in_any_order():
    unet = tiny_unet("sd1")
    W0 = base_weights(unet)
    add_lie_adapters(unet, LieConfig(rank=2), "a")
    add_lie_adapters(unet, LieConfig(rank=3, alpha=1.5), "b")
    randomize(unet)
    unet.set_adapters(["a", "b"], [0.6, -1.2])
    ab = run(unet)
    unet.set_adapters(["b", "a"], [-1.2, 0.6])
    # Lie layers sum the algebra elements (commutative); LoRA layers add their outputs in call order (float round-off)
    torch.testing.assert_close(run(unet), ab, rtol=1e-6, atol=2e-6)

    unet.fuse_lora()
    torch.testing.assert_close(run(unet), ab, rtol=1e-5, atol=1e-5)
    lie, lora = adapted_names(unet)
    for name in lie:  # W ⊙ exp(s_a Δ_a + s_b Δ_b)
        layer = unet.get_submodule(name)
        expected = W0[name].double() * (ref_delta(layer, "a", 0.6) + ref_delta(layer, "b", -1.2)).exp()
        torch.testing.assert_close(layer.get_base_layer().weight.double(), expected, rtol=1e-5, atol=1e-7)
    for name in lora:  # plain LoRA stays additive
        layer = unet.get_submodule(name)
        expected = W0[name].double() + ref_delta(layer, "a", 0.6) + ref_delta(layer, "b", -1.2)
        torch.testing.assert_close(layer.get_base_layer().weight.double(), expected, rtol=1e-5, atol=1e-6)


def test_fuse_with_lora_scale_then_unfuse():
    unet = tiny_unet("sd1")
    add_lie_adapters(unet, LieConfig())
    randomize(unet)
    W0 = base_weights(unet)
    unet.set_adapters(["default"], [0.5])
    half = run(unet)
    unet.set_adapters(["default"], [1.0])
    unet.fuse_lora(lora_scale=0.5)
    torch.testing.assert_close(run(unet), half, rtol=1e-5, atol=1e-5)
    unet.unfuse_lora()
    for name, W in base_weights(unet).items():
        torch.testing.assert_close(W, W0[name], rtol=1e-6, atol=1e-7)


def test_disable_enable_and_delete_adapters():
    unet = tiny_unet("sdxl")
    base = run(unet)
    add_lie_adapters(unet, LieConfig(), "a")
    add_lie_adapters(unet, LieConfig(mode="taylor"), "b")
    randomize(unet)
    unet.set_adapters(["a", "b"], [1.0, 0.7])
    adapted = run(unet)
    unet.disable_adapters()
    torch.testing.assert_close(run(unet), base, rtol=0, atol=1e-6)
    unet.enable_adapters()
    torch.testing.assert_close(run(unet), adapted, rtol=0, atol=1e-6)

    unet.set_adapters(["a"], [1.0])
    only_a = run(unet)
    unet.set_adapters(["a", "b"], [1.0, 0.7])
    unet.delete_adapters("b")
    assert list(unet.peft_config) == ["a"]
    assert all("b" not in m.lora_A and "b" not in m.lie_mode for m in unet.modules() if isinstance(m, LieLayerMixin))
    torch.testing.assert_close(run(unet), only_a, rtol=0, atol=1e-6)
    unet.delete_adapters("a")
    torch.testing.assert_close(run(unet), base, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_unet_keeps_float32_adapters(dtype):
    unet = tiny_unet("sd1").to(dtype)
    add_lie_adapters(unet, LieConfig())
    randomize(unet)
    assert {p.dtype for n, p in unet.named_parameters() if ".lora_" in n} == {torch.float32}
    assert {p.dtype for n, p in unet.named_parameters() if ".lora_" not in n} == {dtype}
    args, kwargs = unet_inputs(unet)
    out = unet(*(a.to(dtype) if a.is_floating_point() else a for a in args), **kwargs).sample
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().square().mean().backward()
    grads = [p.grad for p in unet.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_autocast_training_step():
    unet = tiny_unet("sd1")
    add_lie_adapters(unet, LieConfig())
    randomize(unet)
    reference = run(unet)
    args, kwargs = unet_inputs(unet)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = unet(*args, **kwargs).sample
    torch.testing.assert_close(out.float(), reference, rtol=0.1, atol=0.1)
    out.float().square().mean().backward()
    grads = [p.grad for p in unet.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


# --- merge and save ---------------------------------------------------------------------------------


def test_merge_lie_weights_leaves_a_stock_model(tmp_path):
    unet = tiny_unet("sd2")
    targets = set().union(*expected_unet_targets(unet))
    add_lie_adapters(unet, LieConfig())
    randomize(unet)
    adapted = run(unet)
    assert merge_lie_weights(unet) is unet
    assert not any(isinstance(m, BaseTunerLayer) for m in unet.modules())
    assert all(type(unet.get_submodule(n)) in (nn.Conv2d, nn.Linear) for n in targets)
    assert not any("lora" in k or "base_layer" in k for k in unet.state_dict())
    assert not getattr(unet, "_hf_peft_config_loaded", False) and getattr(unet, "peft_config", None) is None
    torch.testing.assert_close(run(unet), adapted, rtol=1e-5, atol=1e-5)

    unet.save_pretrained(tmp_path)
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path)
    torch.testing.assert_close(run(reloaded), adapted, rtol=1e-4, atol=1e-4)


def test_merge_lie_weights_named_adapters_and_remove_adapter():
    unet = tiny_unet("sd1")
    base = run(unet)
    add_lie_adapters(unet, LieConfig(), "a")
    add_lie_adapters(unet, LieConfig(mode="taylor", attn_adapter="none"), "b")
    randomize(unet)
    unet.set_adapters(["a"], [0.5])
    only_a = run(unet)
    unet.set_adapters(["a", "b"], [0.5, 1.0])
    merged = merge_lie_weights(copy.deepcopy(unet), adapter_names=["a"])  # "b" is dropped, not merged
    torch.testing.assert_close(run(merged), only_a, rtol=1e-5, atol=1e-5)

    remove_adapter(unet, "a")
    assert list(unet.peft_config) == ["b"] and not adapted_names(unet)[1], "LoRA layers that held only 'a' are gone"
    unet.set_adapters(["b"], [1.0])
    remove_adapter(unet, "b")
    assert not any(isinstance(m, BaseTunerLayer) for m in unet.modules())
    assert getattr(unet, "peft_config", None) is None and not unet._hf_peft_config_loaded
    torch.testing.assert_close(run(unet), base, rtol=0, atol=1e-6)


# --- errors leave the model as it was ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(mode="cayley"), "mode"),
        (dict(attn_adapter="dora"), "attn_adapter"),
        (dict(rank=0), "rank"),
        (dict(rank=2.5), "rank"),
        (dict(rank=True), "rank"),
        (dict(attn_rank=-1), "attn_rank"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(conv_targets=("resnets.(conv1",)), "regex"),
    ],
)
def test_lie_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LieConfig(**kwargs)


def test_lie_config_defaults_and_single_pattern():
    config = LieConfig(rank=8, conv_targets="conv1", attn_targets=[r"to_q"])
    assert config.conv_targets == ("conv1",) and config.attn_targets == ("to_q",)
    assert config.conv_rank_alpha == (8, 8.0) and config.attn_rank_alpha == (8, 8.0)
    assert LieConfig(rank=4, alpha=2, attn_rank=2).attn_rank_alpha == (2, 2.0)
    unet = add_lie_adapters(tiny_unet("sd1"), config)
    lie, lora = adapted_names(unet)
    assert lie and all(n.endswith(".conv1") for n in lie) and lora and all(n.endswith(".to_q") for n in lora)


def snapshot(model):
    return dict(
        modules=[(n, type(m)) for n, m in model.named_modules()],
        state={k: v.clone() for k, v in model.state_dict().items()},
        grads={n: p.requires_grad for n, p in model.named_parameters()},
        peft=list(getattr(model, "peft_config", None) or {}),
        loaded=getattr(model, "_hf_peft_config_loaded", None),
        active=[sorted(m.active_adapters) for m in model.modules() if isinstance(m, BaseTunerLayer)],
    )


def assert_unchanged(model, before):
    after = snapshot(model)
    for key in ("modules", "grads", "peft", "loaded", "active"):
        assert after[key] == before[key], f"model changed after a failed add_lie_adapters: {key}"
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())


def _grouped(unet):
    old = unet.up_blocks[1].resnets[1].conv2  # late in module order: earlier layers get injected first
    unet.up_blocks[1].resnets[1].conv2 = nn.Conv2d(old.in_channels, old.out_channels, 3, padding=1, groups=2)
    return unet


@pytest.mark.parametrize(
    "case,prepare,config,match",
    [
        ("no targets", lambda u: u, LieConfig(conv_targets=("nothing",), attn_adapter="none"), "selects no module"),
        ("duplicate", lambda u: add_lie_adapters(u, LieConfig()), LieConfig(), "already has an adapter named"),
        ("plain LoRA", lambda u: u.add_adapter(LoraConfig(r=2, target_modules=["conv1"]), "plain") or u,
         LieConfig(), r"down_blocks\.0\.resnets\.0\.conv1 already carries plain LoRA"),
        ("unknown override", lambda u: u, (LieConfig(), {"conv_in": (2, 2.0)}), "'conv_in', which the LieConfig does not"),
        ("zero-rank override", lambda u: u, (LieConfig(), {"mid_block.resnets.0.conv1": (0, 1.0)}), "rank 0"),
        ("groups", _grouped, LieConfig(), r"up_blocks\.1\.resnets\.1\.conv2.*groups=2"),
        ("groups, second adapter", lambda u: add_lie_adapters(_grouped(u), LieConfig(conv_targets=("conv1",)), "x"),
         LieConfig(), r"up_blocks\.1\.resnets\.1\.conv2.*groups=2"),
    ],
)
def test_add_lie_adapters_errors_leave_model_unchanged(case, prepare, config, match):
    unet = prepare(tiny_unet("sd1"))
    config, overrides = config if isinstance(config, tuple) else (config, None)
    before = snapshot(unet)
    with pytest.raises(ValueError, match=match):
        add_lie_adapters(unet, copy.deepcopy(config), overrides=overrides)
    assert_unchanged(unet, before)


# --- pipeline-level methods ---------------------------------------------------------------------------


def pipeline_outputs(pipe):
    ids = pipe.tokenizer(["a photo of a cat"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0]
        latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        return text, pipe.unet(latents, torch.tensor([500]), text).sample


def assert_outputs_close(got, want, atol=1e-5):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=atol)


def test_pipeline_level_methods(tiny_pipeline_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    base, W0 = pipeline_outputs(pipe), base_weights(pipe.unet)
    for component in (pipe.unet, pipe.text_encoder):
        randomize(add_lie_adapters(component, LieConfig(), "x"), std=0.2)
    assert pipe.get_list_adapters() == {"unet": ["x"], "text_encoder": ["x"]}
    adapted = pipeline_outputs(pipe)
    assert all((a - b).abs().max() > 1e-4 for a, b in zip(adapted, base))

    pipe.fuse_lora()
    assert_outputs_close(pipeline_outputs(pipe), adapted)
    assert any(not torch.equal(W, W0[n]) for n, W in base_weights(pipe.unet).items())
    pipe.unfuse_lora()
    for name, W in base_weights(pipe.unet).items():
        torch.testing.assert_close(W, W0[name], rtol=1e-6, atol=1e-7)
    assert_outputs_close(pipeline_outputs(pipe), adapted)

    pipe.set_adapters(["x"], [0.0])
    assert_outputs_close(pipeline_outputs(pipe), base)
    pipe.set_adapters(["x"], [1.0])
    pipe.disable_lora()
    assert_outputs_close(pipeline_outputs(pipe), base)
    pipe.enable_lora()
    assert_outputs_close(pipeline_outputs(pipe), adapted)

    def adapted_copy():
        other = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
        for name in ("unet", "text_encoder"):
            add_lie_adapters(getattr(other, name), LieConfig(), "x")
            getattr(other, name).load_state_dict(getattr(pipe, name).state_dict())
        return other

    def plain(other):
        return not any(isinstance(m, BaseTunerLayer) for c in (other.unet, other.text_encoder) for m in c.modules())

    merged = adapted_copy()
    assert merge_lie_weights(merged) is merged and plain(merged)
    assert_outputs_close(pipeline_outputs(merged), adapted)
    fused = adapted_copy()
    fused.fuse_lora()
    fused.unload_lora_weights()  # diffusers' recipe to keep a fused model
    assert plain(fused)
    assert_outputs_close(pipeline_outputs(fused), adapted)

    pipe.delete_adapters("x")
    assert pipe.get_list_adapters() == {}
    assert_outputs_close(pipeline_outputs(pipe), base)


# --- issue 8: diffusers' controls on the layers lie-diffusion creates ---------------------------------------------


@pytest.mark.filterwarnings("ignore:Adapter lie was active")
def test_delete_adapters_frees_layers_for_either_kind_of_adapter():
    """After diffusers' delete_adapters, the emptied Lie layers take plain LoRA or new Lie adapters."""
    unet = tiny_unet("sd1")
    add_lie_adapters(unet, LieConfig(rank=4), "lie")
    unet.delete_adapters("lie")
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["conv1"]), "plain")
    conv1 = unet.down_blocks[0].resnets[0].conv1
    assert list(conv1.lora_A) == ["plain"] and not isinstance(conv1, LieLayerMixin)
    randomize(unet, "plain")
    with torch.no_grad():  # W + sBA: the new adapter is plain additive LoRA
        expected_weight = conv1.get_base_layer().weight.double() + ref_delta(conv1, "plain")
    unet.fuse_lora()
    torch.testing.assert_close(conv1.get_base_layer().weight.double(), expected_weight, rtol=1e-5, atol=1e-6)
    unet.unfuse_lora()
    unet.delete_adapters("plain")
    add_lie_adapters(unet, LieConfig(rank=2, attn_adapter="lie"), "again")
    lie, lora = adapted_names(unet)
    assert "down_blocks.0.resnets.0.conv1" in lie and not lora
    assert all(list(unet.get_submodule(n).lora_A) == ["again"] for n in lie)


def test_bare_lie_lora_config_through_diffusers_add_adapter():
    """unet.add_adapter(LieLoraConfig(...)) without any registration step builds Lie layers."""
    from lie_diffusion.layers import LieLoraConfig

    unet = tiny_unet("sd1")
    unet.add_adapter(LieLoraConfig(r=2, target_modules=["conv1", "to_q"], lie_mode="taylor"))
    lie, lora = adapted_names(unet)
    assert lie and all(n.endswith("conv1") for n in lie) and lora and all(n.endswith("to_q") for n in lora)
    assert all(unet.get_submodule(n).lie_mode == {"default": "taylor"} for n in lie)


def two_attention_adapters():
    unet = tiny_unet("sd1")
    add_lie_adapters(unet, LieConfig(rank=2, conv_targets=()), "a")
    add_lie_adapters(unet, LieConfig(rank=3, conv_targets=()), "b")
    return randomize(unet)


def test_attention_lora_unfuse_after_set_adapters_is_exact():
    """fuse_lora, then set_adapters with another weight, then unfuse_lora: the base weights come back."""
    unet = two_attention_adapters()
    W0 = base_weights(unet)
    unet.set_adapters(["a", "b"], [0.7, -0.5])
    unet.fuse_lora()
    unet.set_adapters(["a", "b"], [0.2, 1.5])
    unet.unfuse_lora()
    for name, W in base_weights(unet).items():
        torch.testing.assert_close(W, W0[name], rtol=1e-6, atol=1e-6, msg=lambda m: f"{name} not restored: {m}")


def test_attention_lora_other_active_adapters_act_while_one_is_fused():
    unet = two_attention_adapters()
    unet.set_adapters(["a", "b"], [0.7, -0.5])
    both = run(unet)
    unet.fuse_lora(adapter_names=["a"])
    torch.testing.assert_close(run(unet), both, rtol=1e-5, atol=1e-5)
    unet.unfuse_lora()
    torch.testing.assert_close(run(unet), both, rtol=1e-5, atol=1e-5)
