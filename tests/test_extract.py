"""`lie-diffusion extract`: a Lie adapter (plus attention LoRA) recovered from a fully fine-tuned model."""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from test_io import max_diff, outputs, randomize_adapters

from lie_diffusion import LieConfig, add_lie_adapters, load_lie_weights, merge_lie_weights, read_lie_file
from lie_diffusion.cli import main
from lie_diffusion.export import load_models
from lie_diffusion.extract import extract_adapter, fit_lie

CONV = "down_blocks.0.resnets.0.conv1"


def tuned_by_known_adapter(base_dir, rank=2, seed=0):
    """The base pipeline with a known Lie (convs, exp) + LoRA (attention) adapter merged in: a 'full fine-tune'
    whose weights the adapter family can hold exactly at `rank`."""
    pipe = StableDiffusionPipeline.from_pretrained(str(base_dir))
    add_lie_adapters(pipe.unet, LieConfig(rank=rank, alpha=rank))
    randomize_adapters(pipe.unet, seed)
    merge_lie_weights(pipe)
    return pipe


@pytest.fixture(scope="module")
def tuned_dir(tiny_pipeline_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tuned")
    tuned_by_known_adapter(tiny_pipeline_dir).save_pretrained(str(directory))
    return directory


def merged_from_entries(base_model, entries) -> dict[str, torch.Tensor]:
    """Module -> W ⊙ exp(sΔ) (Lie) or W + s·BA (LoRA), written out from the formulas in float64."""
    merged = {}
    for entry in entries:
        weight = base_model.get_submodule(entry.module).weight.detach().double()
        delta = (entry.alpha / entry.rank) * (entry.B.double().flatten(1) @ entry.A.double().flatten(1))
        delta = delta.reshape(weight.shape)
        merged[entry.module] = weight * delta.exp() if entry.section == "lie" else weight + delta
    return merged


def test_recovers_a_known_adapter_at_its_rank(tiny_pipeline_dir, tuned_dir):
    base, tuned = load_models(tiny_pipeline_dir), load_models(tuned_dir)
    entries, fits, other = extract_adapter(base, tuned, rank=2, attn_rank=2, steps=20)
    assert {e.section for e in entries} == {"lie", "lora"} and len(entries) == 23 + 32
    for module, merged in merged_from_entries(base["unet"], entries).items():
        target = tuned["unet"].get_submodule(module).weight.double()
        change = target - base["unet"].get_submodule(module).weight.double()
        assert (merged - target).norm() <= 1e-4 * change.norm(), module
    assert max(f.rel_error for f in fits) <= 1e-4
    assert all(sum(f.masked.values()) == 0 for f in fits)
    assert other["tensors"] == 0  # the text encoder did not change, and nothing outside the targets did
    # A LoCon of equal size cannot hold W ⊙ exp(BA) - W, which is full rank
    assert min(f.locon_rel_error for f in fits if f.kind == "lie") > 0.1


def test_sign_flips_and_zeros_are_masked_counted_and_reported():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(8, 4, 3, 3, generator=generator)
    tuned = base * torch.exp(0.1 * torch.randn(8, 4, 3, 3, generator=generator))
    base[0, 0, 0, :2] = 0  # no logarithm: W_base = 0 where the fine-tune moved it ...
    tuned[0, 0, 0, :2] = torch.tensor([0.5, 0.0])  # ... (a zero that stays zero costs nothing)
    tuned[1, 1, 1, :3] *= -1  # three sign flips
    tuned[2, 2, 2, 2] = 0  # one tuned zero
    A, B, masked, start, error = fit_lie(base, tuned, rank=4, steps=100)
    assert masked == {"sign_flips": 3, "zero_base": 1, "zero_tuned": 1}
    assert torch.isfinite(A).all() and torch.isfinite(B).all()
    # the refinement on the weight-space error never ends above its SVD start, and here it gains
    assert error < start
    merged = base.double() * (B.double().flatten(1) @ A.double().flatten(1)).reshape(base.shape).exp()
    assert (merged - tuned.double()).norm().item() == pytest.approx(error, rel=1e-6)


def test_weight_space_refinement_beats_the_log_space_svd():
    """Small weights with large log-ratios pull the log-space SVD; the weight-space fit discounts them."""
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(16, 8, 3, 3, generator=generator)
    low_rank = (torch.randn(16, 2, generator=generator) @ torch.randn(2, 72, generator=generator)).reshape(base.shape)
    noise = torch.randn(base.shape, generator=generator) * (base.abs() < 0.1)  # big log-noise on tiny weights
    tuned = base * torch.exp(0.2 * low_rank + noise)
    _, _, _, start, error = fit_lie(base, tuned, rank=2, steps=200)
    assert error < 0.5 * start


def test_cli_extract_writes_a_file_that_reproduces_the_tuned_model(tiny_pipeline_dir, tuned_dir, tmp_path, capsys):
    output = tmp_path / "extracted"
    argv = ["extract", "--base", str(tiny_pipeline_dir), "--tuned", str(tuned_dir), "--output", str(output),
            "--rank", "2", "--steps", "10"]
    assert main(argv) == 0
    report = capsys.readouterr().out
    assert "Total relative weight-space error" in report and "LoCon of equal size" in report
    path = output / "pytorch_lora_weights.safetensors"
    parsed = read_lie_file(path)
    assert parsed.info["mode"] == "exp" and parsed.info["fingerprint"]["unet"]["layers_per_block"] == 1
    with safe_open(str(path), framework="pt") as file:
        extracted = json.loads(file.metadata()["lie_diffusion_extract"])
    assert extracted["total"]["rel_error"] <= 1e-4 and len(extracted["modules"]) == 55
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_pipeline_dir))
    load_lie_weights(pipe, path)
    tuned = StableDiffusionPipeline.from_pretrained(str(tuned_dir))
    assert max_diff(outputs(pipe), outputs(tuned)) < 1e-4


