"""End-to-end tests of train_scripts/train_dreambooth_lie.py: real `accelerate launch` / `torchrun` runs
on the tiny pipeline, a few steps each, plus in-process checks of the data and flag handling.

The runs are few and each checks several things: every start costs seconds of imports on CPU.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lie_diffusion import load_lie_weights, read_lie_file

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_scripts" / "train_dreambooth_lie.py"
WEIGHTS = "pytorch_lora_weights.safetensors"
TIMEOUT = 420  # seconds per run: generous, the CI machine may be busy


def _load(path):
    """Import a file that is not in a package (the script, the example helpers) as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train = _load(SCRIPT)
make_instance_images = _load(REPO / "examples" / "synthetic_data.py").make_instance_images


def _env(**extra):
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    # One thread: on tiny tensors more only adds overhead, and a busy 2-core machine makes it 10x slower.
    return dict(os.environ, PYTHONPATH=pythonpath, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra)


def _python():
    return [sys.executable, str(SCRIPT)]


def _accelerate(mixed_precision="no"):
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
            "--mixed_precision", mixed_precision, "--dynamo_backend", "no", str(SCRIPT)]


def _torchrun(nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), str(SCRIPT)]


def _common(model, instances, output, steps):
    return ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(instances),
            "--instance_prompt", "a photo of sks toy", "--output_dir", str(output), "--resolution", "32",
            "--train_batch_size", "1", "--max_train_steps", str(steps), "--lr_warmup_steps", "0", "--seed", "0",
            "--num_inference_steps", "2"]


def _describe(result_or_error) -> str:
    out = result_or_error.stdout or ""
    err = result_or_error.stderr or ""
    out = out.decode() if isinstance(out, bytes) else out
    err = err.decode() if isinstance(err, bytes) else err
    return f"--- stdout (tail) ---\n{out[-3000:]}\n--- stderr (tail) ---\n{err[-6000:]}"


def run(command, ok=True, env=None):
    """Run a command; on an unexpected exit status or a timeout, fail showing its output."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=env or _env(), cwd=REPO)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"timed out after {TIMEOUT}s: {' '.join(command)}\n{_describe(error)}")
    if (result.returncode == 0) != ok:
        pytest.fail(f"exit status {result.returncode}: {' '.join(command)}\n{_describe(result)}")
    return result


def _driver(directory, script=SCRIPT):
    """A wrapper running a training script with a global optimizer-step hook (any optimizer class): per
    step it writes the process rank, the optimizer class, the dtypes of the optimized parameters and their
    sum after the update, in one write so that two processes' lines do not interleave."""
    driver = Path(directory) / "driver.py"
    driver.write_text(
        "import os, runpy, sys\n"
        "from torch.optim.optimizer import register_optimizer_step_post_hook\n"
        "def report(optimizer, args, kwargs):\n"
        "    params = [p for group in optimizer.param_groups for p in group['params']]\n"
        "    dtypes = ','.join(sorted({str(p.dtype) for p in params}))\n"
        "    total = sum(p.double().sum().item() for p in params)\n"
        "    line = f'STEP rank={os.environ.get(\"RANK\", 0)} optimizer={type(optimizer).__name__} dtypes={dtypes}'\n"
        "    os.write(2, f'\\n{line} sum={total!r}\\n'.encode())\n"
        "register_optimizer_step_post_hook(report)\n"
        f"sys.argv[0] = {str(script)!r}\n"
        f"runpy.run_path({str(script)!r}, run_name='__main__')\n"
    )
    return driver


def _steps(result):
    """(rank, dtypes, sum) for each optimizer step reported by the driver."""
    return re.findall(r"STEP rank=(\d+) optimizer=\w+ dtypes=(\S+) sum=([-+.0-9e]+|nan|-?inf)", result.stderr)


def checkpoints(output):
    return sorted((p.name for p in Path(output).iterdir() if p.name.startswith("checkpoint-")),
                  key=lambda n: int(n.split("-")[1]))


def load_weights(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / WEIGHTS))


@pytest.fixture(scope="module")
def toy_images(tmp_path_factory):
    directory = tmp_path_factory.mktemp("toy")
    make_instance_images(directory, count=2, size=48)
    return directory


