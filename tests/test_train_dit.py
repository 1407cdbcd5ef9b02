"""The Flux.1 and SD3/SD3.5 DreamBooth scripts on tiny pipelines: flags as in diffusers, the flow-matching math
against its formulas, in-process runs (captions, prior preservation, CLIP training, exact resume, the saved file
loaded back), and two-process runs under DDP and under Accelerate's FSDP2 on CPU."""

from __future__ import annotations

import importlib.util
import math
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from test_train import _env, checkpoints, load_weights, make_instance_images, run

from lie_diffusion import load_lie_weights, read_lie_file
from lie_diffusion.tiny import build_tiny_pipeline
from lie_diffusion.training import TrainingError, flow, flux

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {family: REPO / "train_scripts" / f"train_dreambooth_lie_{family}.py" for family in ("flux", "sd3")}
FSDP_DRIVER = Path(__file__).resolve().parent / "fsdp_on_cpu.py"


def _module(family):
    spec = importlib.util.spec_from_file_location(f"train_dreambooth_lie_{family}", SCRIPTS[family])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_flux, train_sd3 = _module("flux"), _module("sd3")


@pytest.fixture(scope="module")
def tiny_flux_dir(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-flux"), kind="flux")


@pytest.fixture(scope="module")
def tiny_sd35_dir(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd35"), kind="sd3.5")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three instance images, the first with a sidecar caption."""
    directory = tmp_path_factory.mktemp("dit-images")
    make_instance_images(directory, count=3, size=40)
    first = sorted(p for p in directory.iterdir() if p.suffix != ".txt")[0]
    first.with_suffix(".txt").write_text("a sks toy in red\nsecond lines are not read")
    return directory


def _flags(model, images, output, steps, *extra):
    return ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(images),
            "--instance_prompt", "a photo of sks toy", "--output_dir", str(output), "--resolution", "32",
            "--train_batch_size", "1", "--max_train_steps", str(steps), "--lr_warmup_steps", "0", "--seed", "0",
            "--num_inference_steps", "2", "--report_to", "none", "--learning_rate", "1e-3", *extra]


def _max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_flags_follow_diffusers(tmp_path):
    base = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--instance_prompt", "p"]
    f = train_flux.parse_args(base)
    assert (f.weighting_scheme, f.max_sequence_length, f.guidance_scale, f.resolution) == ("none", 512, 3.5, 512)
    assert (f.learning_rate, f.text_encoder_lr, f.adam_weight_decay) == (1e-4, 5e-6, 1e-4)
    assert (f.target_preset, f.attn_adapter, f.num_inference_steps) == ("flux", None, 28)
    s = train_sd3.parse_args(base + ["--lora_alpha", "8", "--target_preset", "sd3-all"])
    assert (s.weighting_scheme, s.max_sequence_length, s.precondition_outputs, s.alpha) == ("logit_normal", 77, 1, 8.0)
    assert s.target_preset == "sd3-all"
    with pytest.raises(SystemExit):  # a preset of the other family is no choice
        train_flux.parse_args(base + ["--target_preset", "sd3"])
    with pytest.raises(TrainingError, match="flow matching weights by --weighting_scheme"):
        train_sd3.parse_args(base + ["--snr_gamma", "5"])
    config = train_flux.training.adapter_config(train_flux.parse_args(base + ["--target_preset", "flux-all-linear"]))
    assert (config.preset, config.attn_adapter, config.attn_targets) == ("flux-all-linear", None, None)


def test_flow_matching_against_its_formulas():
    """x_t = (1 - σ) x + σ ε on the shifted schedule; velocity target ε - x; SD3's preconditioning turns the
    true velocity into x; the loss weightings of the SD3 paper."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    torch.manual_seed(0)
    latents = torch.randn(64, 4, 2, 2)
    for scheme in ("logit_normal", "mode", "none"):
        args = SimpleNamespace(weighting_scheme=scheme, logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
        noisy, noise, timesteps, sigmas = flow.noisy_latents(args, scheduler, latents)
        sigma = sigmas.flatten()
        assert sigmas.shape == (64, 1, 1, 1) and ((0 < sigma) & (sigma <= 1)).all()
        assert torch.allclose(timesteps, sigma * 1000)  # flow-matching timesteps are σ in thousandths
        # the shifted schedule: σ = 3s / (1 + 2s) for an unshifted s on the grid 1, 1 - 1/1000, ...
        unshifted = sigma / (3 - 2 * sigma)
        assert torch.allclose(unshifted * 1000, (unshifted * 1000).round(), atol=1e-2)
        assert torch.allclose(noisy, (1 - sigmas) * latents + sigmas * noise)
        velocity = noise - latents  # d x_t / d σ
        assert torch.allclose(velocity * (-sigmas) + noisy, latents, atol=1e-6)  # --precondition_outputs 1
    args.weighting_scheme = "sigma_sqrt"
    assert torch.allclose(flow.loss_weighting(args, sigmas), sigmas ** -2)
    args.weighting_scheme = "cosmap"
    assert torch.allclose(flow.loss_weighting(args, sigmas), 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2)))
    args.weighting_scheme = "logit_normal"  # a density over timesteps, no weighting
    assert torch.equal(flow.loss_weighting(args, sigmas), torch.ones_like(sigmas))


def test_flux_packing_against_its_layout():
    latents = torch.randn(2, 4, 6, 8)
    packed, ids = flux.pack(latents)
    assert packed.shape == (2, 3 * 4, 4 * 4) and ids.shape == (12, 3)
    for row in range(3):
        for column in range(4):
            token = row * 4 + column
            assert ids[token].tolist() == [0, row, column]
            for channel in range(4):
                for dy in range(2):
                    for dx in range(2):
                        assert packed[1, token, channel * 4 + dy * 2 + dx] == latents[1, channel, 2 * row + dy,
                                                                                    2 * column + dx]
    assert torch.equal(flux.unpack(packed, latents), latents)


def _loaded_matches_file(pipeline_dir, output):
    """Load the file into a fresh pipeline: every adapted module holds the file's factors."""
    pipeline = DiffusionPipeline.from_pretrained(pipeline_dir)
    load_lie_weights(pipeline, output)
    lie_file = read_lie_file(output)
    for entry in lie_file.modules:
        layer = getattr(pipeline, entry.component).get_submodule(entry.module)
        assert torch.equal(layer.lora_A["default"].weight, entry.A) and torch.equal(layer.lora_B["default"].weight, entry.B)
    return lie_file


def test_flux_captions_prior_text_encoder_resume_and_load(tiny_flux_dir, images, tmp_path, monkeypatch):
    seen = []
    encode = flux.PromptEncoder.__call__

    def record(self, text_encoders, prompts, dtype):
        seen.append(list(prompts))
        return encode(self, text_encoders, prompts, dtype)

    monkeypatch.setattr(flux.PromptEncoder, "__call__", record)
    class_dir = tmp_path / "class"
    extra = ["--train_text_encoder", "--with_prior_preservation", "--class_data_dir", str(class_dir),
             "--class_prompt", "a toy", "--num_class_images", "2", "--caption_extension", "txt",
             "--checkpointing_steps", "2", "--guidance_scale", "2.0", "--weighting_scheme", "logit_normal"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_flux.main(train_flux.parse_args(_flags(tiny_flux_dir, images, straight, 4, *extra,
                                                 "--validation_prompt", "a sks toy", "--num_validation_images", "1")))
    # Each batch: the instance image with its caption (or the instance prompt), then a class image.
    assert len(seen) == 4 and all(len(batch) == 2 and batch[1] == "a toy" for batch in seen)
    assert {batch[0] for batch in seen} <= {"a sks toy in red", "a photo of sks toy"}
    assert "a sks toy in red" in {batch[0] for batch in seen}
    assert len(list(class_dir.glob("*.jpg"))) == 2  # generated by the base FluxPipeline
    assert checkpoints(straight) == ["checkpoint-2", "checkpoint-4"]
    assert (straight / "image_0.png").is_file()
    card = (straight / "README.md").read_text()
    assert "FluxPipeline.from_pretrained" in card and "torch.bfloat16" in card and "target preset: flux" in card

    lie_file = _loaded_matches_file(tiny_flux_dir, straight)
    assert {entry.component for entry in lie_file.modules} == {"transformer", "text_encoder"}  # never T5
    assert any(".ff.net." in entry.module for entry in lie_file.modules)  # diffusers' targets: FF layers too

    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    train_flux.main(train_flux.parse_args(_flags(tiny_flux_dir, images, resumed, 4, *extra,
                                                 "--resume_from_checkpoint", "latest")))
    a, b = load_weights(straight), load_weights(resumed)
    assert _max_difference(a, b) == 0.0
    assert _max_difference(a, load_weights(straight / "checkpoint-2")) > 1e-4  # steps 3-4 trained


def test_sd3_trains_resumes_exactly_recomputes_and_loads(tiny_sd35_dir, images, tmp_path):
    extra = ["--train_text_encoder", "--checkpointing_steps", "2", "--weighting_scheme", "mode",
             "--target_preset", "sd3-all-linear", "--caption_extension", "txt"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_sd3.main(train_sd3.parse_args(_flags(tiny_sd35_dir, images, straight, 4, *extra)))
    lie_file = _loaded_matches_file(tiny_sd35_dir, straight)
    assert {entry.component for entry in lie_file.modules} == {"transformer", "text_encoder", "text_encoder_2"}
    assert any(".attn2." in entry.module for entry in lie_file.modules)  # SD3.5's second attention

    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    train_sd3.main(train_sd3.parse_args(_flags(tiny_sd35_dir, images, resumed, 4, *extra,
                                               "--resume_from_checkpoint", "checkpoint-2")))
    assert _max_difference(load_weights(straight), load_weights(resumed)) == 0.0

    # Gradient checkpointing recomputes the same steps.
    recomputed = tmp_path / "recomputed"
    train_sd3.main(train_sd3.parse_args(_flags(tiny_sd35_dir, images, recomputed, 2, *extra, "--gradient_checkpointing")))
    assert _max_difference(load_weights(straight / "checkpoint-2"), load_weights(recomputed)) == 0.0

    # The velocity target (no preconditioning) trains too, to other weights.
    other = tmp_path / "velocity"
    train_sd3.main(train_sd3.parse_args(_flags(tiny_sd35_dir, images, other, 2, *extra, "--precondition_outputs", "0")))
    assert _max_difference(load_weights(straight / "checkpoint-2"), load_weights(other)) > 1e-6


def test_flux_fsdp_matches_ddp_and_resumes(tiny_flux_dir, images, tmp_path):
    """Two CPU processes: DDP, and Accelerate's FSDP2 sharding each Flux block (frozen base and adapters), give
    the same adapters; an FSDP checkpoint (one optimizer shard per process) resumes exactly."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    fsdp = _env(ACCELERATE_USE_CPU="1", ACCELERATE_USE_FSDP="true", FSDP_VERSION="2",
                FSDP_AUTO_WRAP_POLICY="TRANSFORMER_BASED_WRAP",
                FSDP_TRANSFORMER_CLS_TO_WRAP="FluxTransformerBlock,FluxSingleTransformerBlock")
    extra = ["--checkpointing_steps", "2"]  # (Accelerate's FSDP2 prepares one model: no --train_text_encoder)
    ddp_out, fsdp_out, resumed = tmp_path / "ddp", tmp_path / "fsdp", tmp_path / "resumed"
    run(torchrun + [str(SCRIPTS["flux"])] + _flags(tiny_flux_dir, images, ddp_out, 4, *extra),
        env=_env(ACCELERATE_USE_CPU="1"))
    result = run(torchrun + [str(FSDP_DRIVER), str(SCRIPTS["flux"])] + _flags(tiny_flux_dir, images, fsdp_out, 4, *extra),
                 env=fsdp)
    assert "Distributed environment: DistributedType.FSDP" in result.stderr
    assert {p.name for p in (fsdp_out / "checkpoint-2").iterdir()} >= {"optimizer_0.safetensors",
                                                                       "optimizer_1.safetensors"}
    fsdp_weights = load_weights(fsdp_out)
    assert _max_difference(fsdp_weights, load_weights(ddp_out)) <= 1e-6
    assert _max_difference(fsdp_weights, load_weights(fsdp_out / "checkpoint-2")) > 1e-4

    resumed.mkdir()
    shutil.copytree(fsdp_out / "checkpoint-2", resumed / "checkpoint-2")
    run(torchrun + [str(FSDP_DRIVER), str(SCRIPTS["flux"])]
        + _flags(tiny_flux_dir, images, resumed, 4, *extra, "--resume_from_checkpoint", "latest"), env=fsdp)
    assert _max_difference(fsdp_weights, load_weights(resumed)) == 0.0
