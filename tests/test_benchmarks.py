"""Smoke test of the benchmark scripts' building blocks on toy sizes (structure only, never timings)."""

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import benchlib as B  # noqa: E402

PAGE_TEMPLATE = "# x\n\n<!-- bench:speed:start -->\nSTALE\n<!-- bench:speed:end -->\nkeep\n<!-- bench:quality:start -->\n<!-- bench:quality:end -->\n"


@pytest.fixture(scope="module")
def tiny():
    base = B.build_unet("tiny")
    inputs, target = B.unet_batch(base, 1, 8)
    return base, B.conv_targets(base), inputs, target


@pytest.mark.parametrize("method", ["lie-exp", "lie-taylor", "peft-lora", "peft-hira", "floor"])
def test_peers_attach_train_and_detach(tiny, method):
    base, targets, inputs, target = tiny
    model = B.clone(base)
    reference = base(**inputs).sample
    adapted = B.attach(method, model, targets, rank=2)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapted.params}
    if method != "floor":  # every adapter: same factor shapes, so the same budget at the same rank
        expected = sum(2 * (model.get_submodule(t).get_base_layer().weight[0].numel() + model.get_submodule(t).get_base_layer().out_channels) for t in targets)
        assert B.count_params(adapted.params) == expected
    torch.testing.assert_close(model(**inputs).sample, reference)  # identity at init
    B.train_step(model, adapted, inputs, target)()
    adapted.detach()
    assert all(type(model.get_submodule(t)) is nn.Conv2d for t in targets)
    assert not any(p.requires_grad for p in model.parameters())


def test_interleaved_memory_and_page_update(tmp_path):
    calls = []
    times = B.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=2, warmup=1, log=lambda _: None)
    assert calls == ["a", "b", "a", "b", "b", "a"]  # warm-up, then rotated rounds
    assert {k: len(v) for k, v in times.items()} == {"a": 2, "b": 2}
    peak = B.peak_memory(lambda: torch.ones(2**22).sum())  # a 16 MiB temporary
    assert 15.9 < peak["tensor_mib"] < 16.1
    assert peak["rss_mib"] is None or peak["rss_mib"] >= 0

    page = tmp_path / "page.md"
    page.write_text(PAGE_TEMPLATE)
    B.update_page("speed", "| new |", page)
    assert page.read_text() == PAGE_TEMPLATE.replace("STALE", "| new |")
    page.write_text("no markers")
    with pytest.raises(ValueError, match="bench:speed"):
        B.update_page("speed", "x", page)
    # figures are linked relative to the page that shows them
    assert B.link(B.RESULTS_DIR / "speed.png", B.PAGES["speed"]) == "../benchmarks/results/speed.png"
    assert B.link(B.RESULTS_DIR / "speed.png", "none") == "benchmarks/results/speed.png"


def test_speed_script_end_to_end(tmp_path):
    pytest.importorskip("lycoris")
    import speed

    readme = tmp_path / "page.md"
    readme.write_text(PAGE_TEMPLATE)
    speed.main(["--size", "tiny", "--latents", "8", "--batch", "1", "--reps", "1", "--warmup", "0", "--inference-reps", "1",
                "--compile-size", "none",
                "--files-size", "tiny", "--file-reps", "1", "--out", str(tmp_path), "--page", str(readme)])
    data = json.loads((tmp_path / "speed.json").read_text())
    config = data["configs"]["8"]
    assert set(config["train"]["methods"]) == set(B.TRAIN_PEERS) | set(speed.VARIANTS)
    assert {"step_s", "fwd_bwd_s", "peak_step_mib", "peak_step_rss_mib"} <= set(config["train"]["methods"]["lie-exp"])
    assert set(config["train"]["floor_time_split"]) == {"convolutions", "attention", "other"}
    assert config["train"]["lie_extra_by_op"] and all(op.startswith("aten::") for op in config["train"]["lie_extra_by_op"])
    assert set(config["inference"]) == {"base", "lie-exp unfused", "lie-exp unfused, no W' cache", "lie-taylor unfused",
                                        "peft-lora unfused", "lie-exp fused"}
    assert "compiled" not in data
    assert data["weight_work"]["convs"] == len(B.conv_targets(B.build_unet("tiny"))) and data["weight_work"]["lie_extra_s"]
    assert "Measured alone" in readme.read_text()
    assert all({"goal", "measured", "met"} <= set(g) for g in config["goals"])
    assert {"load", "merge"} <= set(data["files"]["ops"])
    text = readme.read_text()
    assert "| lie-exp |" in text and "STALE" not in text and text.endswith("keep\n<!-- bench:quality:start -->\n<!-- bench:quality:end -->\n")
    assert (tmp_path / "speed.png").read_bytes().startswith(b"\x89PNG")


