"""The DreamBooth fidelity benchmark at its smallest size, on the shipped pretrained emoji pipeline."""

import json
import re
import sys
from pathlib import Path

import pytest
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import dreambooth as D  # noqa: E402
from lie_diffusion import training  # noqa: E402
from lie_diffusion.emoji.pipeline import pretrained_emoji_path  # noqa: E402

README = "# x\n\n<!-- bench:dreambooth:start -->\nSTALE\n<!-- bench:dreambooth:end -->\nkeep\n"
CONV = re.compile(r".*(resnets\.\d+\.(conv1|conv2|conv_shortcut)|(down|up)samplers\.0\.conv)")
ATTN = re.compile(r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)")


def factor_sizes(unet):
    """Per unit of rank: what a rank-r A·B pair costs on the targeted convs, and on the attention projections."""
    conv = sum(m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels
               for n, m in unet.named_modules() if isinstance(m, nn.Conv2d) and CONV.fullmatch(n))
    attn = sum(m.in_features + m.out_features for n, m in unet.named_modules()
               if isinstance(m, nn.Linear) and ATTN.fullmatch(n))
    return conv, attn


@pytest.fixture(scope="module")
def smallest(tmp_path_factory):
    out = tmp_path_factory.mktemp("dreambooth")
    readme = out / "README.md"
    readme.write_text(README)
    original = training.add_adapters, training.finish_training
    D.main([*SMALLEST, "--workdir", str(out / "work"), "--out", str(out), "--page", str(readme)])
    assert (training.add_adapters, training.finish_training) == original  # the swap is undone
    return out, json.loads((out / "dreambooth.json").read_text()), readme.read_text()


SMALLEST = ["--subjects", "1", "--seeds", "1", "--steps", "1", "--val-subjects", "0", "--rank", "2",
            "--class-images", "1", "--subject-images", "1", "--prior-prompts", "2", "--sample-steps", "2"]


def test_equal_budget_matches_the_factor_formula(smallest):
    from diffusers import UNet2DConditionModel

    _, results, _ = smallest
    unet = UNet2DConditionModel.from_pretrained(str(pretrained_emoji_path() / "unet"))
    conv, attn = factor_sizes(unet)
    budget = results["budget"]
    counts = budget["trainable_params"]
    for name in ("lie-default", "lie-taylor", "lie-attn-lie", "lora-conv-attn", "lycoris-locon", "hira-conv-lora-attn"):
        assert counts[name] == 2 * (conv + attn), name
    # attention-only LoRA: the rank whose total is closest to the others'
    assert counts["lora-attn"] == budget["attn_only_rank"] * attn
    assert all(abs(counts["lora-attn"] - 2 * (conv + attn)) <= abs(r * attn - 2 * (conv + attn))
               for r in range(1, 4 * budget["attn_only_rank"]))


def test_every_method_trains_and_is_scored(smallest):
    out, results, readme = smallest
    runs = results["runs"]
    assert sorted(r["method"] for r in runs) == sorted(m.name for m in D.METHODS)
    base = results["base"]["per_subject"]["dog face"]
    for r in runs:
        assert -1 <= r["subject_similarity"] <= 1 and -1 <= r["colour_subject_similarity"] <= 1
        assert all(0 <= r[k] <= 1 for k in ("subject_top1", "colour_accuracy", "prior_accuracy"))
        assert -1 <= r["prior_similarity"] <= 1
        assert r["heldout_loss"] > 0 and r["heldout_loss"] != base["heldout_loss"], r["method"]  # the adapter moved
    summary = results["summary"]
    assert "vs_reference" not in summary["lie-default"]
    assert summary["lora-attn"]["vs_reference"]["heldout_loss"]["pairs"] == 1
    text = readme
    assert "STALE" not in text and text.endswith("<!-- bench:dreambooth:end -->\nkeep\n")
    assert all(f"| {m.name} |" in text for m in D.METHODS) and "**A reduced run**" in text
    with Image.open(out / "dreambooth_samples.png") as grid:
        assert grid.height > 9 * 32 * 3  # held-out render, base model and one row per method


