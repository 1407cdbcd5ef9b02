"""Smoke test of the README's first command: examples/quickstart.py, with 2 training steps."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_quickstart_trains_loads_and_merges(tmp_path):
    command = [sys.executable, str(REPO / "examples" / "quickstart.py"), "--output_dir", str(tmp_path),
               "--max_train_steps", "2"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=420, env=env, cwd=tmp_path)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"quickstart timed out\n{error.stdout}\n{error.stderr}")
    if result.returncode != 0:
        pytest.fail(f"quickstart failed ({result.returncode})\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    output = tmp_path / "lie-dreambooth"
    for path in (output / "pytorch_lora_weights.safetensors", output / "README.md", output / "checkpoint-1",
                 tmp_path / "sample_merged.png"):
        assert path.exists(), path
    assert str(output / "pytorch_lora_weights.safetensors") in result.stdout
    changed = float(re.search(r"max \|adapted - base\| += ([0-9.e+-]+)", result.stdout).group(1))
    merged = float(re.search(r"max \|merged - adapted\| += ([0-9.e+-]+)", result.stdout).group(1))
    assert changed > 1e-4 and merged < 1e-4
