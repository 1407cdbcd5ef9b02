"""The emoji data set, the classifier, the pretrained tiny pipeline and their scripts (no font needed)."""

import importlib.util
import json
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

from lie_diffusion.emoji.data import (HELD_OUT, IMAGE_SIZE, MARGIN, PALETTE, background_color, caption, compose,
                                      load_renders, random_example, save_renders)

REPO = Path(__file__).resolve().parents[1]


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "train_scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def renders():
    return load_renders()


def test_shipped_renders_are_named_colour_emoji(renders):
    count = len(renders.names)
    assert 1300 <= count <= 1500 and renders.rgba.shape == (count, 32, 32, 4) and renders.rgba.dtype == torch.uint8
    assert len(set(renders.names)) == count
    for codepoint, name in zip(renders.codepoints, renders.names):  # names are unicodedata's, lower-cased
        assert unicodedata.name(chr(codepoint)).lower() == name
    alpha = renders.rgba[..., 3].float()
    assert (alpha.amax(dim=(1, 2)) == 255).all(), "every render has opaque pixels"
    assert (alpha[:, 0].mean() < alpha[:, 16].mean())  # cropped and centred: edges emptier than the middle
    assert sorted(renders.held_out) == sorted(HELD_OUT) and len(HELD_OUT) == 24
    assert set(renders.held_out_indices).isdisjoint(renders.pretrain_indices)
    assert len(renders.pretrain_indices) == count - 24


def test_compose_blends_alpha_and_keeps_a_pure_border():
    render = np.zeros((4, 4, 4), np.uint8)
    render[..., 0] = 200
    render[..., 3] = 255
    render[0, 0, 3] = 0       # transparent: background shows
    render[1, 1, 3] = 51      # 20% opaque
    image = compose(render, (0, 0, 100), size=4, offset=(3, 5), image_size=12)
    assert image.shape == (12, 12, 3) and image.dtype == np.uint8
    assert tuple(image[5, 3]) == (0, 0, 100)
    assert tuple(image[6, 4]) == (40, 0, 80)  # 0.2 * (200, 0, 0) + 0.8 * (0, 0, 100)
    assert tuple(image[7, 5]) == (200, 0, 0)
    assert (image[:5] == (0, 0, 100)).all()
    with pytest.raises(ValueError, match="margin"):
        compose(render, (0, 0, 0), size=10, image_size=12)


def test_random_examples_are_captioned_by_their_border_colour(renders):
    rng = np.random.default_rng(0)
    for n, color in enumerate(PALETTE):
        image, chosen = random_example(renders, n * 97, rng, color)
        assert chosen == color and image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
        assert (image[:MARGIN] == PALETTE[color]).all() and (image[:, -MARGIN:] == PALETTE[color]).all()
        assert background_color(image) == color == background_color(image / 255.0)
    assert caption("cat face", "blue") == "a cat face emoji on a blue background"
    assert caption(None) == "an emoji"


def test_renders_file_round_trip_and_errors(tmp_path):
    rgba = torch.randint(0, 256, (2, 8, 8, 4), dtype=torch.uint8)
    path = save_renders(tmp_path / "r.safetensors", rgba, [0x1F431, 0x1F680], ["cat face", "rocket"], {"a": 1})
    back = load_renders(path)
    assert torch.equal(back.rgba, rgba) and back.names == ["cat face", "rocket"] and back.info == {"a": 1}
    assert back.codepoints == [0x1F431, 0x1F680]
    with pytest.raises(KeyError, match="no emoji named 'dog'"):
        back.index("dog")
    with pytest.raises(FileNotFoundError, match="lie_diffusion.emoji.render"):
        load_renders(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="uint8"):
        save_renders(tmp_path / "bad.safetensors", rgba.float(), [1, 2], ["a", "b"])


def test_shipped_classifier_recognises_renders(renders):
    from lie_diffusion.emoji.classifier import load_classifier, reference_embedding, subject_similarity

    classifier = load_classifier()
    assert classifier.names == renders.names
    rng = np.random.default_rng(123)
    indices = rng.choice(len(renders.names), size=96, replace=False)
    images = np.stack([random_example(renders, int(i), rng)[0] for i in indices])
    predicted = classifier.predict(images)
    accuracy = np.mean([p == renders.names[i] for p, i in zip(predicted, indices)])
    assert accuracy >= 0.7, accuracy
    embeddings = classifier.embed(images)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(len(images)), atol=1e-5)
    rocket = reference_embedding(classifier, renders, "rocket")
    own = np.stack([random_example(renders, renders.index("rocket"), rng)[0] for _ in range(4)])
    assert subject_similarity(classifier, own, rocket).mean() > subject_similarity(classifier, images, rocket).mean()


