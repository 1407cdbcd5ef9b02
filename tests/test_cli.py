"""`lie-diffusion merge | inspect`: once each as a real subprocess, the rest in-process (faster)."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_io import TOL, make_adapter, max_diff, outputs

from lie_diffusion import LieConfig, __version__
from lie_diffusion.cli import main

REPO = Path(__file__).resolve().parents[1]


def run_module(*args, **options):
    """`python -m lie_diffusion ARGS` on this checkout; output captured unless `options` say otherwise."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    options = {"capture_output": True, **options}
    return subprocess.run([sys.executable, "-m", "lie_diffusion", *map(str, args)], text=True, env=env, **options)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    pipe, path = make_adapter(
        tmp_path_factory.mktemp("cli-adapter"),
        unet_config=LieConfig(rank=4, alpha=2, attn_rank=2, balance="none"),
        text_encoder_config=LieConfig(rank=2),
        seed=3,
    )
    return SimpleNamespace(path=path, outputs=outputs(pipe), pipe=pipe)


def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"lie-diffusion {__version__}"
    for argv, expected in (
        (["--help"], ["merge", "inspect"]),
        (["merge", "--help"], ["--base", "--dtype", "--overwrite"]),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        printed = capsys.readouterr().out
        assert exit_info.value.code == 0 and all(word in printed for word in expected)


def test_inspect_as_subprocess(adapter):
    result = run_module("inspect", adapter.path)
    assert result.returncode == 0, result.stderr
    report = result.stdout
    lie_params = sum(t.numel() for k, t in load_file(adapter.path).items() if k.startswith("lie."))
    assert "format_version 1" in report and "Defaults: mode exp, rank 4, alpha 2.0" in report
    assert f"Lie   23 modules (unet 23), {lie_params:,} parameters, keys lie.unet.*" in report
    assert "LoRA  40 modules (unet 32, text_encoder 8)" in report
    assert (
        "Stock diffusers: pipe.load_lora_weights() loads the LoRA section (40 modules) and ignores the Lie section"
        in report
    )
    assert "lie      conv    4     2      exp   1,280   unet.down_blocks.0.resnets.0.conv1" in report
    assert "lora     linear  2     2      -     " in report


def test_closed_output_pipe_ends_quietly(adapter):
    """`lie-diffusion inspect FILE | head -0`: the reader is gone before the first write."""
    read, write = os.pipe()
    os.close(read)
    with os.fdopen(write, "wb") as stdout:
        result = run_module("inspect", adapter.path, capture_output=False, stdout=stdout, stderr=subprocess.PIPE)
    assert (result.returncode, result.stderr) == (141, "")


def test_inspect_lie_only_file_says_stock_diffusers_sees_nothing(tmp_path, capsys):
    _, path = make_adapter(tmp_path, unet_config=LieConfig(attn_adapter="none"))
    assert main(["inspect", str(tmp_path)]) == 0
    report = capsys.readouterr().out
    assert "Balance: rms" in report  # the default rule, named; the fixture above (balance="none") has no line
    assert "LoRA  absent" in report and "Stock diffusers: sees no LoRA part" in report


def test_merge_as_subprocess_loads_with_stock_diffusers(adapter, tiny_pipeline_dir, tmp_path):
    output = tmp_path / "merged"
    result = run_module("merge", "--base", tiny_pipeline_dir, "--weights", adapter.path, "--output", output)
    assert result.returncode == 0, result.stderr
    merged = StableDiffusionPipeline.from_pretrained(output)
    assert max_diff(outputs(merged), adapter.outputs) <= TOL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no staging folders left behind


def test_merge_refuses_non_empty_output_then_overwrites_in_fp16(adapter, tiny_pipeline_dir, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("precious")
    argv = ["merge", "--base", str(tiny_pipeline_dir), "--weights", str(adapter.path), "--output", str(output)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err and (output / "keep.txt").exists()

    assert main(argv + ["--overwrite", "--dtype", "fp16", "--scale", "0.5"]) == 0
    assert not (output / "keep.txt").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with safe_open(str(output / "unet" / "diffusion_pytorch_model.safetensors"), framework="pt") as file:
        assert {file.get_tensor(k).dtype for k in file.keys()} == {torch.float16}


def test_errors_are_one_line_on_stderr_and_nothing_is_written(adapter, tiny_pipeline_dir, tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("lie-diffusion inspect: error: ")
    assert captured.err.count("\n") == 1 and "missing.safetensors" in captured.err

    tensors = load_file(adapter.path)
    tensors[next(k for k in tensors if k.startswith("lie."))].view(-1)[0] = float("nan")
    with safe_open(str(adapter.path), framework="pt") as file:
        save_file(tensors, tmp_path / "bad.safetensors", metadata=file.metadata())
    output = tmp_path / "never"
    argv = [
        "merge",
        "--base",
        str(tiny_pipeline_dir),
        "--weights",
        str(tmp_path / "bad.safetensors"),
        "--output",
        str(output),
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "content hash" in err and "bad.safetensors" in err and "Traceback" not in err and not output.exists()
