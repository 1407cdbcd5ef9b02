"""Quantized base weights are refused with an error that names the module and the quantization: a Lie
adapter computes W' = W ⊙ exp(Δ) and needs W itself. Real bitsandbytes (CPU backend) and torchao layers
where those install; fp8 storage with plain torch dtypes and diffusers' layerwise casting; a stand-in class for
GGUF (its `gguf` dependency is not installed here)."""

import pytest
import torch
from torch import nn

from lie_diffusion import LieConfig, add_lie_adapters
from lie_diffusion.layers import LieLinear, weight_quantization

LIE_ON_LINEARS = dict(attn_adapter="lie", attn_targets=("to_q", "to_k"), conv_targets=())


class Block(nn.Module):
    def __init__(self, to_q: nn.Module):
        super().__init__()
        self.to_q, self.to_k = to_q, nn.Linear(64, 64)


def assert_refused_and_unchanged(model, match):
    params = dict(model.named_parameters())
    values = {k: v.detach().clone() for k, v in params.items() if type(v) is nn.Parameter}
    for balance in ("none", "rms"):
        with pytest.raises(ValueError, match=r"to_q: Lie adapters need the layer's full-precision weight .*" + match):
            add_lie_adapters(model, LieConfig(rank=2, balance=balance, **LIE_ON_LINEARS))
    assert not hasattr(model, "peft_config") and not any(isinstance(m, LieLinear) for m in model.modules())
    after = dict(model.named_parameters())  # the same parameters under the same names, the plain ones unchanged
    assert after.keys() == params.keys() and all(after[k] is params[k] for k in params)
    assert all(torch.equal(params[k], v) for k, v in values.items())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bitsandbytes_4bit_is_refused(quant_type):
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(64, 64, quant_type=quant_type, compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type=quant_type)
    model = Block(layer.to("cpu"))  # quantizes the weight (bitsandbytes' CPU backend)
    assert model.to_q.weight.dtype == torch.uint8
    assert_refused_and_unchanged(model, rf"\(bitsandbytes Linear4bit, Params4bit weight, {quant_type}\)")


def test_bitsandbytes_8bit_is_refused():
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(torch.randn(64, 64), requires_grad=False, has_fp16_weights=False)
    model = Block(layer.to("cpu"))
    assert model.to_q.weight.dtype == torch.int8
    assert_refused_and_unchanged(model, r"\(bitsandbytes Linear8bitLt, Int8Params weight\)")


@pytest.mark.parametrize("config", ["Float8WeightOnlyConfig", "Int8WeightOnlyConfig"])
def test_torchao_weights_are_refused_before_and_after_the_adapter(config):
    """torchao's tensors report the logical dtype (float32), so the class tells; quantizing after the adapter
    was added is caught at the next call."""
    quantization = pytest.importorskip("torchao.quantization")
    make = getattr(quantization, config)
    model = Block(nn.Linear(64, 64))
    quantization.quantize_(model, make(), filter_fn=lambda m, name: name == "to_q")
    name = type(model.to_q.weight).__name__
    assert model.to_q.weight.dtype == torch.float32 and "torchao" in type(model.to_q.weight).__module__
    assert_refused_and_unchanged(model, rf"\(torchao Linear, {name} weight\)")

    model = Block(nn.Linear(64, 64))
    add_lie_adapters(model, LieConfig(rank=2, **LIE_ON_LINEARS))
    quantization.quantize_(model, make(), filter_fn=lambda m, name: name == "to_q.base_layer")
    with pytest.raises(ValueError, match=rf"to_q: .* it is quantized \(torchao Linear, {name} weight\)"):
        model.to_q(torch.randn(2, 64))
    model.to_k(torch.randn(2, 64))  # the layers left unquantized run as before


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.int8])
def test_one_byte_and_integer_weights_are_refused(dtype):
    layer = nn.Linear(64, 64)
    layer.weight = nn.Parameter((torch.randn(64, 64) * 10).to(dtype), requires_grad=False)
    model = Block(layer)
    assert_refused_and_unchanged(model, rf"\({dtype} weight\)")


def test_fp8_layerwise_casting_after_the_adapter_is_refused_at_the_call():
    """diffusers' enable_layerwise_casting stores weights in fp8 and upcasts them in the layer's own forward,
    which a Lie layer does not call: the Lie layer must not run on the fp8 storage."""
    from diffusers.hooks import apply_layerwise_casting

    model = Block(nn.Linear(64, 64))
    add_lie_adapters(model, LieConfig(rank=2, **LIE_ON_LINEARS))
    apply_layerwise_casting(model.to_q.base_layer, storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert model.to_q.base_layer.weight.dtype == torch.float8_e4m3fn
    stored = model.to_q.base_layer.weight.detach().clone()
    for call in (lambda: model.to_q(torch.randn(2, 64)), model.to_q.merge):
        with pytest.raises(ValueError, match=r"to_q: .*\(torch.float8_e4m3fn weight\)"):
            call()
    assert torch.equal(model.to_q.base_layer.weight.view(torch.uint8), stored.view(torch.uint8))
    assert not model.to_q.merged


def test_classes_of_quantizing_packages_are_recognised():
    """GGUF (diffusers' GGUFParameter needs the `gguf` package): a stand-in defined where diffusers defines it."""
    class GGUFParameter(nn.Parameter):
        pass

    GGUFParameter.__module__ = "diffusers.quantizers.gguf.utils"
    layer = nn.Linear(4, 4)
    layer.weight = GGUFParameter(torch.zeros(4, 4, dtype=torch.uint8), requires_grad=False)
    layer.weight.quant_type = "Q4_K"
    assert weight_quantization(layer) == "diffusers Linear, GGUFParameter weight, Q4_K"
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        assert weight_quantization(nn.Linear(4, 4).to(dtype)) is None