def test_speed_dit_end_to_end(tmp_path):
    """`speed.py --dit` on Flux blocks of the tiny width: every method on the same Linear layers, results written,
    the README left alone."""
    import speed

    docs = tmp_path / "performance-dit.md"
    docs.write_text("# x\n<!-- bench:speed_dit:start -->\nSTALE\n<!-- bench:speed_dit:end -->\nkeep\n")
    data = speed.main(["--dit", "--dit-width", "tiny", "--dit-image-tokens", "4", "--dit-text-tokens", "2", "--batch", "1",
                       "--rank", "2", "--reps", "1", "--warmup", "0", "--out", str(tmp_path),
                       "--dit-docs", str(docs)])
    dit = data["dit"]
    assert set(dit["methods"]) == set(speed.DIT_METHODS)
    assert dit["config"]["blocks"] == ["FluxTransformerBlock", "FluxSingleTransformerBlock"] and dit["config"]["targets"] == 15
    floor = dit["methods"]["floor"]
    assert floor["grad_params"] == dit["config"]["target_weights"] and not floor["has_optimizer"]
    lie, lora = dit["methods"]["lie-exp"], dit["methods"]["peft-lora"]
    assert lie["trainable_params"] == lora["trainable_params"] > 0 and lie["peak_step_mib"] > 0
    text = (tmp_path / "speed_dit.md").read_text()
    assert "| lie-exp |" in text and data["command"].startswith("python benchmarks/speed.py --dit") and "--dit" in text
    assert not (tmp_path / "speed.json").exists()
    page = docs.read_text()
    assert "| lie-exp |" in page and "STALE" not in page and page.endswith("keep\n")


def test_shared_weight_clones_leave_the_base_frozen_for_every_method():
    """Flux-size clones share their frozen weights; the floor trains copies of its own."""
    base = B.build_flux_blocks("tiny")
    targets = B.flux_targets(base)
    inputs, target = B.flux_batch(base, 1, 4, 2)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    for method in ("floor", "lie-exp", "peft-lora", "peft-hira"):
        model = B.clone(base, share_weights=True)
        B.train_step(model, B.attach(method, model, targets, 2), inputs, target)()
        assert not any(p.requires_grad or p.grad is not None for p in base.parameters()), method
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    floor = B.clone(base, share_weights=True)
    B.attach("floor", floor, targets, 2)
    assert all(floor.get_submodule(t).weight is not base.get_submodule(t).weight for t in targets)
    assert floor.double_block.norm1.linear.weight is base.double_block.norm1.linear.weight


def test_compiled_benchmark_counts_graph_breaks():
    import speed

    out = speed.bench_compiled("micro", 8, 1, 2, reps=1, warmup=0, methods=("floor", "lie-exp"), backend="eager",
                               log=lambda _: None)
    assert out["methods"]["lie-exp"]["graph_breaks"] == 0 and out["methods"]["floor"]["x_floor"] == 1.0
    assert all(m["fwd_bwd_s"] > 0 and m["compile_s"] > 0 for m in out["methods"].values())