def test_shipped_pipeline_has_sd_layout_and_generates():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from lie_diffusion import LieConfig
    from lie_diffusion.emoji.pipeline import pretrained_emoji_path, pretrained_emoji_pipeline, trained_classes
    from lie_diffusion.inject import find_targets

    path = pretrained_emoji_path()
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 30e6, size
    assert not list(path.rglob("*.bin")) and not list(path.rglob("*.pt")), "safetensors only"
    pipeline = pretrained_emoji_pipeline()
    assert isinstance(pipeline.vae, AutoencoderKL) and isinstance(pipeline.text_encoder, CLIPTextModel)
    assert isinstance(pipeline.unet, UNet2DConditionModel)
    convs, attns = find_targets(pipeline.unet, LieConfig())
    for pattern in ("resnets.0.conv1", "resnets.0.conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv"):
        assert any(name.endswith(pattern) for name in convs), pattern
    for pattern in ("attn1.to_q", "attn2.to_k", "attn2.to_out.0"):
        assert any(name.endswith(pattern) for name in attns), pattern
    classes = trained_classes()
    assert classes and set(classes).isdisjoint(HELD_OUT)
    images = pipeline(["a sks emoji", caption(classes[0], "red")], num_inference_steps=2, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()


def test_pretraining_script_short_run_is_reproducible(tmp_path):
    from safetensors.torch import load_file

    from lie_diffusion.emoji.pipeline import pretrained_emoji_pipeline, trained_classes

    script = load_script("pretrain_tiny_emoji_sd")
    args = ["--num_classes", "6", "--vae_steps", "2", "--train_steps", "3", "--train_batch_size", "4",
            "--vae_batch_size", "4", "--save_every", "0", "--log_every", "1", "--seed", "3"]
    script.main(["--output_dir", str(tmp_path / "a"), *args])
    script.main(["--output_dir", str(tmp_path / "b"), *args])
    unet = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "a" / unet), load_file(tmp_path / "b" / unet)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    classes = trained_classes(tmp_path / "a")
    assert len(classes) == 6 and set(classes).isdisjoint(HELD_OUT)
    record = json.loads((tmp_path / "a" / "pretrain_args.json").read_text())
    assert record["train_steps"] == 3 and record["saved_at"] == "step 3 (final)"
    pipeline = pretrained_emoji_pipeline(tmp_path / "a")
    assert pipeline.vae.config.scaling_factor != 0.18215  # measured from the trained VAE's latents
    assert pipeline.tokenizer.model_max_length == 64


def test_classifier_script_short_run(tmp_path):
    from lie_diffusion.emoji.classifier import load_classifier

    script = load_script("train_emoji_classifier")
    script.main(["--output", str(tmp_path / "c.safetensors"), "--steps", "2", "--batch_size", "8", "--width", "8"])
    classifier = load_classifier(tmp_path / "c.safetensors")
    assert classifier.config == {"width": 8, "embed_dim": 256} and classifier.info["steps"] == 2
    with pytest.raises(FileNotFoundError, match="train_emoji_classifier"):
        load_classifier(tmp_path / "missing.safetensors")


def test_metrics_script_smoke(tmp_path):
    command = [sys.executable, str(REPO / "benchmarks" / "emoji_metrics.py"), "--limit", "4", "--per_class", "1",
               "--steps", "2", "--out", str(tmp_path), "--page", "none"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "emoji_metrics.json").read_text())["results"]
    assert results["prompts"] == 4 and 0 <= results["top1"] <= results["top5"] <= 1
    assert 0 <= results["background_accuracy"] <= 1 and (tmp_path / "emoji_samples.png").is_file()
    assert re.search(r'"top1": [0-9.]+', result.stdout)


@pytest.fixture(scope="module")
def flux_runs(tiny_emoji_flux_dir, pretrain_tiny_flux):
    """Two short Flux pretraining runs with the same seed: the session's tiny Flux pipeline "a" and "b" beside it."""
    root = tiny_emoji_flux_dir.parent
    pretrain_tiny_flux(root / "b")
    return root


def test_flux_pretraining_short_run_is_reproducible(flux_runs):
    from safetensors.torch import load_file

    for part in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "text_encoder_2/model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        a, b = load_file(flux_runs / "a" / part), load_file(flux_runs / "b" / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    record = json.loads((flux_runs / "a" / "pretrain_args.json").read_text())
    assert record["train_steps"] == 3 and record["saved_at"] == "step 3 (final)"
    assert record["weighting_scheme"] == "logit_normal"
    log = (flux_runs / "a.log").read_text()
    assert "saved EMA pipeline at step 2" in log and "step 3 (final)" in log
    assert not list(flux_runs.glob("*.saving")) and not list(flux_runs.glob("*.old"))


