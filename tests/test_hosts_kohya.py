"""Opt-in: lie_diffusion.kohya inside a real kohya-ss/sd-scripts checkout.

Skipped unless LIE_SD_SCRIPTS_DIR names an sd-scripts checkout; LIE_SD_SCRIPTS_PYTHON names the Python of an
environment with its requirements and lie-diffusion (default: this one). sd-scripts pins other diffusers and
transformers versions than lie-diffusion, so its code runs in its own environment, in subprocesses:

* train_network.py itself, on a full-size SD 1.5 model with random weights (a diffusers folder written here), a
  local tokenizer (--tokenizer_cache_dir) and two 64-pixel images: a few real training steps with
  `--network_module lie_diffusion.kohya`, save_weights, then a resumed run (--network_weights --dim_from_weights);
* tests/kohya_sd_scripts.py: sd-scripts' loader and UNet classes, the network from the saved file as gen_img.py
  builds it, every adapted layer against the formula at multipliers 1, 0.5, -1, and the UNet's outputs, which
  this side compares with diffusers' UNet + load_lie_weights on the same weights; and the same layer check on
  sd-scripts' full-size SDXL UNet (10 GB in float32: its files are checked against diffusers' SDXL layout on the
  meta device instead of a second UNet);
* sdxl_train_network.py itself, on SDXL's architecture at full size with random weights, the folder written in
  bfloat16 and loaded and trained in it (--mixed_precision bf16 --full_bf16): 1 step, save, 1 resumed step.
"""

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lie_diffusion import load_lie_weights, read_lie_file
from lie_diffusion.kohya import KOHYA_FINGERPRINTS

SD_SCRIPTS = os.environ.get("LIE_SD_SCRIPTS_DIR")
PYTHON = os.environ.get("LIE_SD_SCRIPTS_PYTHON", sys.executable)
pytestmark = pytest.mark.skipif(not SD_SCRIPTS, reason="set LIE_SD_SCRIPTS_DIR to an sd-scripts checkout to run these")
HERE = Path(__file__).parent
FP32_RTOL = 1e-4  # two implementations of SD (kohya's attention vs diffusers' SDPA) in float32
LAYER_RTOL = 1e-5  # one layer vs the float64 formula
TOKENIZERS = ("openai_clip-vit-large-patch14", "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k")  # --tokenizer_cache_dir
SDXL_UNET = {**{k: tuple(v) if isinstance(v, list) else v for k, v in KOHYA_FINGERPRINTS["sdxl"].items()},
             "attention_head_dim": (5, 10, 20), "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": 2816, "sample_size": 128}  # SDXL base's UNet config

# sd-scripts imports torchvision for three image transforms; its PyPI wheels do not load beside a CPU-only torch
# build, so the subprocesses find this stand-in first (pass LIE_SD_SCRIPTS_TORCHVISION=1 to use the real one).
TORCHVISION_STAND_IN = '''
import numpy as np
import torch


class Compose:
    def __init__(self, steps):
        self.steps = steps

    def __call__(self, x):
        for step in self.steps:
            x = step(x)
        return x


class ToTensor:
    def __call__(self, image):
        array = np.asarray(image, dtype=np.float32) / 255.0
        return torch.from_numpy(array.reshape(*array.shape[:2], -1)).permute(2, 0, 1).contiguous()


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def __call__(self, x):
        return (x - torch.tensor(self.mean).view(-1, 1, 1)) / torch.tensor(self.std).view(-1, 1, 1)


class functional:
    @staticmethod
    def pil_to_tensor(image):
        array = np.asarray(image)
        return torch.from_numpy(array.reshape(*array.shape[:2], -1).copy()).permute(2, 0, 1)
'''


def sd15_pipeline_folder(directory: Path) -> Path:
    """SD 1.5's architecture at full size, random weights, as a diffusers folder (what sd-scripts loads)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768))
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet,
                                       scheduler=PNDMScheduler(skip_prk_steps=True), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(str(directory))
    return directory


def sdxl_pipeline_folder(directory: Path) -> Path:
    """SDXL's architecture at full size, random weights, as a diffusers folder in bfloat16, the dtype sd-scripts then
    loads and trains it in (--full_bf16): half of float32's memory, where the UNet alone is 10 GB."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bfloat16 directly: never a float32 copy
    try:
        unet = UNet2DConditionModel(**SDXL_UNET)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            max_position_embeddings=77, hidden_act="gelu", projection_dim=1280))
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=1024,
            scaling_factor=0.13025, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4)
        pipeline = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                             tokenizer=None, tokenizer_2=None, unet=unet,
                                             scheduler=EulerDiscreteScheduler())
        pipeline.save_pretrained(str(directory), max_shard_size="1GB")  # one shard's bytes at a time
    finally:
        torch.set_default_dtype(default)
    return directory