@pytest.fixture(scope="module")
def messy_images(tmp_path_factory):
    """Five usable images in every awkward form, plus two files that are not images."""
    directory = tmp_path_factory.mktemp("messy")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    Image.fromarray(pixels).save(directory / "exif.jpg", exif=exif)
    Image.fromarray(pixels).convert("L").save(directory / "gray.png")
    rgba = Image.fromarray(pixels).convert("RGBA")
    rgba.putalpha(Image.fromarray((np.arange(48)[None, :].repeat(40, 0) * 5).astype(np.uint8)))
    rgba.save(directory / "rgba.png")
    Image.fromarray(pixels).convert("P", palette=Image.Palette.ADAPTIVE).save(directory / "palette.png")
    Image.fromarray(pixels[:12, :16]).save(directory / "small.png")  # smaller than the resolution
    (directory / "broken.jpg").write_bytes(b"\xff\xd8\xff this is not a JPEG")
    (directory / "notes.txt").write_text("not an image")
    return directory


# ------------------------------------------------------------------------------------- in-process checks


def test_load_rgb_handles_exif_modes_and_transparency(messy_images):
    upright = train.load_rgb(messy_images / "exif.jpg")
    assert upright.mode == "RGB" and upright.size == (40, 48)  # stored 48x40, EXIF says rotate
    for name in ("gray.png", "rgba.png", "palette.png", "small.png"):
        assert train.load_rgb(messy_images / name).mode == "RGB"
    # Fully transparent pixels become white, not whatever colour they hide.
    assert np.asarray(train.load_rgb(messy_images / "rgba.png"))[:, 0].min() == 255


def test_dataset_crops_small_images_and_is_deterministic(messy_images):
    files = [messy_images / "small.png", messy_images / "exif.jpg"]
    dataset = train.DreamBoothDataset(files, files[:1], 32, False, True, "bilinear", repeats=2, seed=3)
    assert len(dataset) == 4
    example = dataset[0]
    assert example["instance"].shape == example["class"].shape == (3, 32, 32)
    assert -1.0 <= example["instance"].min() and example["instance"].max() <= 1.0
    epoch_0 = [dataset[i]["instance"] for i in range(4)]
    assert all(torch.equal(epoch_0[i], dataset[i]["instance"]) for i in range(4))  # keyed by (seed, epoch, index)
    dataset.epoch = 1
    assert any(not torch.equal(epoch_0[i], dataset[i]["instance"]) for i in range(4))


def test_adapter_flags_map_to_lie_config():
    base = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--instance_prompt", "p"]
    config = train.adapter_config(train.parse_args(base))
    assert config.conv_rank_alpha == (4, 4.0) and config.attn_rank_alpha == (4, 4.0) and config.mode == "exp"
    assert config.balance == "rms"  # the default: one learning rate for the Lie convs and the LoRA attention
    assert train.adapter_config(train.parse_args(base + ["--lie_balance", "none"])).balance == "none"
    args = train.parse_args(base + ["--rank", "8", "--alpha", "16", "--conv_rank", "2", "--lie_mode", "taylor",
                                    "--attn_adapter", "lie", "--conv_targets", r"resnets\.\d+\.conv1, conv2",
                                    "--attn_targets", "to_q", "--lora_dropout", "0.1"])
    config = train.adapter_config(args)
    assert config.conv_rank_alpha == (2, 16.0) and config.attn_rank_alpha == (8, 16.0)
    assert config.conv_targets == (r"resnets\.\d+\.conv1", "conv2") and config.attn_targets == ("to_q",)
    assert (config.mode, config.attn_adapter, config.dropout) == ("taylor", "lie", 0.1)
    config = train.adapter_config(train.parse_args(base + ["--rank", "8", "--conv_rank", "2", "--conv_alpha", "1"]))
    assert config.conv_rank_alpha == (2, 1.0) and config.attn_rank_alpha == (8, 8.0)


# ------------------------------------------------------------------------------------------ real runs