def test_flux_pretraining_saves_a_flux_pipeline_that_generates(flux_runs):
    from diffusers import AutoencoderKL, FluxPipeline

    from lie_diffusion import LieConfig
    from lie_diffusion.emoji.pipeline import (pretrained_emoji_path, pretrained_emoji_pipeline, sampling_kwargs,
                                              trained_classes)
    from lie_diffusion.inject import find_targets

    path = flux_runs / "a"
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 30e6, size
    assert not list(path.rglob("*.bin")) and not list(path.rglob("*.pt")), "safetensors only"
    pipeline = FluxPipeline.from_pretrained(str(path))
    transformer = pipeline.transformer
    assert len(transformer.transformer_blocks) == 2 and len(transformer.single_transformer_blocks) == 2
    assert transformer.config.in_channels == 4 * pipeline.vae.config.latent_channels  # 2x2 packing
    # the shipped SD emoji VAE, unchanged, with Flux's latent normalisation measured on the emoji data
    shipped = AutoencoderKL.from_pretrained(str(pretrained_emoji_path("sd") / "vae")).state_dict()
    assert all(torch.equal(shipped[k], v) for k, v in pipeline.vae.state_dict().items())
    assert pipeline.vae.config.shift_factor is not None and pipeline.vae.config.scaling_factor > 0
    for preset in ("flux-attn", "flux", "flux-all-linear", "flux-all"):  # every Flux preset finds both kinds of block
        _, linears = find_targets(transformer, LieConfig(preset=preset))
        assert any(n.startswith("transformer_blocks.1.") for n in linears), preset
        assert any(n.startswith("single_transformer_blocks.1.") for n in linears), preset
    classes = trained_classes(path)
    assert len(classes) == 4 and set(classes).isdisjoint(HELD_OUT)
    loaded = pretrained_emoji_pipeline(path)
    assert isinstance(loaded, FluxPipeline)
    prompts = ["a sks emoji", caption(classes[0], "red")]
    images = loaded(prompts, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0),
                    **sampling_kwargs(loaded, 4.0, len(prompts))).images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()


def test_flux_training_sigmas_follow_the_pipeline_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from lie_diffusion.emoji.flux import SCHEDULER_CONFIG, training_shift

    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    # FLUX.1's mu, interpolated linearly in the token count from (256, 0.5) to (4096, 1.15), here 64 tokens
    mu = 0.5 + (64 - 256) * (1.15 - 0.5) / (4096 - 256)
    assert training_shift(scheduler, 64) == pytest.approx(np.exp(mu))


def test_missing_pretrained_pipeline_says_how_to_make_it(tmp_path, monkeypatch):
    from lie_diffusion.emoji import pipeline as emoji_pipeline

    monkeypatch.setattr(emoji_pipeline, "PRETRAINED_ROOT", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"train_scripts/pretrain_tiny_emoji_flux\.py --output_dir "
                                                r"lie_diffusion/emoji/pretrained/tiny-emoji-flux"):
        emoji_pipeline.pretrained_emoji_pipeline(kind="flux")
    with pytest.raises(FileNotFoundError, match="pretrain_tiny_emoji_sd.py"):
        emoji_pipeline.trained_classes()
    with pytest.raises(ValueError, match="choose from"):
        emoji_pipeline.pretrained_emoji_path("unet")


def test_failed_pipeline_save_leaves_the_previous_folder(tmp_path):
    from lie_diffusion.emoji.pipeline import write_pipeline_folder

    class Broken:
        def save_pretrained(self, directory):
            (Path(directory) / "half.json").write_text("{")
            raise OSError("disk full")

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    with pytest.raises(OSError, match="disk full"):
        write_pipeline_folder(folder, Broken(), ["cat face"])
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert [p.name for p in folder.iterdir()] == ["model_index.json"]


def test_metrics_script_measures_a_flux_folder(flux_runs, tmp_path):
    command = [sys.executable, str(REPO / "benchmarks" / "emoji_metrics.py"), "--pipeline", str(flux_runs / "a"),
               "--limit", "2", "--per_class", "1", "--steps", "2", "--out", str(tmp_path), "--page", "none"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "emoji_metrics_flux.json").read_text())["results"]
    assert results["pipeline_class"] == "FluxPipeline" and results["prompts"] == 2
    assert results["sampler"] == "FlowMatchEulerDiscreteScheduler" and 0 <= results["background_accuracy"] <= 1
    assert (tmp_path / "emoji_samples_flux.png").is_file()


def test_flux_pretraining_refuses_a_vae_whose_latents_do_not_pack(tmp_path, pretrain_tiny_flux):
    from diffusers import AutoencoderKL

    AutoencoderKL(latent_channels=8, block_out_channels=(8, 8), norm_num_groups=4,
                  down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2).save_pretrained(str(tmp_path / "vae"))
    with pytest.raises(ValueError, match=r"--vae .*vae: 8 latent channels.*2x2 patches of 4"):
        pretrain_tiny_flux(tmp_path / "out", "--vae", str(tmp_path / "vae"))
    assert not (tmp_path / "out").exists()
