"""Crash safety of DreamBooth training: SIGKILL the training script at chosen or random moments, resume
with `--resume_from_checkpoint latest`, and check that nothing half-written is ever taken for good and
that the final weights equal an uninterrupted run's, bit for bit.

    python benchmarks/crash_resume.py                  # 12 trials (~6 min on 2 CPU cores)
    python benchmarks/crash_resume.py --trials 30 --seed 1

Each trial kills one run (sometimes the resumed run too) and then resumes to the end. Kill moments:

* `step:N` — right after the N-th optimizer step;
* `state_save:N` — the N-th training-state file (optimizer / scheduler / RNG state) left half written;
* `fsync:N` — a file written in full but not yet renamed into place (adapter file, final weights);
* `replace:N` — just before the N-th `os.replace` (adapter file, checkpoint folder, final weights);
* `rmtree:N` — halfway through deleting a folder (pruning old checkpoints, `--checkpoints_total_limit`);
* `time:T` — T seconds after start, wherever the run is.

After every kill: each `checkpoint-N` folder and the top-level weights file, if present, must equal the
uninterrupted run's (safetensors by tensors and metadata, other files byte for byte). tests/test_crash_resume.py
runs two of these moments in CI.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_scripts" / "train_dreambooth_lie.py"
WEIGHTS = "pytorch_lora_weights.safetensors"
EVENTS = ("step", "state_save", "fsync", "replace", "rmtree")

# Runs the training script with hooks that SIGKILL the process at the N-th event named in $CRASH_AT.
DRIVER = r'''
import os, runpy, shutil, signal, sys
import torch

event, _, count = os.environ.get("CRASH_AT", ":0").partition(":")
seen = {"n": 0}


def due(kind):
    if kind != event:
        return False
    seen["n"] += 1
    return seen["n"] == int(count)


def die():
    sys.stdout.flush(); sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


step = torch.optim.AdamW.step
def killing_step(self, *args, **kwargs):
    result = step(self, *args, **kwargs)
    if due("step"):
        die()
    return result
torch.optim.AdamW.step = killing_step

import lie_diffusion.training.checkpoints as checkpoints
save_state = checkpoints.save_state_file
def killing_save_state(path, tree):
    save_state(path, tree)
    if due("state_save"):
        with open(path, "r+b") as file:  # a torn file: half of it on disk
            file.truncate(os.path.getsize(path) // 2)
        die()
checkpoints.save_state_file = killing_save_state

for name, kind in (("fsync", "fsync"), ("replace", "replace")):
    original = getattr(os, name)
    def killing(*args, _original=original, _kind=kind, **kwargs):
        if due(_kind):
            die()
        return _original(*args, **kwargs)
    setattr(os, name, killing)

rmtree = shutil.rmtree
def killing_rmtree(path, *args, **kwargs):
    if os.path.isdir(path) and due("rmtree"):
        files = sorted(p for p in os.listdir(path))
        if files:
            os.remove(os.path.join(path, files[0]))  # a folder half deleted
        die()
    return rmtree(path, *args, **kwargs)
shutil.rmtree = killing_rmtree

script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
'''


class CrashHarness:
    """Runs the training script on a tiny pipeline, killed or not, and checks its output folder."""

    def __init__(self, workdir, steps=4, checkpointing_steps=2, images=3, extra_flags=(), script=SCRIPT,
                 timeout=300):
        self.workdir, self.script, self.timeout = Path(workdir), Path(script), timeout
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.driver = self.workdir / "crash_driver.py"
        self.driver.write_text(DRIVER)
        model, data = self.workdir / "tiny-sd", self.workdir / "images"
        if not model.exists():
            from lie_diffusion.tiny import build_tiny_pipeline

            build_tiny_pipeline(model, kind="sd1")
        if not data.exists():
            _make_images(data, images)
        self.flags = ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(data),
                      "--instance_prompt", "a photo of sks toy", "--resolution", "32", "--train_batch_size", "1",
                      "--max_train_steps", str(steps), "--checkpointing_steps", str(checkpointing_steps),
                      "--lr_warmup_steps", "0", "--seed", "0", "--report_to", "none", *extra_flags]
        self.reference = self.workdir / "reference"

    def run(self, output, crash_at=None, resume=False, flags=None) -> int:
        """One training run into `output`; `crash_at` is "event:N" or "time:seconds". Returns the exit status."""
        pythonpath = os.pathsep.join(filter(None, [str(self.script.parents[1]), os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CRASH_AT="", PYTHONPATH=pythonpath)
        if crash_at and not crash_at.startswith("time:"):
            env["CRASH_AT"] = crash_at
        flags = self.flags if flags is None else flags
        command = [sys.executable, str(self.driver), str(self.script), *flags, "--output_dir", str(output)]
        if resume:
            command += ["--resume_from_checkpoint", "latest"]
        with open(Path(output).parent / f"{Path(output).name}.log", "a") as log:
            log.write(f"\n=== {' '.join(command[2:])} (crash_at={crash_at})\n")
            log.flush()
            process = subprocess.Popen(command, stdout=log, stderr=log, env=env, cwd=self.script.parents[1])
            try:
                if crash_at and crash_at.startswith("time:"):
                    try:
                        return process.wait(timeout=float(crash_at[5:]))
                    except subprocess.TimeoutExpired:
                        process.send_signal(signal.SIGKILL)
                return process.wait(timeout=self.timeout)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()

    def make_reference(self) -> None:
        if not (self.reference / WEIGHTS).exists():
            shutil.rmtree(self.reference, ignore_errors=True)
            # Every checkpoint kept, to compare with whichever ones a pruning run has at the moment it is killed.
            flags = list(self.flags)
            if "--checkpoints_total_limit" in flags:
                at = flags.index("--checkpoints_total_limit")
                del flags[at:at + 2]
            status = self.run(self.reference, flags=flags)
            if status != 0:
                raise RuntimeError(f"the uninterrupted run failed (status {status}); see {self.reference}.log")

    def check_nothing_half_written(self, output) -> list[str]:
        """Problems with what `output` holds under final names (empty when everything is complete)."""
        problems = []
        if not Path(output).exists():  # killed before the script made it
            return problems
        for path in sorted(Path(output).iterdir()):
            if path.name.startswith("checkpoint-"):
                problems += _compare_dirs(path, self.reference / path.name)
            elif path.name == WEIGHTS:
                problems += _compare_files(path, self.reference / WEIGHTS)
        return problems

    def final_weights_match(self, output) -> bool:
        weights = Path(output) / WEIGHTS
        return weights.exists() and not _compare_files(weights, self.reference / WEIGHTS)

    def trial(self, output, kills: list[str]) -> dict:
        """Kill successive runs at `kills` (the first a fresh run, the others resumes), then resume to the end."""
        shutil.rmtree(output, ignore_errors=True)
        record = {"kills": kills, "statuses": [], "problems": []}
        for i, crash_at in enumerate(kills):
            record["statuses"].append(self.run(output, crash_at, resume=i > 0))
            record["problems"] += [f"after kill {crash_at}: {p}" for p in self.check_nothing_half_written(output)]
        status = self.run(output, resume=True)
        record["statuses"].append(status)
        if status != 0:
            record["problems"].append(f"the resumed run failed (status {status}); see {output}.log")
        elif not self.final_weights_match(output):
            record["problems"].append("the final weights differ from the uninterrupted run's")
        return record


def _make_images(directory, count):
    sys.path.insert(0, str(REPO / "examples"))
    from synthetic_data import make_instance_images

    make_instance_images(directory, count=count, size=48)


def _compare_files(got: Path, want: Path) -> list[str]:
    if not want.exists():
        return [f"{got} exists, but the uninterrupted run has no {want.name} there"]
    if got.suffix != ".safetensors":
        return [] if got.read_bytes() == want.read_bytes() else [f"{got} differs from {want}"]
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(got), "pt") as a, safe_open(str(want), "pt") as b:
            same = a.metadata() == b.metadata() and set(a.keys()) == set(b.keys())
            same = same and all(a.get_tensor(k).equal(b.get_tensor(k)) for k in a.keys())
    except SafetensorError as error:
        return [f"{got} is not a readable safetensors file ({error})"]
    return [] if same else [f"{got} differs from {want}"]


def _compare_dirs(got: Path, want: Path) -> list[str]:
    if not want.is_dir():
        return [f"{got} exists, but the uninterrupted run has no {want.name}"]
    names = sorted(p.name for p in got.iterdir())
    expected = sorted(p.name for p in want.iterdir())
    if names != expected:
        return [f"{got} holds {names}, expected {expected}"]
    return [problem for name in names for problem in _compare_files(got / name, want / name)]


def random_kill(rng: random.Random, run_seconds: float) -> str:
    """A kill moment: an instrumented event (most of the time) or a random time into the run."""
    if rng.random() < 0.25:
        return f"time:{rng.uniform(0.3, 0.8) * run_seconds:.2f}"  # runs vary in length: stay inside one
    event = rng.choice(EVENTS)
    # How often each event happens in a whole run of main()'s settings (6 steps, 3 checkpoints, 1 pruning).
    count = {"step": 6, "state_save": 6, "fsync": 4, "replace": 7, "rmtree": 1}[event]
    return f"{event}:{rng.randint(1, count)}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="kept when given (default: a temporary folder)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="crash-resume-"))
    # 3 images, batch 1: 3 steps per epoch, so checkpoint-4 is mid-epoch and the last checkpoint is the last step;
    # --checkpoints_total_limit 2 makes the runs prune (and the kills hit the pruning).
    harness = CrashHarness(workdir, steps=6, checkpointing_steps=2, extra_flags=("--checkpoints_total_limit", "2"))
    start = time.time()
    harness.make_reference()
    run_seconds = time.time() - start
    rng = random.Random(args.seed)
    failures = 0
    for trial in range(args.trials):
        kills = [random_kill(rng, run_seconds) for _ in range(1 + (rng.random() < 0.3))]
        record = harness.trial(workdir / f"trial-{trial:02d}", kills)
        failures += bool(record["problems"])
        verdict = "ok" if not record["problems"] else "FAIL: " + "; ".join(record["problems"])
        # -9: killed; 0: the run ended before the kill moment came (a resumed run has fewer events).
        print(f"trial {trial:2d}: kills {', '.join(kills):<28} exit statuses {record['statuses']} -> {verdict}",
              flush=True)
    print(f"{args.trials - failures}/{args.trials} trials resumed to the uninterrupted run's weights, bit for bit, "
          f"with no half-written file under a final name ({time.time() - start:.0f} s; work folder {workdir}).")
    if args.workdir is None and not failures:
        shutil.rmtree(workdir)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
