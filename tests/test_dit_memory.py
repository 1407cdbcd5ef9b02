"""Memory at DiT scale: the per-device budget of the unfused-inference W' cache, on a tiny Flux
transformer built from a config, and on FLUX.1-dev's real layer shapes (built on the meta device)."""

import gc
import warnings

import pytest
import torch

from lie_diffusion import LieConfig, add_lie_adapters, set_lie_speed_options, set_lie_weight_cache_budget
from lie_diffusion.inject import find_targets
from lie_diffusion.layers import DEFAULT_WEIGHT_CACHE_BUDGET, WEIGHT_CACHE_BUDGET, LieLinear, WeightCacheBudget

# diffusers' Flux DreamBooth LoRA targets, as regexes on the end of module names.
FLUX_TARGETS = (r"attn\.to_q", r"attn\.to_k", r"attn\.to_v", r"attn\.to_out\.0", r"attn\.add_q_proj", r"attn\.add_k_proj",
                r"attn\.add_v_proj", r"attn\.to_add_out", r"ff\.net\.0\.proj", r"ff\.net\.2", r"ff_context\.net\.0\.proj",
                r"ff_context\.net\.2")
LIE_ON_FLUX = dict(attn_adapter="lie", attn_targets=FLUX_TARGETS, conv_targets=(), balance="none")
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))


@pytest.fixture(autouse=True)
def held_before():
    """Every test starts from the default budget and leaves it so; gives the bytes cached on the CPU before it
    (caches of models other tests still hold, if any)."""
    gc.collect()
    set_lie_weight_cache_budget()
    yield WEIGHT_CACHE_BUDGET.held["cpu"]
    set_lie_weight_cache_budget()
    gc.collect()


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                   guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    add_lie_adapters(model, LieConfig(rank=2, **LIE_ON_FLUX))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model.eval()


def flux_inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(3.0), torch.arange(3.0), indexing="ij"), -1).reshape(-1, 3)
    return dict(hidden_states=torch.randn(1, 9, 4, generator=g), encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                guidance=torch.tensor([3.5]), img_ids=ids, txt_ids=torch.zeros(5, 3))


def lie_layers(model):
    return [m for m in model.modules() if isinstance(m, LieLinear)]


def cached_bytes(model):
    return sum(m._lie_cache[2].numel() * m._lie_cache[2].element_size() for m in lie_layers(model) if m._lie_cache)


def run(model):
    with torch.no_grad():
        return model(**flux_inputs()).sample


