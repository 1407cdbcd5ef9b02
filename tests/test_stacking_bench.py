"""The stacking benchmark at its smallest size, on the shipped pretrained emoji pipeline, and its reading."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import dreambooth as D  # noqa: E402
from benchmarks import stacking as S  # noqa: E402

README = "# x\n\n<!-- bench:stacking:start -->\nSTALE\n<!-- bench:stacking:end -->\nkeep\n"
SMALLEST = ["--seeds", "1", "--steps", "1", "--rank", "2", "--class-images", "1", "--subject-images", "1",
            "--prior-prompts", "2", "--sample-steps", "1", "--methods", "lie-default", "lora-conv-attn"]


@pytest.fixture(scope="module")
def smallest(tmp_path_factory):
    out = tmp_path_factory.mktemp("stacking")
    readme = out / "README.md"
    readme.write_text(README)
    results = S.main([*SMALLEST, "--workdir", str(out / "work"), "--out", str(out), "--page", str(readme)])
    return out, results, readme.read_text()


def test_every_pair_is_scored_alone_and_together_and_published(smallest):
    out, results, readme = smallest
    assert json.loads((out / "stacking.json").read_text())["summary"] == results["summary"]
    assert "STALE" not in readme and "| lie-default | 1 |" in readme and readme.endswith("keep\n")
    assert sorted(t["method"] for t in results["tasks"]) == ["lie-default", "lora-conv-attn"]
    for task in results["tasks"]:
        assert len(task["alone"]) == len(S.TOKENS) * len(S.STRENGTHS)
        assert len(task["pairs"]) == len(S.PAIRS) * len(S.STRENGTHS) and not task["stopped"]
    assert results["lr"] == S.chosen_lrs(["lie-default", "lora-conv-attn"])
    assert {k: v["cases"] for k, v in results["summary"]["paired"].items()} == {
        "lora-conv-attn@1": len(S.PAIRS), "lora-conv-attn@0.7": len(S.PAIRS)}


@pytest.mark.parametrize("method", ["lie-default", "lora-conv-attn"])
def test_a_pair_is_two_active_adapters_at_the_strength(smallest, method):
    out, results, _ = smallest
    stacking = S.Stacking(S.parse_args([*SMALLEST, "--workdir", str(out / "work")]), out / "work", prepare=False)
    first, second = stacking.subjects[:2]
    lr = results["lr"][method]
    adapters = {s: stacking.adapter(method, s, 0, lr) for s in (first, second)}
    assert all(path.is_file() for path in adapters.values())  # kept by the run: not trained again
    pipeline = stacking.loaded(method, adapters, 0.7)
    layers = [m for m in pipeline.unet.modules() if hasattr(m, "lora_A") and m.lora_A]
    names = [D.slug(first), D.slug(second)]
    assert layers and all(sorted(m.active_adapters) == names for m in layers)
    if method == "lora-conv-attn":  # LoRA alpha = rank: the scaling is the strength
        assert all(m.scaling[n] == pytest.approx(0.7) for m in layers for n in names)


def test_a_second_invocation_reuses_finished_tasks(smallest, monkeypatch, tmp_path):
    out, results, _ = smallest

    def no_training(*_, **__):
        raise AssertionError("trained again")

    monkeypatch.setattr(D.Bench, "train", no_training)
    again = S.main([*SMALLEST, "--workdir", str(out / "work"), "--out", str(tmp_path), "--page", "none"])
    assert again["tasks"] == results["tasks"]


def test_reading_pairs_the_same_cases():
    def task(method, together, alone, prior):
        pair = {"a": {"similarity": together, "named": 1.0}, "b": {"similarity": together, "named": 0.0},
                "prior_similarity": prior, "prior_accuracy": 0.5}
        single = {s: {s: {"similarity": alone, "named": 1.0}, "prior_similarity": prior + 0.01, "prior_accuracy": 0.5}
                  for s in "ab"}
        return {"method": method, "seed": 0, "lr": 1e-3, "pairs": {"a+b@1": pair},
                "alone": {f"{s}@1": single[s] for s in "ab"}, "stopped": [], "train_s": 1.0, "eval_s": 1.0}

    results = {"methods": {"lie-default": "", "lora-conv-attn": ""}, "strengths": [1.0],
               "tasks": [task("lie-default", 0.70, 0.75, 0.72), task("lora-conv-attn", 0.60, 0.70, 0.70)]}
    summary = S.summarize(results)
    assert summary["methods"]["lie-default"]["1"]["interference"] == pytest.approx(-0.05)
    assert summary["methods"]["lora-conv-attn"]["1"]["named_together"] == pytest.approx(0.5)
    paired = summary["paired"]["lora-conv-attn@1"]
    assert paired["interference"] == {"mean_difference": pytest.approx(0.05), "wins": 1}
    assert paired["prior_together"]["mean_difference"] == pytest.approx(0.02)


def test_lr_flag():
    assert S.method_lr("lie-default=3e-3") == ("lie-default", 3e-3)
    with pytest.raises(Exception, match="METHOD=LR"):
        S.method_lr("nonsense=1")