def test_training_state_files_round_trip_exactly_without_pickle(tmp_path):
    """Optimizer-like nests (int keys, tuples, inf/nan, tensors of several dtypes) come back equal; only
    safetensors is written; what it cannot hold is refused."""
    import random

    from lie_diffusion.training import (TrainingError, load_state_file, random_states, save_state_file,
                                        set_random_states)

    param = torch.nn.Parameter(torch.randn(3, 2))
    optimizer = torch.optim.AdamW([param], lr=1e-3, betas=(0.9, 0.99))
    param.grad = torch.randn(3, 2)
    optimizer.step()
    tree = {"optimizer": optimizer.state_dict(), "ints": {0: (1, 2**40), 5: [None, True]}, "floats": [float("inf"),
            float("nan"), 0.1 + 0.2], "half": torch.arange(4, dtype=torch.float16), "bytes": torch.get_rng_state()}
    save_state_file(tmp_path / "state.safetensors", tree)
    assert {p.name for p in tmp_path.iterdir()} == {"state.safetensors"}
    back = load_state_file(tmp_path / "state.safetensors")
    assert back["ints"] == {0: (1, 2**40), 5: [None, True]} and back["floats"][2] == 0.1 + 0.2
    assert back["floats"][0] == float("inf") and back["floats"][1] != back["floats"][1]
    assert torch.equal(back["half"], tree["half"]) and back["half"].dtype == torch.float16
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)
    for name, value in tree["optimizer"]["state"][0].items():
        assert torch.equal(back["optimizer"]["state"][0][name], value)
    restored = torch.optim.AdamW([torch.nn.Parameter(param.detach().clone())], lr=1e-3)
    restored.load_state_dict(back["optimizer"])  # int keys: the state reaches the parameter
    assert restored.state_dict()["state"].keys() == {0} and restored.param_groups[0]["betas"] == (0.9, 0.99)
    with pytest.raises(TypeError, match="cannot hold values of type 'object'"):
        save_state_file(tmp_path / "bad.safetensors", {"x": object()})
    shared = torch.zeros(3)
    save_state_file(tmp_path / "shared.safetensors", [shared, shared, shared[1:]])  # one storage, three entries
    assert [t.tolist() for t in load_state_file(tmp_path / "shared.safetensors")] == [[0.0] * 3] * 2 + [[0.0] * 2]

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    save_state_file(tmp_path / "rng.safetensors", random_states())
    draws = (random.random(), np.random.rand(), torch.rand(()).item())
    set_random_states(load_state_file(tmp_path / "rng.safetensors"))
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == draws
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(TrainingError, match="not a lie-diffusion training state"):
        load_state_file(tmp_path / "plain.safetensors")


def test_resuming_a_checkpoint_it_cannot_read_names_the_reason(tmp_path):
    from accelerate import Accelerator

    from lie_diffusion.training import TrainingError, load_training_state, save_state_file

    accelerator = Accelerator(cpu=True)
    older = tmp_path / "checkpoint-2"
    older.mkdir()
    (older / "optimizer.bin").write_bytes(b"")  # what accelerate's save_state wrote for earlier versions
    with pytest.raises(TrainingError, match=r"checkpoint-2 has no training_state.safetensors\. It holds pickle files"):
        load_training_state(older, accelerator, {}, None, None)
    save_state_file(older / "training_state.safetensors", {})
    with pytest.raises(TrainingError, match="no random_states_0.safetensors: it was saved by a run with fewer processes"):
        load_training_state(older, accelerator, {}, None, None)


