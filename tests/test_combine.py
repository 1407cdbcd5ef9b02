"""`combine`: one file equal to several adapters loaded together, and what it refuses.

The reference is the inputs loaded side by side as named adapters (the route `combine` replaces), and, for
one conv, the group update written out from the formula on the input files' own tensors.
"""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_io import conv_lie_reference, make_adapter, outputs, randomize_adapters, tiny_pipeline

from lie_diffusion import LieConfig, add_lie_adapters, combine_lie_files, load_lie_weights, merge_lie_weights
from lie_diffusion import read_lie_file, save_lie_weights
from lie_diffusion.cli import main
from lie_diffusion.io import write_lie_file

CONV = "down_blocks.0.resnets.0.conv1"
CONV1_ONLY = (r"resnets\.\d+\.conv1",)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Two adapters that share layers (Lie convs, LoRA attention, LoRA text encoder) with different ranks and
    alphas, the first balanced, the second with convs the first does not adapt."""
    root = tmp_path_factory.mktemp("combine")
    _, a = make_adapter(root / "a", unet_config=LieConfig(rank=4, attn_rank=2), text_encoder_config=LieConfig(rank=2),
                        seed=1)
    _, b = make_adapter(root / "b", unet_config=LieConfig(rank=2, alpha=3, balance="none", conv_targets=CONV1_ONLY),
                        text_encoder_config=LieConfig(rank=3, alpha=1, balance="none"), seed=5)
    return root, a, b


def merged_weights(pipe) -> dict[str, torch.Tensor]:
    merge_lie_weights(pipe)
    return {f"{name}.{key}": value for name in ("unet", "text_encoder")
            for key, value in getattr(pipe, name).state_dict().items()}


def loaded_together(files, weights):
    """The diffusers way of stacking: load each as a named adapter, then activate all at their weights (the
    last-loaded adapter alone is active until then, as with `load_lora_weights`)."""
    pipe = tiny_pipeline()
    names = [f"input{k}" for k in range(len(files))]
    for file, name in zip(files, names):
        load_lie_weights(pipe, file, adapter_name=name)
    pipe.set_adapters(names, list(weights))
    return pipe


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 0.7), (0.5, -1.3)])
def test_combined_file_equals_the_inputs_loaded_together(inputs, weights):
    root, a, b = inputs
    path, _ = combine_lie_files([a, b], weights, root / f"ab-{weights}.safetensors")
    combined = tiny_pipeline()
    load_lie_weights(combined, path)
    together = loaded_together([a, b], weights)

    got, want = outputs(combined), outputs(together)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    merged, reference = merged_weights(combined), merged_weights(together)
    assert merged.keys() == reference.keys()
    for key in merged:
        torch.testing.assert_close(merged[key], reference[key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")


def test_shared_conv_is_the_group_update_of_both(inputs):
    """W ⊙ exp(w₁s₁Δ₁ + w₂s₂Δ₂), from the input files' tensors and alphas."""
    root, a, b = inputs
    path, _ = combine_lie_files([a, b], [1.0, 0.7], root / "formula.safetensors")
    pipe = tiny_pipeline()
    load_lie_weights(pipe, path)
    factors = []
    for file, weight in ((a, 1.0), (b, 0.7)):
        entry = next(m for m in read_lie_file(file).section("lie") if m.module == CONV)
        factors.append((entry.A, entry.B, weight * entry.alpha / entry.rank))
    conv = pipe.unet.get_submodule(CONV)
    x = torch.randn(1, 32, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(conv(x), conv_lie_reference(conv.get_base_layer(), x, factors), rtol=1e-5, atol=1e-5)


def test_layout_ranks_and_metadata(inputs):
    root, a, b = inputs
    path, _ = combine_lie_files([a, b], [1.0, 0.7], root)  # a folder: the default file name in it
    assert path == root / "pytorch_lora_weights.safetensors"
    file, first, second = read_lie_file(path), read_lie_file(a), read_lie_file(b)
    ranks = {m.ref: m.rank for m in file.modules}
    for entry in first.modules:
        other = next((m for m in second.modules if m.ref == entry.ref), None)
        assert ranks[entry.ref] == entry.rank + (other.rank if other else 0), entry.ref
        assert {m.section for m in file.modules if m.ref == entry.ref} == {entry.section}
    assert all(m.alpha == m.rank for m in file.modules)  # every scaling is folded into lora_B
    assert file.info["balance"] == "none" and file.info["fingerprint"] == first.info["fingerprint"]
    with safe_open(str(path), "pt") as handle:
        sources = json.loads(handle.metadata()["lie_diffusion_combined"])
    assert sources == [{"file": f"a/{a.name}", "weight": 1.0, "balance": "rms"},
                       {"file": f"b/{b.name}", "weight": 0.7, "balance": "none"}]


def test_text_encoder_names_with_and_without_text_model_prefix_are_one_layer(inputs, tmp_path):
    root, a, b = inputs
    renamed = read_lie_file(b)
    for entry in renamed.section("lora", "text_encoder"):
        entry.module = entry.module.removeprefix("text_model.") if entry.module.startswith("text_model.") \
            else f"text_model.{entry.module}"
    other = write_lie_file(tmp_path / "renamed.safetensors", renamed.modules, renamed.info["fingerprint"])
    one, _ = combine_lie_files([a, b], None, tmp_path / "one.safetensors")
    two, _ = combine_lie_files([a, other], None, tmp_path / "two.safetensors")
    assert len(read_lie_file(one).modules) == len(read_lie_file(two).modules)
    pipes = []
    for path in (one, two):
        pipes.append(tiny_pipeline())
        load_lie_weights(pipes[-1], path)
    for x, y in zip(outputs(pipes[0]), outputs(pipes[1])):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_taylor_and_exp_on_different_layers_combine(tmp_path):
    _, taylor = make_adapter(tmp_path / "t", unet_config=LieConfig(mode="taylor", attn_adapter="none",
                                                                   conv_targets=(r"resnets\.\d+\.conv2",)), seed=2)
    _, exp = make_adapter(tmp_path / "e", unet_config=LieConfig(attn_adapter="none", conv_targets=CONV1_ONLY), seed=3)
    path, _ = combine_lie_files([taylor, exp], [0.8, 1.2], tmp_path / "te.safetensors")
    assert {m.mode for m in read_lie_file(path).modules} == {"taylor", "exp"}
    combined = tiny_pipeline()
    load_lie_weights(combined, path)
    for x, y in zip(outputs(combined), outputs(loaded_together([taylor, exp], [0.8, 1.2]))):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def adapter_on(directory, kind="sd1", **config):
    return make_adapter(directory, unet_config=LieConfig(**config), kind=kind, seed=4)[1]


@pytest.mark.parametrize("case", ["base model", "lora and lie", "taylor twice", "weights", "one file", "exists",
                                  "not finite", "missing"])
def test_bad_input_is_refused_and_nothing_is_written(inputs, tmp_path, case):
    root, a, b = inputs
    files, weights, output, expected = [a, b], None, tmp_path / "out.safetensors", None
    if case == "base model":
        files, expected = [a, adapter_on(tmp_path / "sd2", kind="sd2")], "different base models"
    elif case == "lora and lie":
        files, expected = [a, adapter_on(tmp_path / "lie", attn_adapter="lie")], "either LoRA or Lie"
    elif case == "taylor twice":
        files = [adapter_on(tmp_path / f"t{k}", mode="taylor", attn_adapter="none") for k in range(2)]
        expected = "taylor"
    elif case == "weights":
        weights, expected = [1.0], "2 adapter files but 1 weights"
    elif case == "one file":
        files, expected = [a], "at least two"
    elif case == "exists":
        output.write_bytes(b"keep me")
        expected = "--overwrite"
    elif case == "not finite":
        weights, expected = [1.0, float("nan")], "finite"
    elif case == "missing":
        files, expected = [a, tmp_path / "nope.safetensors"], "no such file"
    with pytest.raises((ValueError, FileNotFoundError), match=expected):
        combine_lie_files(files, weights, output)
    assert output.read_bytes() == b"keep me" if case == "exists" else not output.exists()


def test_cli(inputs, tmp_path, capsys):
    root, a, b = inputs
    output = tmp_path / "cli.safetensors"
    assert main(["combine", str(a), str(b), "--weights", "1", "0.7", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert f"Combined {a}, {b} at weights 1 0.7: " in printed and f"Wrote {output}" in printed
    assert load_file(output).keys() == load_file(combine_lie_files([a, b], [1, 0.7], tmp_path / "api.st")[0]).keys()

    assert main(["combine", str(a), str(b), "--output", str(output)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "lie-diffusion combine: error:" in error and "--overwrite" in error
    assert main(["combine", str(a), str(b), "--output", str(output), "--overwrite"]) == 0
    assert f"Combined {a}, {b}: " in capsys.readouterr().out  # default weights: 1 each, as set_adapters
    assert main(["inspect", str(output)]) == 0
    assert f"Combined from: a/{a.name} × 1, b/{b.name} × 1 (lie-diffusion combine" in capsys.readouterr().out
    assert main(["inspect", str(a)]) == 0 and "Combined from" not in capsys.readouterr().out


def test_plain_lora_file_combines_with_a_lie_file(inputs, tmp_path):
    """A diffusers/peft LoRA file (no lie-diffusion metadata) on the same attention layers stacks as LoRA."""
    root, a, _ = inputs
    pipe = tiny_pipeline()
    add_lie_adapters(pipe.unet, LieConfig(attn_adapter="lora", conv_targets=(), rank=3, alpha=6))
    randomize_adapters(pipe.unet, 9)
    lora = save_lie_weights(tmp_path / "lora", pipe.unet)
    plain = tmp_path / "plain.safetensors"
    save_file(load_file(lora), plain)  # tensors only: read as a plain LoRA file, alpha = rank
    path, _ = combine_lie_files([a, plain], [1.0, 0.5], tmp_path / "mixed.safetensors")
    combined = tiny_pipeline()
    load_lie_weights(combined, path)
    for x, y in zip(outputs(combined), outputs(loaded_together([a, plain], [1.0, 0.5]))):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_a_conv_lora_style_stacks_on_a_lie_subject_once_the_subject_is_merged(inputs, tmp_path):
    """A LoCon-like style (LoRA on convs) with a Lie subject on the same convs: one layer holds one kind of
    adapter, so diffusers' load_lora_weights refuses the style, naming the layer, and leaves the pipeline as it
    was. Merged first, the subject's W ⊙ exp(sΔ) takes the style's + s·BA: what the hosts compute when the style
    comes second."""
    _, a, _ = inputs
    source = tiny_pipeline()
    source.unet.add_adapter(LoraConfig(r=2, lora_alpha=3, target_modules=["conv1"]))
    randomize_adapters(source.unet, 4)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "style", unet_lora_layers=get_peft_model_state_dict(source.unet),
                                              unet_lora_adapter_metadata=source.unet.peft_config["default"].to_dict())
    pipe = tiny_pipeline()
    load_lie_weights(pipe, a, adapter_name="subject")
    before = outputs(pipe)
    with pytest.raises(ValueError, match=rf"{CONV}: this layer carries Lie adapters \['subject'\]"):
        pipe.load_lora_weights(tmp_path / "style", adapter_name="style")
    assert "style" not in sum(pipe.get_list_adapters().values(), [])
    assert all(torch.equal(x, y) for x, y in zip(outputs(pipe), before))

    merge_lie_weights(pipe)
    pipe.load_lora_weights(tmp_path / "style", adapter_name="style")
    pipe.fuse_lora()
    subject = next(m for m in read_lie_file(a).modules if m.ref == f"unet.{CONV}")
    style = source.unet.get_submodule(CONV)
    W = tiny_pipeline().unet.get_submodule(CONV).weight.detach()
    expected = (W * (subject.scaling * (subject.B.flatten(1) @ subject.A.flatten(1)).reshape(W.shape)).exp()
                + 1.5 * (style.lora_B["default"].weight.flatten(1) @ style.lora_A["default"].weight.flatten(1)
                         ).reshape(W.shape))
    torch.testing.assert_close(pipe.unet.get_submodule(CONV).get_base_layer().weight, expected, rtol=1e-5, atol=1e-6)