def test_gpu_script_dry_run(tmp_path):
    pytest.importorskip("lycoris")
    import gpu_bench

    gpu_bench.main(["--device", "cpu", "--tiny", "--latent", "8", "--reps", "1", "--warmup", "0", "--dtypes", "bf16", "--compile", "none",
                    "--out", str(tmp_path)])
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert set(data["configs"]) == {"bf16, xformers off", "bf16, xformers on"}
    assert "lie-exp" in data["configs"]["bf16, xformers off"]["train"]["methods"]
    assert "skipped" in data["configs"]["bf16, xformers on"]  # xformers needs CUDA


def test_quality_script_end_to_end(tmp_path):
    pytest.importorskip("sklearn")
    import quality

    readme = tmp_path / "page.md"
    readme.write_text(PAGE_TEMPLATE)
    quality.main(["--methods", "peft-lora", "lie-exp", "--steps", "1", "--batch", "4", "--seeds", "2", "--pretrain-steps", "1",
                  "--lr-grid", "1e-3", "--eval-draws", "1", "--samples", "2", "--sample-steps", "1",
                  "--out", str(tmp_path), "--readme", str(readme)])
    data = json.loads((tmp_path / "quality.json").read_text())
    runs = data["methods"]["lie-exp"]
    assert len(runs["test_per_seed"]) == 2 and runs["test_std"] >= 0
    assert data["methods"]["lie-exp"]["trainable_params"] == data["methods"]["peft-lora"]["trainable_params"]
    assert (tmp_path / "quality_samples.png").stat().st_size > 0
    assert "| lie-exp |" in readme.read_text()


def _fake_speed(latents=(8, 16)):
    train = {"lie-exp": 1.2, "peft-lora": 1.1, "floor": 1.0}
    inference = {"base": 1.0, "lie-exp unfused": 1.05, "lie-exp fused": 1.0}
    return {"env": {"cpu": "test", "torch_threads": 1, "date": "today"},
            "configs": {str(n): {"train": {"methods": {m: {"step_s": x * n} for m, x in train.items()}},
                                 "inference": {m: {"x_base": x} for m, x in inference.items()}} for n in latents}}


def test_speed_figure_redrawn_from_saved_json(tmp_path):
    pytest.importorskip("matplotlib")
    import speed

    (tmp_path / "speed.json").write_text(json.dumps(_fake_speed()))
    path = speed.main(["--plot-only", "--out", str(tmp_path)])
    assert path == tmp_path / "speed.png" and path.read_bytes().startswith(b"\x89PNG")
    assert not (tmp_path / "speed.png.partial").exists()


def test_tradeoff_figure_redrawn_from_saved_json(tmp_path):
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import dreambooth_tradeoff as T

    records = [{"method": method, "subject": subject, "seed": seed, "lr": lr,
                "prior_similarity": 0.9 - lr * 100 + 0.01 * seed, "subject_similarity": 0.5 + lr * 100 + shift + 0.02 * seed}
               for method, shift in (("lie-default", 0.0), ("lora-conv-attn", 0.01))
               for subject in ("rocket", "crown") for seed in (0, 1) for lr in (1e-3, 3e-3)]
    records.append({**records[0], "stopped": "NaN loss at step 3"})  # NaN stops are left out of the curves
    data = {"split": "test", "subjects": ["crown", "rocket"], "seeds": 2, "steps": 3, "records": records}
    (tmp_path / "dreambooth_tradeoff.json").write_text(json.dumps(data))
    path = T.main(["--plot-only", "--out", str(tmp_path)])
    assert path.read_bytes().startswith(b"\x89PNG")
    # per lr: the mean over seeds of each seed's mean over subjects, and the seeds' standard deviation
    spread = T.seed_spread([r for r in records if r["method"] == "lie-default"])
    prior, prior_sd, subject, subject_sd = spread[1e-3]
    assert prior == pytest.approx(0.8 + 0.005) and subject == pytest.approx(0.6 + 0.01)
    assert prior_sd == pytest.approx(0.01 / 2**0.5) and subject_sd == pytest.approx(0.02 / 2**0.5)