def test_choose_lr_weighs_fidelity_against_forgetting():
    def record(lr, sim, prior):
        return {"lr": lr, "subject_similarity": sim, "prior_similarity": prior}

    # 1e-2 gains 0.3 in subject likeness but loses 0.5 on the other emoji; 3e-3 nets the most (two subjects each)
    records = [record(1e-3, 0.5, 0.8), record(1e-3, 0.5, 0.8), record(3e-3, 0.6, 0.75), record(3e-3, 0.7, 0.75),
               record(1e-2, 0.9, 0.3), record(1e-2, 0.9, 0.3)]
    assert D.choose_lr(records) == 3e-3
    assert D.choose_lr(records[:2] + records[4:]) == 1e-3


def test_subjects_are_held_out():
    from lie_diffusion.emoji.data import HELD_OUT

    assert set(D.TEST_SUBJECTS) <= set(HELD_OUT) and set(D.VALIDATION_SUBJECTS) <= set(HELD_OUT)
    assert not set(D.TEST_SUBJECTS) & set(D.VALIDATION_SUBJECTS)
    assert len(D.TEST_SUBJECTS) >= 6  # the minimum


def test_a_second_invocation_reuses_finished_runs_of_the_same_setup(smallest, monkeypatch, tmp_path):
    out, results, _ = smallest
    work = out / "work"
    assert len((work / "runs.jsonl").read_text().splitlines()) == len(D.METHODS)

    def must_not_train(*_):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(D.Bench, "run", must_not_train)
    again = D.main([*SMALLEST, "--workdir", str(work), "--out", str(tmp_path), "--page", "none"])
    assert again["runs"] == results["runs"]
    # a run counts for any invocation with the same method, whatever ran beside it
    alone = D.main([*SMALLEST, "--methods", "lora-attn", "--workdir", str(work), "--out", str(tmp_path), "--page", "none"])
    assert alone["runs"] == [r for r in results["runs"] if r["method"] == "lora-attn"]
    # another setup (here: more steps) never takes those records
    with pytest.raises(AssertionError, match="trained again"):
        D.main([*SMALLEST[:5], "2", *SMALLEST[6:], "--workdir", str(work), "--out", str(tmp_path), "--page", "none"])


def test_a_retrained_model_or_judge_is_another_setup(tmp_path):
    import argparse

    args = argparse.Namespace(**{k: 1 for k in D.RESULT_FLAGS})
    model = tmp_path / "model" / "unet"
    model.mkdir(parents=True)
    (model / "diffusion_pytorch_model.safetensors").write_bytes(b"weights v1")
    judge = tmp_path / "judge.safetensors"
    judge.write_bytes(b"judge v1")
    key = D.setup_key(args, D.BY_NAME, tmp_path / "model", judge)
    assert D.setup_key(args, D.BY_NAME, tmp_path / "model", judge) == key
    (model / "diffusion_pytorch_model.safetensors").write_bytes(b"weights v2")
    assert D.setup_key(args, D.BY_NAME, tmp_path / "model", judge) != key