def test_budget_decides_how_many_layers_cache_and_outputs_do_not_change(held_before):
    model = tiny_flux()
    layers = lie_layers(model)
    sizes = [m.get_base_layer().weight.numel() * 4 for m in layers]
    assert len(layers) == 15

    set_lie_weight_cache_budget(None)  # no limit: every layer caches
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        full, again = run(model), run(model)
    assert all(m._lie_cache is not None for m in layers)
    assert WEIGHT_CACHE_BUDGET.held["cpu"] - held_before == cached_bytes(model) == sum(sizes)

    set_lie_speed_options(model, weight_cache=False)  # release, then the same model under a budget of half of it
    gc.collect()
    assert WEIGHT_CACHE_BUDGET.held["cpu"] == held_before
    set_lie_speed_options(model, weight_cache=True)
    set_lie_weight_cache_budget(held_before + sum(sizes) // 2)
    with pytest.warns(UserWarning, match=r"W' cache .* is full on cpu .*set_lie_weight_cache_budget") as caught:
        partial = run(model)
        partial_again = run(model)  # the refused layers are refused again, without a second warning
    assert len([w for w in caught if "W' cache" in str(w.message)]) == 1
    held = cached_bytes(model)
    assert 0 < held <= sum(sizes) // 2 and WEIGHT_CACHE_BUDGET.held["cpu"] - held_before == held
    assert 0 < sum(m._lie_cache is None for m in layers) < len(layers)

    set_lie_speed_options(model, weight_cache=False)
    gc.collect()
    set_lie_speed_options(model, weight_cache=True)
    set_lie_weight_cache_budget(0)  # no cache at all
    with pytest.warns(UserWarning, match="W' cache"):
        none = run(model)
    assert all(m._lie_cache is None for m in layers) and WEIGHT_CACHE_BUDGET.held["cpu"] == held_before

    for out in (again, partial, partial_again, none):  # the cache only saves work: the same numbers
        torch.testing.assert_close(out, full, rtol=0, atol=0)
    model.fuse_lora()  # and they are the adapted model's: fused W ⊙ exp(Δ) gives the same output
    torch.testing.assert_close(run(model), full, rtol=1e-4, atol=1e-5)


def test_held_bytes_follow_every_release(held_before):
    set_lie_weight_cache_budget(None)
    model = tiny_flux()

    def held():
        return WEIGHT_CACHE_BUDGET.held["cpu"] - held_before

    run(model)
    assert held() == cached_bytes(model) > 0
    model.disable_adapters()
    run(model)
    assert held() == 0  # disabled adapters release their W'
    model.enable_adapters()
    run(model)
    assert held() == cached_bytes(model) > 0
    del model  # a model dropped with its caches returns their bytes
    gc.collect()
    assert held() == 0


def test_default_budget_caches_an_sd_unet_whole_and_flux_dev_in_part():
    """The default policy on real shapes: an SD1.5 UNet's default Lie targets fit (fp16 and fp32), FLUX.1-dev's
    Lie targets in bf16 get at most the budget, a fraction of the model, and a warning."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    with torch.device("meta"):
        sd15 = UNet2DConditionModel(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768)
        flux = FluxTransformer2DModel(**FLUX_DEV)
    sd15_weights = [sd15.get_submodule(n).weight.numel() for n in find_targets(sd15, LieConfig())[0]]
    flux_weights = [flux.get_submodule(n).weight.numel() for n in find_targets(flux, LieConfig(**LIE_ON_FLUX))[1]]
    model_bytes = sum(p.numel() for p in flux.parameters()) * 2

    def admitted(weights, dtype):
        """Bytes a fresh default budget admits for W' of these sizes, called in order, and the warnings."""
        budget, held = WeightCacheBudget(DEFAULT_WEIGHT_CACHE_BUDGET), []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for n in weights:
                if budget.admit(n * dtype.itemsize, "meta"):
                    held.append(torch.empty(n, dtype=dtype, device="meta"))
                    budget.hold(held[-1])
        return budget.held["meta"], len(caught)

    for dtype in (torch.float16, torch.float32):
        assert admitted(sd15_weights, dtype) == (sum(sd15_weights) * dtype.itemsize, 0)
    taken, warned = admitted(flux_weights, torch.bfloat16)
    assert sum(flux_weights) * 2 > 3 * DEFAULT_WEIGHT_CACHE_BUDGET  # 10 GiB of W' without the budget
    assert taken <= DEFAULT_WEIGHT_CACHE_BUDGET < model_bytes / 7 and warned == 1


@pytest.mark.parametrize("bad", [-1, 1.5, "3GiB", True])
def test_budget_must_be_bytes_or_none(bad):
    with pytest.raises(ValueError, match="number of bytes"):
        set_lie_weight_cache_budget(bad)


def test_budget_counts_per_device():
    budget = WeightCacheBudget(100)
    on_meta = torch.empty(25, device="meta")
    budget.hold(on_meta)
    assert budget.held["meta"] == 100
    with pytest.warns(UserWarning, match="full on meta"):
        assert budget.admit(60, torch.device("cpu")) and not budget.admit(60, "meta")
    assert budget.admit(0, "meta") and not budget.admit(1, "meta")
    del on_meta
    assert budget.held["meta"] == 0 and budget.admit(100, "meta")
