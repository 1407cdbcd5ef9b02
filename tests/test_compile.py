"""torch.compile with Lie layers: the Lie op never breaks the graph, and compiled runs match eager.

A whole tiny UNet goes through dynamo and AOTAutograd (the joint forward + backward graph) with
`fullgraph=True`, which raises on any graph break; inductor's C++ code generation, which takes
minutes for a whole UNet on a small CPU, runs on a model of one Lie conv and one Lie linear.
"""

import copy

import pytest
import torch
from torch import nn

from diffusers import UNet2DConditionModel

from lie_diffusion import LieConfig, add_lie_adapters

# The smallest UNet2DConditionModel with both kinds of Lie targets (ResNet convs, attention projections):
# a cross-attention down block and up block, no mid block. Compile time grows with the op count.
SMALLEST_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8,),
                     norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                     cross_attention_dim=8, attention_head_dim=4, mid_block_type=None)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


def randomize_factors(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def train_grads(model, compiled, *inputs):
    loss = compiled(*inputs)
    loss = (loss.sample if hasattr(loss, "sample") else loss).square().mean()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_same_training_and_inference(model, compiled, inputs, **tol):
    eager = copy.deepcopy(model)
    ref_loss, ref_grads = train_grads(eager, eager, *inputs)
    loss, grads = train_grads(model, compiled, *inputs)
    torch.testing.assert_close(loss, ref_loss, **tol)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **tol, msg=lambda m: f"{name}: {m}")
    model.eval()
    eager.eval()
    with torch.no_grad():
        out, ref = compiled(*inputs), eager(*inputs)
    out, ref = (out.sample, ref.sample) if hasattr(out, "sample") else (out, ref)
    torch.testing.assert_close(out, ref, **tol)


def test_tiny_unet_traces_whole_and_matches_eager():
    unet = UNet2DConditionModel(**SMALLEST_UNET)
    add_lie_adapters(unet, LieConfig(rank=2, attn_adapter="lie"))
    randomize_factors(unet).train()
    inputs = (torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 5, 8))
    compiled = torch.compile(unet, backend="aot_eager", fullgraph=True)  # any graph break raises
    assert_same_training_and_inference(unet, compiled, inputs, rtol=1e-5, atol=1e-6)


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(nn.functional.silu(self.conv(x)).flatten(2).transpose(1, 2))


def test_inductor_matches_eager():
    model = TwoLayers()
    add_lie_adapters(model, LieConfig(rank=2, conv_targets=("conv",), attn_adapter="lie", attn_targets=("proj",)))
    randomize_factors(model).train()
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    assert_same_training_and_inference(model, compiled, (torch.randn(2, 4, 6, 6),), rtol=1e-4, atol=1e-5)