def test_tradeoff_reads_metrics_at_equal_prior_and_pairs_each_subject_and_seed():
    from benchmarks import dreambooth_tradeoff as T

    def run(method, lr, prior, subject, case, **extra):
        return {"method": method, "lr": lr, "prior_similarity": prior, "subject_similarity": subject,
                "subject": case[0], "seed": case[1], "subject_top1": subject / 2, "colour_accuracy": 1.0,
                "heldout_loss": 0.3, "train_s": 1.0, "eval_s": 1.0, **extra}

    one, two, three = ("dog", 0), ("dog", 1), ("cat", 0)
    runs = [  # reference "a" wins on `one` (0.55 vs 0.50 at prior 0.70), loses on `two` (0.30 vs 0.60)
        run("a", 1e-3, 0.80, 0.40, one), run("a", 1e-2, 0.60, 0.70, one),
        run("b", 1e-3, 0.80, 0.50, one), run("b", 1e-2, 0.60, 0.50, one),
        run("a", 1e-3, 0.75, 0.30, two), run("a", 1e-2, 0.65, 0.30, two),
        run("b", 1e-3, 0.72, 0.60, two), run("b", 1e-2, 0.68, 0.60, two),
        # `three`: b's curve never reaches 0.70, so the pair does not count; a NaN stop is left out of curves
        run("a", 1e-3, 0.75, 0.50, three), run("a", 1e-2, 0.65, 0.50, three),
        run("b", 1e-3, 0.90, 0.20, three), run("b", 3e-2, 0.0, 0.0, three, stopped="loss is nan at step 9"),
    ]
    assert T.curve([r for r in runs if r["method"] == "a" and r["subject"] == "dog" and r["seed"] == 0],
                   "subject_similarity") == [(1e-3, 0.80, 0.40), (1e-2, 0.60, 0.70)]
    assert T.read_at([(1e-3, 0.80, 0.40), (1e-2, 0.60, 0.70)], 0.70) == pytest.approx(0.55)
    assert T.read_at([(1e-3, 0.80, 0.40)], 0.70) is None
    paired = T.paired(runs, "a", 0.70)
    assert paired == {"b": {"pairs": 2, "of": 3, "win_rate": 0.5, "mean_diff": pytest.approx((0.05 - 0.30) / 2)}}
    text = T.markdown({"command": "x", "split": "test", "subjects": ["cat", "dog"], "seeds": 2, "steps": 1,
                       "rank": 4, "minutes": 1, "jobs": 1, "methods": ["a", "b"], "reference": "a",
                       "prior_levels": [0.7, 0.95], "win_level": 0.7, "paired": paired, "records": runs})
    assert "| b | 2 of 3 | 50% | -0.125 |" in text and "| 0.95 | — | — |" in text
    assert "✗1" in text  # the NaN stop is shown where it happened


def test_nan_stops_are_reported_not_averaged():
    def record(method, seed, **extra):
        return {"method": method, "subject": "dog face", "seed": seed, "lr": 1e-2, "train_s": 1.0, "eval_s": 0.0,
                **extra}

    metrics = {k: 0.5 for k in D.METRICS}
    runs = [record("lie-default", 0, **metrics), record("lie-default", 1, stopped="loss is nan at step 9; stopping."),
            record("lie-attn-lie", 0, stopped="loss is nan at step 207; stopping.")]
    summary = D.summarize({"methods": {"lie-default": "", "lie-attn-lie": ""}, "runs": runs, "reference": "lie-default"})
    assert list(summary) == ["lie-default"]  # nothing finished for lie-attn-lie: no entry to average
    assert summary["lie-default"]["subject_similarity"] == (0.5, 0.0)  # the stopped seed is left out
    assert D.choose_lr([record("a", 0, lr=1e-3, subject_similarity=0.1, prior_similarity=0.1),
                        {**record("a", 0, stopped="nan"), "lr": 1e-2}]) == 1e-3


# ------------------------------------------------------------------------------------------- on the Flux model

FLUX_METHODS = ["flux-attn-lie", "flux-lie", "flux-lie-unbalanced", "flux-lora", "flux-all-linear-lie"]
FLUX_SMALLEST = ["--kind", "flux", "--subjects", "1", "--seeds", "1", "--steps", "2", "--rank", "2", "--batch", "1",
                 "--class-images", "1", "--subject-images", "1", "--prior-prompts", "2", "--sample-steps", "2",
                 "--methods", *FLUX_METHODS, *[f"--grid={m}=1e-3" for m in FLUX_METHODS]]


@pytest.fixture(scope="module")
def flux_tradeoff(tiny_emoji_flux_dir, tmp_path_factory):
    from benchmarks import dreambooth_tradeoff as T

    out = tmp_path_factory.mktemp("tradeoff-flux")
    page = out / "page.md"
    page.write_text("<!-- bench:dreambooth_tradeoff_flux:start -->\nSTALE\n<!-- bench:dreambooth_tradeoff_flux:end -->\n")
    T.main([*FLUX_SMALLEST, "--pipeline", str(tiny_emoji_flux_dir), "--workdir", str(out / "work"),
            "--out", str(out), "--page", str(page)])
    return out, json.loads((out / "dreambooth_tradeoff_flux.json").read_text()), page.read_text()