def test_accelerate_bf16_run_then_resume(tiny_pipeline_dir, toy_images, tmp_path):
    """bf16 + text encoder + gradient checkpointing + Min-SNR + prior preservation + validation, then resume."""
    output, class_dir = tmp_path / "out", tmp_path / "class"
    flags = ["--mixed_precision", "bf16", "--train_text_encoder", "--gradient_checkpointing", "--snr_gamma", "5",
             "--with_prior_preservation", "--class_data_dir", str(class_dir), "--class_prompt", "a photo of toy",
             "--num_class_images", "2", "--validation_prompt", "sks toy", "--num_validation_images", "2",
             "--validation_epochs", "1", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2"]
    # 2 images, batch 1: epochs are 2 steps; validation after step 2 and 4, each followed by training.
    run(_accelerate("bf16") + _common(tiny_pipeline_dir, toy_images, output, 3) + flags)
    assert checkpoints(output) == ["checkpoint-2", "checkpoint-3"]
    assert len(list(class_dir.glob("*.jpg"))) == 2

    # Resume under the step-checking driver: after validation and after resuming, the trained parameters
    # must still be fp32 (a half one is what makes fp16's GradScaler fail with "Attempting to unscale FP16
    # gradients").
    command = _accelerate("bf16")
    command[-1] = str(_driver(tmp_path))
    result = run(command + _common(tiny_pipeline_dir, toy_images, output, 6) + flags
                 + ["--resume_from_checkpoint", "latest"])
    assert f"Resuming from checkpoint {output / 'checkpoint-3'}" in result.stdout + result.stderr
    assert [dtypes for _, dtypes, _ in _steps(result)] == ["torch.float32"] * 3
    assert checkpoints(output) == ["checkpoint-5", "checkpoint-6"]
    assert not list(output.glob(".checkpoint-*"))

    weights = load_weights(output)
    assert {k.split(".")[0] for k in weights} == {"lie", "unet", "text_encoder"}
    assert any(k.startswith("lie.unet.") for k in weights)
    assert {t.dtype for t in weights.values()} == {torch.float32}
    for checkpoint in checkpoints(output):
        assert (output / checkpoint / WEIGHTS).is_file()
    card = (output / "README.md").read_text()
    assert f"base_model: {tiny_pipeline_dir}" in card and "load_lie_weights" in card and "merge_lie_weights" in card
    assert (output / "image_0.png").is_file() and (output / "image_1.png").is_file()
    grids = sorted(p.name for p in (output / "validation").glob("*.png"))
    assert grids == ["test-step-000003.png", "test-step-000006.png",  # the end of each run
                     "validation-step-000002.png", "validation-step-000004.png"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((output / "logs").rglob("events.out.tfevents.*")).parent)).Reload()
    assert {"loss", "lr"} <= set(events.Tags()["scalars"]) and "validation" in events.Tags()["images"]

    # The trained adapter loads into a fresh pipeline and changes both models.
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(str(tiny_pipeline_dir), safety_checker=None)
    ids = pipeline.tokenizer("sks toy", padding="max_length", return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))

    def outputs():
        with torch.no_grad():
            text = pipeline.text_encoder(ids)[0]
            return text, pipeline.unet(latents, 10, text).sample

    before = outputs()
    parsed = load_lie_weights(pipeline, output)
    after = outputs()
    assert (before[0] - after[0]).abs().max() > 1e-6 and (before[1] - after[1]).abs().max() > 1e-6
    # the default balancing rule: each Lie conv's alpha is rank / RMS of its kernel as it trained (bf16 here)
    assert parsed.info["balance"] == "rms"
    for entry in parsed.section("lie", "unet"):
        kernel = pipeline.unet.get_submodule(entry.module).get_base_layer().weight.to(torch.bfloat16)
        assert entry.alpha == pytest.approx(4 / kernel.double().pow(2).mean().sqrt().item(), rel=1e-9), entry.module


def test_resume_matches_straight_run(tiny_pipeline_dir, messy_images, tmp_path):
    """N steps straight == N/2 + resume N/2, mid-epoch, with accumulation, dropout, random crops and flips."""
    flags = ["--gradient_accumulation_steps", "2", "--random_flip", "--adapter_dropout", "0.1",
             "--lr_scheduler", "cosine", "--lr_warmup_steps", "1", "--checkpointing_steps", "2",
             "--attn_adapter", "lie", "--rank", "2", "--conv_rank", "3", "--report_to", "none"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = run(_python() + _common(tiny_pipeline_dir, messy_images, straight, 4) + flags)
    for name in ("broken.jpg", "notes.txt"):  # skipped with a warning that names them
        assert f"Skipping {messy_images / name}" in result.stderr
    # 5 images, accumulation 2: 3 steps per epoch, so checkpoint-2 is mid-epoch and step 4 is in epoch 2.
    assert checkpoints(straight) == ["checkpoint-2", "checkpoint-4"]

    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    run(_python() + _common(tiny_pipeline_dir, messy_images, resumed, 4) + flags
        + ["--resume_from_checkpoint", str(resumed / "checkpoint-2")])

    a, b = load_weights(straight), load_weights(resumed)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert max((a[k] - load_weights(straight / "checkpoint-2")[k]).abs().max().item() for k in a) > 1e-4
    ranks = {(t.ndim, t.shape[0]) for k, t in a.items() if k.endswith("lora_A.weight")}
    assert ranks == {(4, 3), (2, 2)}  # conv Lie adapters rank 3, attention (Lie here) rank 2


def test_torchrun_two_process_ddp(tiny_pipeline_dir, toy_images, tmp_path):
    output, class_dir = tmp_path / "out", tmp_path / "class"
    flags = ["--train_text_encoder", "--with_prior_preservation", "--class_data_dir", str(class_dir),
             "--class_prompt", "a photo of toy", "--num_class_images", "3", "--checkpointing_steps", "2"]
    command = _torchrun(2)
    command[-1] = str(_driver(tmp_path))
    result = run(command + _common(tiny_pipeline_dir, toy_images, output, 2) + flags, env=_env(ACCELERATE_USE_CPU="1"))
    assert "Num processes: 2" in result.stdout + result.stderr
    # The processes start from rank 0's adapters and stay in step.
    steps = _steps(result)
    per_rank = {rank: [total for r, _, total in steps if r == rank] for rank in ("0", "1")}
    assert len(per_rank["0"]) == 2 and per_rank["0"] == per_rank["1"]
    assert len(list(class_dir.glob("*.jpg"))) == 3  # sampled by both processes, written once
    assert checkpoints(output) == ["checkpoint-2"]
    saved = {p.name for p in (output / "checkpoint-2").iterdir()}
    assert saved == {WEIGHTS, "training_state.safetensors", "random_states_0.safetensors", "random_states_1.safetensors"}
    assert {k.split(".")[0] for k in load_weights(output)} == {"lie", "unet", "text_encoder"}
    assert len(list((output / "logs").glob("*/events.out.tfevents.*"))) == 1  # one writer: the main process


def test_nan_loss_stops_and_keeps_last_checkpoint(tiny_pipeline_dir, toy_images, tmp_path):
    output = tmp_path / "out"
    # A huge step makes the Lie multipliers overflow: the loss of step 2 is NaN.
    result = run(_python() + _common(tiny_pipeline_dir, toy_images, output, 4)
                 + ["--learning_rate", "1e30", "--checkpointing_steps", "1", "--report_to", "none"], ok=False)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: loss is nan at step 2") and str(output / "checkpoint-1") in last
    assert "Traceback" not in result.stderr
    assert checkpoints(output) == ["checkpoint-1"] and not list(output.glob(".checkpoint-*"))
    read_lie_file(output / "checkpoint-1")  # complete and finite
    assert not (output / WEIGHTS).exists()


def test_bad_flags_are_caught_before_loading(tmp_path):
    base = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--instance_prompt", "p",
            "--output_dir", str(tmp_path)]
    cases = [
        (["--with_prior_preservation", "--class_prompt", "a dog"], "--with_prior_preservation needs --class_data_dir"),
        (["--train_text_encoder", "--attn_adapter", "none"], "--train_text_encoder needs text encoder adapters"),
        (["--resume_from_checkpoint", "checkpoint-7"], "--resume_from_checkpoint checkpoint-7: no checkpoint"),
    ]
    if importlib.util.find_spec("bitsandbytes") is None:
        cases.append((["--use_8bit_adam"], "--use_8bit_adam needs bitsandbytes: pip install bitsandbytes"))
    for flags, message in cases:
        with pytest.raises(train.TrainingError, match=re.escape(message)):
            train.parse_args(base + flags)