def _fails(capsys, argv, *words):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(word in err for word in words), err


def test_bad_input_gives_one_line_and_no_output(tiny_pipeline_dir, tiny_sd2_pipeline_dir, tuned_dir, tmp_path, capsys):
    output = tmp_path / "never"
    common = ["--output", str(output)]
    _fails(capsys, ["extract", "--base", str(tiny_pipeline_dir), "--tuned", str(tiny_sd2_pipeline_dir), *common],
           "architectures differ", "in the base model but")
    _fails(capsys, ["extract", "--base", str(tiny_pipeline_dir), "--tuned", str(tuned_dir), "--rank", "5000", *common],
           "rank 5000 is larger than", "at most")
    _fails(capsys, ["extract", "--base", str(tiny_pipeline_dir), "--tuned", str(tiny_pipeline_dir), *common],
           "nothing to extract")
    _fails(capsys, ["extract", "--base", str(tmp_path), "--tuned", str(tuned_dir), *common], "not a diffusers pipeline")
    _fails(capsys, ["extract", "--base", str(tiny_pipeline_dir), "--tuned", str(tuned_dir), "--mode", "log", *common],
           "unknown --mode 'log'")
    assert not output.exists()


def test_comparison_benchmark_runs_end_to_end(tmp_path):
    """The extract-vs-LoCon benchmark's plumbing on toy settings (its numbers come from the full run)."""
    pytest.importorskip("sklearn")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import extract_compare

    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- bench:extract:start -->\nSTALE\n<!-- bench:extract:end -->\n")
    extract_compare.main(["--ranks", "1", "--steps", "1", "--pretrain-steps", "1", "--batch", "2", "--fit-steps", "2",
                          "--eval-draws", "1", "--out", str(tmp_path), "--page", str(readme)])
    data = json.loads((tmp_path / "extract.json").read_text())
    row = data["ranks"]["1"]
    assert row["lie-exp"]["params"] == row["locon"]["params"] == row["lie-taylor"]["params"] > 0
    assert row["lie-exp"]["rel_error"] <= row["lie-exp"]["svd_start_rel_error"]
    assert "| 1 | locon |" in readme.read_text() and "STALE" not in readme.read_text()


def test_recovers_a_known_lie_adapter_on_a_flux_transformer(tmp_path):
    """A Flux 'fine-tune' that is W ⊙ exp(sΔ) on the preset's Linear layers at rank 2 comes back as Lie adapters
    on those layers, exact to the fit's tolerance, in a file stamped for a Flux transformer that loads there."""
    from diffusers import FluxPipeline

    from lie_diffusion.tiny import build_tiny_pipeline

    base_dir = build_tiny_pipeline(tmp_path / "base", kind="flux")
    tuned = FluxPipeline.from_pretrained(str(base_dir))
    add_lie_adapters(tuned.transformer, LieConfig(rank=2, alpha=2, balance="none"))
    randomize_adapters(tuned.transformer, 0)
    merge_lie_weights(tuned)
    tuned.save_pretrained(str(tmp_path / "tuned"))

    assert main(["extract", "--base", str(base_dir), "--tuned", str(tmp_path / "tuned"), "--output",
                 str(tmp_path / "out"), "--rank", "2", "--steps", "20"]) == 0
    adapter = read_lie_file(tmp_path / "out")
    entries = [e for e in adapter.modules if e.component == "transformer"]
    assert entries and {e.section for e in entries} == {"lie"}
    assert set(adapter.info["fingerprint"]) == {"transformer"}
    base = load_models(base_dir)["transformer"]
    for module, merged in merged_from_entries(base, entries).items():
        target = tuned.transformer.get_submodule(module).weight.double()
        change = target - base.get_submodule(module).weight.double()
        assert (merged - target).norm() <= 1e-4 * change.norm(), module
    pipe = FluxPipeline.from_pretrained(str(base_dir))
    load_lie_weights(pipe, tmp_path / "out")  # fits the Flux transformer it was extracted from