def test_flux_tradeoff_trains_every_method_and_reports_it(flux_tradeoff):
    out, results, page = flux_tradeoff
    assert (results["kind"], results["reference"], results["methods"]) == ("flux", "flux-lie", FLUX_METHODS)
    assert sorted(r["method"] for r in results["records"]) == sorted(FLUX_METHODS)
    for r in results["records"]:
        assert r["subject"] == "dog face" and r["lr"] == 1e-3 and "stopped" not in r
        assert -1 <= r["subject_similarity"] <= 1 and -1 <= r["prior_similarity"] <= 1 and r["heldout_loss"] > 0
    assert set(results["paired"]) == set(FLUX_METHODS) - {"flux-lie"}
    assert "STALE" not in page and "on the tiny emoji Flux model (test subjects)" in page
    assert all(f"| {m} |" in page for m in FLUX_METHODS)
    assert (out / "dreambooth_tradeoff_flux.png").is_file() and (out / "dreambooth_tradeoff_flux.md").is_file()


def test_flux_methods_train_the_layers_their_preset_names(flux_tradeoff, tiny_emoji_flux_dir):
    from diffusers import FluxTransformer2DModel

    from lie_diffusion import LieConfig, read_lie_file
    from lie_diffusion.inject import find_targets

    out, results, _ = flux_tradeoff
    files = {m: read_lie_file(out / "work" / "lr0.001" / "runs" / f"{m}-dog-face-seed0-lr0.001") for m in FLUX_METHODS}
    transformer = FluxTransformer2DModel.from_pretrained(str(tiny_emoji_flux_dir / "transformer"))
    for method, preset in (("flux-attn-lie", "flux-attn"), ("flux-lie", "flux"), ("flux-lora", "flux"),
                           ("flux-lie-unbalanced", "flux"), ("flux-all-linear-lie", "flux-all-linear")):
        modules = files[method].modules
        assert {m.component for m in modules} == {"transformer"}, method  # no text encoder trains
        assert sorted(m.module for m in modules) == sorted(find_targets(transformer, LieConfig(preset=preset))[1])
    attn, default, every = ({m.module for m in files[name].modules}
                            for name in ("flux-attn-lie", "flux-lie", "flux-all-linear-lie"))
    assert attn < default < every
    assert any(".ff." in n for n in default - attn) and any("norm1.linear" in n for n in every - default)
    # Lie (balanced: alpha x 1/RMS(W) per module; unbalanced: alpha = rank) against LoRA on the same layers
    sections = {m: {e.section for e in files[m].modules} for m in FLUX_METHODS}
    assert sections["flux-lora"] == {"lora"} and all(sections[m] == {"lie"} for m in FLUX_METHODS if m != "flux-lora")
    assert all(e.alpha == 2 for m in ("flux-lora", "flux-lie-unbalanced") for e in files[m].modules)
    assert all(e.alpha > 2 for e in files["flux-lie"].modules)  # the tiny model's weights have RMS < 1
    counts = {r["method"]: r for r in results["records"]}
    assert counts["flux-lie"]["heldout_loss"] != counts["flux-lora"]["heldout_loss"]
    sizes = {m: sum(e.A.numel() + e.B.numel() for e in files[m].modules) for m in FLUX_METHODS}
    assert sizes["flux-lie"] == sizes["flux-lora"] == sizes["flux-lie-unbalanced"]
    assert sizes["flux-attn-lie"] < sizes["flux-lie"] < sizes["flux-all-linear-lie"]


def test_flux_tradeoff_says_how_to_make_the_missing_model(tmp_path, monkeypatch, capsys):
    from benchmarks import dreambooth_tradeoff as T
    from lie_diffusion.emoji import pipeline as emoji_pipeline

    monkeypatch.setattr(emoji_pipeline, "PRETRAINED_ROOT", tmp_path)
    with pytest.raises(SystemExit, match=r"error: no pretrained emoji flux pipeline .*pretrain_tiny_emoji_flux\.py"):
        T.main(["--kind", "flux", "--workdir", str(tmp_path / "work"), "--out", str(tmp_path), "--page", "none"])
    assert not (tmp_path / "work").exists()
    with pytest.raises(SystemExit):
        T.main(["--kind", "flux", "--methods", "lie-default", "--workdir", str(tmp_path / "work")])
    assert "not methods of --kind flux" in capsys.readouterr().err