def test_bad_inputs_fail_fast_with_one_line(tmp_path, toy_images):
    """Real runs: one `error:` line last, exit status 1, no traceback, before any model is loaded."""
    unreadable, missing = tmp_path / "unreadable", tmp_path / "missing"
    unreadable.mkdir()
    (unreadable / "broken.png").write_bytes(b"nope")
    (unreadable / ".DS_Store").write_bytes(b"hidden files are ignored")
    # The model path does not exist: these errors must come before any model is loaded.
    base = ["--pretrained_model_name_or_path", str(tmp_path / "no-model"), "--instance_prompt", "a photo of sks toy",
            "--output_dir", str(tmp_path / "out")]
    cases = [
        # `accelerate launch -q`: without -q, accelerate adds its own traceback when the script fails.
        (_accelerate()[:3] + ["-q"] + _accelerate()[3:] + base + ["--instance_data_dir", str(missing)],
         f"error: Instance directory {missing} does not exist."),
        (_python() + base + ["--instance_data_dir", str(unreadable)],
         f"error: Instance directory {unreadable} holds no readable images."),
    ]
    if not torch.cuda.is_available():
        cases.append((_python() + base + ["--instance_data_dir", str(toy_images),
                                          "--enable_xformers_memory_efficient_attention"],
                      "error: --enable_xformers_memory_efficient_attention needs xformers (pip install xformers) "
                      "and a CUDA GPU"))
    processes = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO)
                 for c, _ in cases]
    stderrs = []
    for process, (command, message) in zip(processes, cases):
        try:
            _, stderr = process.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            pytest.fail(f"timed out: {' '.join(command)}")
        lines = stderr.strip().splitlines()
        assert process.returncode == 1, f"{' '.join(command)}: exit status {process.returncode}\n{stderr[-3000:]}"
        assert lines and lines[-1].startswith(message), f"{' '.join(command)}:\n{stderr[-3000:]}"
        assert "Traceback" not in stderr, stderr[-3000:]
        stderrs.append(stderr)
    assert f"Skipping {unreadable / 'broken.png'}" in stderrs[1] and ".DS_Store" not in stderrs[1]
