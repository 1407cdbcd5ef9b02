"""The capacity benchmark at its smallest size, on the shipped pretrained emoji pipeline: every method
trains through the text-to-image script, budgets follow the factor shapes, the lr is chosen on the
validation split only, and a second invocation with the same workdir reuses every run."""

import json
import sys
from pathlib import Path

import pytest
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import capacity as C  # noqa: E402
from lie_diffusion import LieConfig, training  # noqa: E402
from lie_diffusion.emoji.pipeline import pretrained_emoji_pipeline  # noqa: E402
from lie_diffusion.inject import find_targets  # noqa: E402

SMALLEST = ["--ranks", "1", "--seeds", "2", "--lr-grid", "1e-3", "--steps", "1", "--batch", "2", "--pictures", "1",
            "--concepts", "2", "--pretrained", "2", "--sample-steps", "2"]


@pytest.fixture(scope="module")
def smallest(tmp_path_factory):
    out = tmp_path_factory.mktemp("capacity")
    original = training.add_adapters, training.finish_training
    argv = [*SMALLEST, "--workdir", str(out / "work"), "--out-dir", str(out)]
    C.main(argv)
    assert (training.add_adapters, training.finish_training) == original  # the swap is undone
    return out, argv, json.loads((out / "capacity.json").read_text())


def factor_sizes():
    """Per unit of rank, what an A·B pair costs on the layers the Lie default adapts (UNet and text encoder)."""
    pipeline = pretrained_emoji_pipeline()
    total = 0
    for model in (pipeline.unet, pipeline.text_encoder):
        convs, attns = find_targets(model, LieConfig())
        for name in convs + attns:
            m = model.get_submodule(name)
            if isinstance(m, nn.Conv2d):
                total += m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels
            else:
                total += m.in_features + m.out_features
    weights = sum(model.get_submodule(n).weight.numel() for model in (pipeline.unet, pipeline.text_encoder)
                  for n in sum(find_targets(model, LieConfig()), []))
    return total, weights


def test_every_method_runs_with_its_budget(smallest):
    out, _, results = smallest
    rows = {row["method"]: row for row in results["rows"]}
    assert set(rows) == {m.name for m in C.METHODS} and all(row["seeds"] == 2 for row in rows.values())
    per_rank, weights = factor_sizes()
    for name in ("lie-default", "lie-all", "locon"):  # one A·B pair per layer
        assert rows[name]["params"] == per_rank, name
    assert rows["dora"]["params"] > per_rank  # plus a magnitude per output channel
    assert rows["full"]["params"] == weights and rows["full"]["rank"] == 0
    for row in rows.values():
        assert 0 <= row["new_top1"] <= 1 and 0 <= row["old_top1"] <= 1 and row["heldout_loss"] > 0
        assert -1 <= row["new_similarity"] <= 1
        assert row["file_bytes"] > 4 * row["params"] * 0.99  # fp32 tensors, plus a header
    assert results["runs"] == 2 * len(C.METHODS)
    for name in ("capacity.md", "capacity_accuracy_vs_size.png", "capacity_tradeoff.png"):
        assert (out / name).stat().st_size > 0
    md = (out / "capacity.md").read_text()
    assert "| lie-default | 1 |" in md and "capacity_tradeoff.png" in md


def test_a_second_invocation_reuses_every_run(smallest, capsys):
    out, argv, results = smallest
    lines = (out / "work" / "runs.jsonl").read_text().splitlines()
    again = C.run(C.parse_args(argv), (out / "work").resolve())
    assert f"{len(lines)} finished runs of this setup found" in capsys.readouterr().out
    assert (out / "work" / "runs.jsonl").read_text().splitlines() == lines  # nothing trained again
    assert again["rows"] == results["rows"]


def test_lr_is_chosen_on_validation_numbers_only():
    def record(lr, validation_new, test_new, stopped=False):
        if stopped:
            return {"lr": lr, "stopped": "loss is nan"}
        return {"lr": lr, "validation": {"new_similarity": validation_new, "old_top1": 0.5, "heldout_loss": 0.1},
                "test": {"new_similarity": test_new, "old_top1": 0.5, "heldout_loss": 0.1}}

    assert C.choose_lr([record(1e-3, 0.2, 0.9), record(3e-3, 0.4, 0.1), record(1e-2, 0, 0, stopped=True)]) == 3e-3
    tie = [record(1e-3, 0.4, 0.0), record(3e-3, 0.4, 0.0)]
    tie[0]["validation"]["heldout_loss"] = 0.05  # equal accuracy: the lower validation loss wins
    assert C.choose_lr(tie) == 1e-3


def test_training_pictures_replay_the_pretrained_emoji(smallest):
    """The folder holds `--pictures` per new emoji and `--replay` per pretrained one, each captioned by name."""
    out, _, _ = smallest
    (data,) = (out / "work").glob("data-*")  # named by what it holds; nothing half-written beside it
    lines = [json.loads(x) for x in (data / training.METADATA).read_text().splitlines()]
    new, old = C.HELD_OUT[:2], C.trained_classes(C.pretrained_emoji_path())[:2]
    assert [x["text"].split(" emoji")[0][2:] for x in lines] == [*new, *(n for n in old for _ in range(4))]
    assert all((data / x["file_name"]).is_file() for x in lines)


def test_finished_only_tabulates_what_is_there_and_trains_nothing(smallest, capsys):
    """Split runs need not form a rectangle: --finished-only reports the complete cells, leaves out the rest."""
    out, argv, results = smallest
    lines = (out / "work" / "runs.jsonl").read_text().splitlines()
    args = C.parse_args([*argv, "--ranks", "1", "2", "--finished-only"])
    again = C.run(args, (out / "work").resolve())
    assert "not finished, left out: lie-default@2" in capsys.readouterr().out
    assert (out / "work" / "runs.jsonl").read_text().splitlines() == lines
    assert again["rows"] == results["rows"]
