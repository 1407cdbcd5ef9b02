"""Crash safety of the training script, with two kill points (benchmarks/crash_resume.py runs many more).

The run is SIGKILLed twice, then resumed with `--resume_from_checkpoint latest`; after each kill, every
file under a final name must equal the uninterrupted run's, and the final weights must equal them bit for bit.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from crash_resume import CrashHarness  # noqa: E402


def test_killed_twice_then_resumed_gives_the_uninterrupted_weights(tmp_path):
    # 3 images, batch 1, 4 steps, checkpoints at 2 and 4: checkpoint-4 is mid-epoch and is the last step.
    harness = CrashHarness(tmp_path, steps=4, checkpointing_steps=2)
    harness.make_reference()
    # 1st run: killed with the 3rd training-state file half written (checkpoint-4's optimizer state; each
    # checkpoint writes that and one random-state file), so the resume must take checkpoint-2. 2nd run: killed just before renaming the final weights into place (its
    # 3rd os.replace: checkpoint-4's adapter file, checkpoint-4 itself, then the weights), so the last resume
    # starts from the checkpoint of the last step and must not train any further.
    record = harness.trial(tmp_path / "run", ["state_save:3", "replace:3"])
    log = (tmp_path / "run.log").read_text()
    assert record["statuses"] == [-9, -9, 0], log[-4000:]
    assert not record["problems"], "\n".join(record["problems"]) + "\n" + log[-4000:]
    resumed_from = [line.rsplit("/", 1)[-1] for line in log.splitlines() if line.startswith("Resuming from")]
    assert resumed_from == ["checkpoint-2", "checkpoint-4"]
    assert not (tmp_path / "run" / ".checkpoint-4.partial").exists()  # the torn folder was replaced