def local_tokenizers(directory: Path) -> Path:
    """The byte-level tokenizer of the tiny test models (vocab.json + merges.txt, 77 tokens long), under the names
    sd-scripts looks up in its --tokenizer_cache_dir."""
    from lie_diffusion.tiny import write_tiny_tokenizer

    source = write_tiny_tokenizer(directory / "source")
    for name in TOKENIZERS:
        (directory / name).mkdir()
        for file in ("vocab.json", "merges.txt"):
            shutil.copy(source / file, directory / name / file)
        (directory / name / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    return directory


def sd_scripts(*args, cwd=SD_SCRIPTS, env_root=None, timeout=1800):
    """Run a Python script in sd-scripts' environment; return its output (fail the test with it on error)."""
    env = dict(os.environ)
    paths = [SD_SCRIPTS, str(HERE.parent)]
    if env_root is not None and not os.environ.get("LIE_SD_SCRIPTS_TORCHVISION"):
        paths.insert(0, str(env_root))
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run([PYTHON, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    return output


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("kohya")
    shim = root / "shim" / "torchvision"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("from . import transforms\n")
    (shim / "transforms.py").write_text(TORCHVISION_STAND_IN)
    data = root / "data" / "1_lie"
    data.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for index in range(2):
        pixels = (torch.rand(64, 64, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(data / f"{index}.png")
        (data / f"{index}.txt").write_text("a photo of a lie")
    return {"root": root, "shim": root / "shim", "data": root / "data",
            "tokenizers": local_tokenizers(root / "tokenizers"), "out": root / "out"}


@pytest.fixture(scope="module")
def sd15(work):
    return sd15_pipeline_folder(work["root"] / "sd15")


def train(work, model, name, *extra, script="train_network.py", flags=("--mixed_precision", "no")):
    return sd_scripts(
        script, "--pretrained_model_name_or_path", str(model), "--train_data_dir",
        str(work["data"]), "--caption_extension", ".txt", "--resolution", "64,64", "--train_batch_size", "1",
        "--output_dir", str(work["out"]), "--output_name", name, "--save_model_as", "safetensors",
        "--save_precision", "float", "--tokenizer_cache_dir", str(work["tokenizers"]), *flags,
        "--optimizer_type", "AdamW", "--learning_rate", "1e-3", "--max_data_loader_n_workers", "0", "--seed", "0",
        "--network_module", "lie_diffusion.kohya", *extra, env_root=work["shim"])


@pytest.fixture(scope="module")
def trained(work, sd15):
    """train_network.py: 2 steps from scratch, then 1 more from the file (--network_weights --dim_from_weights)."""
    first = train(work, sd15, "lie", "--network_dim", "4", "--network_alpha", "2", "--network_args", "conv_dim=4",
                  "mode=exp", "--max_train_steps", "2")
    resumed = train(work, sd15, "lie-resumed", "--network_weights", str(work["out"] / "lie.safetensors"),
                    "--dim_from_weights", "--max_train_steps", "1")
    return {"file": work["out"] / "lie.safetensors", "resumed": work["out"] / "lie-resumed.safetensors",
            "logs": (first, resumed)}


def test_train_network_trains_saves_and_resumes(sd15, trained):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from lie_diffusion import LieConfig
    from lie_diffusion.inject import find_targets

    first, resumed = trained["logs"]
    assert "import network module: lie_diffusion.kohya" in first and "lie_diffusion.kohya:" in first
    assert "load network weights from" in resumed
    adapter, again = read_lie_file(trained["file"]), read_lie_file(trained["resumed"])
    assert adapter.kohya_names and adapter.header["ss_network_module"] == "lie_diffusion.kohya"
    assert adapter.header["lie_diffusion_sha256"] and adapter.info["balance"] == "rms"
    with init_empty_weights():  # the training script's default targets in diffusers' SD 1.5 UNet
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(sd15), subfolder="unet"))
    convs, attns = find_targets(unet, LieConfig())
    assert {m.module for m in adapter.section("lie")} == set(convs) and len(convs) == 64
    assert {m.module for m in adapter.section("lora", "unet")} == set(attns)
    assert len(adapter.section("lora", "text_encoder")) == 12 * 4  # q, k, v, out of every CLIP layer
    # Every module trained (B starts at zero) but the mid block's self-attention query and key: on 8×8 latents that
    # block sees one token, the softmax over one key is 1 and their gradient is exactly zero.
    still = {m.module for m in adapter.modules if m.B.abs().max() == 0}
    assert still == {f"mid_block.attentions.0.transformer_blocks.0.attn1.to_{p}" for p in "qk"}
    by_ref = {m.ref: m for m in again.modules}
    assert by_ref.keys() == {m.ref for m in adapter.modules}
    assert all(not torch.equal(by_ref[m.ref].B, m.B) for m in adapter.modules if m.module not in still)  # went on
    assert all(by_ref[m.ref].alpha == m.alpha for m in adapter.modules)


def test_kohya_unet_with_the_network_equals_diffusers_with_the_file(work, sd15, trained):
    from diffusers import UNet2DConditionModel

    sd_scripts(str(HERE / "kohya_sd_scripts.py"), "sd1", str(sd15), str(trained["file"]), str(work["root"]),
               env_root=work["shim"])
    report = json.loads((work["root"] / "sd1_report.json").read_text())
    assert report["unet_class"] == "library.original_unet.UNet2DConditionModel"
    assert report["modules"] == len(read_lie_file(trained["file"]).modules)
    assert max(report["layer_errors"].values()) < LAYER_RTOL, report["layer_errors"]
    saved = load_file(work["root"] / "sd1_outputs.safetensors")
    for t in (1.0, 0.5, -1.0):
        unet = UNet2DConditionModel.from_pretrained(str(sd15), subfolder="unet")
        load_lie_weights(unet, trained["file"], scale=t)
        with torch.no_grad():
            actual = unet(saved["sample"], saved["timestep"], saved["context"]).sample
        expected = saved[f"out_{t}"]
        error = ((actual - expected).abs().max() / expected.abs().max()).item()
        assert error < FP32_RTOL, (t, error)
        del unet


def test_sdxl_network_on_kohyas_sdxl_unet(work):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    sd_scripts(str(HERE / "kohya_sd_scripts.py"), "sdxl", str(work["root"]), env_root=work["shim"])
    report = json.loads((work["root"] / "sdxl_report.json").read_text())
    assert report["unet_class"] == "library.sdxl_original_unet.SdxlUNet2DConditionModel"
    assert max(report["layer_errors"].values()) < LAYER_RTOL, report["layer_errors"]
    assert report["reloaded_equal"]
    adapter = read_lie_file(work["root"] / "sdxl.safetensors")
    with init_empty_weights():
        unet = UNet2DConditionModel(**SDXL_UNET)
    modules = dict(unet.named_modules())
    for entry in adapter.modules:  # every module the file names is a diffusers SDXL layer of the factors' shape
        layer = modules[entry.module]
        assert tuple(layer.weight.shape) == (entry.B.shape[0], *entry.A.shape[1:]), entry.module
    assert len(adapter.modules) == report["modules"]


def test_sdxl_train_network_trains_saves_and_resumes(work):
    """sdxl_train_network.py on full-size SDXL in bfloat16: 1 step, save, 1 step more from the file."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from lie_diffusion import LieConfig
    from lie_diffusion.inject import find_targets

    model = work["root"] / "sdxl-model"
    writer = multiprocessing.get_context("spawn").Process(target=sdxl_pipeline_folder, args=(model,))
    writer.start()  # in its own process, so that its memory is free again before sd-scripts loads the model
    writer.join()
    assert writer.exitcode == 0
    sdxl = dict(script="sdxl_train_network.py",
                flags=("--mixed_precision", "bf16", "--full_bf16", "--network_train_unet_only",
                           "--cache_text_encoder_outputs"))
    first = train(work, model, "lie-xl", "--network_dim", "4", "--network_alpha", "2", "--network_args", "conv_dim=4",
                  "--max_train_steps", "1", **sdxl)
    resumed = train(work, model, "lie-xl-resumed", "--network_weights", str(work["out"] / "lie-xl.safetensors"),
                    "--dim_from_weights", "--max_train_steps", "1", **sdxl)
    assert "import network module: lie_diffusion.kohya" in first and "enable full bf16 training" in first
    assert "load network weights from" in resumed
    adapter = read_lie_file(work["out"] / "lie-xl.safetensors")
    again = read_lie_file(work["out"] / "lie-xl-resumed.safetensors")
    header = adapter.header
    assert adapter.kohya_names and header["ss_network_module"] == "lie_diffusion.kohya"
    assert header["ss_base_model_version"] == "sdxl_base_v1-0" and header["ss_mixed_precision"] == "bf16"
    assert header["lie_diffusion_sha256"] and adapter.info["balance"] == "rms"
    with init_empty_weights():  # the training script's default targets in diffusers' SDXL UNet
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(model), subfolder="unet"))
    convs, attns = find_targets(unet, LieConfig())
    assert {m.module for m in adapter.section("lie")} == set(convs) and len(convs) == 49
    assert {m.module for m in adapter.section("lora", "unet")} == set(attns) and len(attns) == 560
    assert not adapter.section("lora", "text_encoder")  # --network_train_unet_only
    layers = dict(unet.named_modules())
    for entry in adapter.modules:  # the factors fit the diffusers layer they name
        assert tuple(layers[entry.module].weight.shape) == (entry.B.shape[0], *entry.A.shape[1:]), entry.module
    assert all(m.B.abs().max() > 0 for m in adapter.modules)  # one step trained every module (B starts at zero)
    by_ref = {m.ref: m for m in again.modules}
    assert by_ref.keys() == {m.ref for m in adapter.modules}
    assert all(not torch.equal(by_ref[m.ref].B, m.B) for m in adapter.modules)  # the resumed step moved them all
    assert all(by_ref[m.ref].alpha == m.alpha for m in adapter.modules)
    with init_empty_weights():
        load_lie_weights(unet, work["out"] / "lie-xl-resumed.safetensors")  # diffusers' loader takes the file
