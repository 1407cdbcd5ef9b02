"""The one harness every benchmark script uses: models, the peers, timing, memory and reports.

Sharing it keeps the comparisons fair by construction: every method gets the same UNet, the same
targeted conv layers (lie-diffusion's default conv targets), the same rank, and is timed in the
same process with interleaved repetitions after a warm-up.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import gc
import json
import logging
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # a checkout works without `pip install -e .`

from lie_diffusion import LieConfig, add_lie_adapters  # noqa: E402
from lie_diffusion.inject import find_targets  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"
# The docs page that shows each script's generated section (<!-- bench:<name>:start --> ... :end -->).
PAGES = {
    "speed": DOCS / "performance.md",
    "speed_dit": DOCS / "performance-dit.md",
    "quality": DOCS / "benchmarks.md",
    "dreambooth": DOCS / "benchmarks.md",
    "dreambooth_tradeoff": DOCS / "benchmarks.md",
    "dreambooth_flux": DOCS / "benchmarks.md",
    "dreambooth_tradeoff_flux": DOCS / "benchmarks.md",
    "stacking": DOCS / "benchmarks.md",
    "extract": DOCS / "hosts.md",
    "balance": DOCS / "training.md",
    "emoji": DOCS / "emoji-model.md",
    "emoji-flux": DOCS / "emoji-model.md",
}

# UNet2DConditionModel configs. "mid" is the issue's CPU size; "sd15" is Stable Diffusion 1.5's
# UNet (the rest of its config is diffusers' default); "tiny" and "micro" are for smoke tests.
UNET_CONFIGS = {
    "tiny": dict(
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=16,
    ),
    "micro": dict(  # one cross-attention down and up block, no mid block: compiles in seconds (smoke tests)
        block_out_channels=(8,), layers_per_block=1, norm_num_groups=4, cross_attention_dim=8, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",), mid_block_type=None,
        sample_size=8,
    ),
    "mid": dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2, cross_attention_dim=768,
                attention_head_dim=8, sample_size=64),
    "sd15": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8, sample_size=64),
}


def build_unet(size: str, device="cpu", dtype=torch.float32, seed: int = 0):
    """A random-weight UNet2DConditionModel of the named size, built directly on `device`."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**UNET_CONFIGS[size])
    if dtype != unet.dtype:
        unet = unet.to(dtype)
    return unet.eval().requires_grad_(False)


# Flux transformer widths: "dev" is FLUX.1-dev's (and schnell's) block config; "tiny" is for smoke tests.
FLUX_WIDTHS = {
    "dev": dict(dim=3072, num_attention_heads=24, attention_head_dim=128, axes_dims_rope=(16, 56, 56)),
    "tiny": dict(dim=32, num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(4, 6, 6)),
}
# diffusers' train_dreambooth_lora_flux.py default targets: the attention projections (incl. the context ones)
# and the feed-forward layers.
FLUX_TARGETS = (r"attn\.to_q", r"attn\.to_k", r"attn\.to_v", r"attn\.to_out\.0", r"attn\.add_q_proj",
                r"attn\.add_k_proj", r"attn\.add_v_proj", r"attn\.to_add_out", r"ff\.net\.0\.proj", r"ff\.net\.2",
                r"ff_context\.net\.0\.proj", r"ff_context\.net\.2")


class FluxBlocks(nn.Module):
    """One FluxTransformerBlock (double stream) and one FluxSingleTransformerBlock, run as the Flux
    transformer runs them; returns the image tokens."""

    def __init__(self, dim, num_attention_heads, attention_head_dim, axes_dims_rope):
        from diffusers.models.transformers.transformer_flux import (FluxPosEmbed, FluxSingleTransformerBlock,
                                                                    FluxTransformerBlock)

        super().__init__()
        self.double_block = FluxTransformerBlock(dim, num_attention_heads, attention_head_dim)
        self.single_block = FluxSingleTransformerBlock(dim, num_attention_heads, attention_head_dim)
        self.rope = FluxPosEmbed(theta=10000, axes_dim=list(axes_dims_rope))

    def forward(self, hidden_states, encoder_hidden_states, temb, ids):
        rotary = self.rope(ids)
        encoder_hidden_states, hidden_states = self.double_block(hidden_states, encoder_hidden_states, temb, rotary)
        return self.single_block(hidden_states, encoder_hidden_states, temb, rotary)[1]


def build_flux_blocks(width: str = "dev", seed: int = 0) -> FluxBlocks:
    """Random-weight Flux blocks of the named width, frozen, in float32 on the CPU."""
    torch.manual_seed(seed)
    return FluxBlocks(**FLUX_WIDTHS[width]).eval().requires_grad_(False)


def flux_targets(model: nn.Module) -> list[str]:
    """The Linear layers every method adapts in Flux blocks: diffusers' Flux DreamBooth defaults."""
    return find_targets(model, LieConfig(attn_adapter="lie", attn_targets=FLUX_TARGETS, conv_targets=()))[1]


def flux_batch(model: FluxBlocks, batch: int, image_tokens: int, text_tokens: int, seed: int = 0):
    """(forward kwargs, target) for `FluxBlocks`: image and text tokens, the time embedding, and position ids
    as Flux builds them (text ids zero, image ids the row / column of a square latent grid)."""
    g = torch.Generator().manual_seed(seed)
    dim = model.double_block.norm1.linear.in_features
    side = math.isqrt(image_tokens)
    if side * side != image_tokens:
        raise ValueError(f"image_tokens must be a square number, got {image_tokens}.")
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    image_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3)
    kwargs = dict(hidden_states=torch.randn(batch, image_tokens, dim, generator=g),
                  encoder_hidden_states=torch.randn(batch, text_tokens, dim, generator=g),
                  temb=torch.randn(batch, dim, generator=g),
                  ids=torch.cat([torch.zeros(text_tokens, 3, dtype=image_ids.dtype), image_ids]))
    return kwargs, torch.randn(batch, image_tokens, dim, generator=g)


def conv_targets(model: nn.Module) -> list[str]:
    """The conv layers every method adapts: lie-diffusion's default conv targets in `model`."""
    return find_targets(model, LieConfig(attn_adapter="none"))[0]


# ---------------------------------------------------------------------------------------------
# The peers. Each attaches to `model` in place on the same `targets` at the same `rank` and returns
# what the optimizer trains plus how to take the adapter off again.


@dataclass
class Adapted:
    params: list[nn.Parameter]  # what requires grad (and what AdamW steps, unless `optimize` is False)
    detach: Callable[[], None]
    optimize: bool = True  # False for the floor: its weight gradients are computed, never applied


def _new_params(model: nn.Module, before: set[int]) -> list[nn.Parameter]:
    return [p for p in model.parameters() if id(p) not in before]


def _unwrap(model: nn.Module, targets: list[str]) -> None:
    """Put the original conv modules back in place of peft's wrappers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name in targets:
        module = model.get_submodule(name)
        if isinstance(module, BaseTunerLayer):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    if hasattr(model, "_hf_peft_config_loaded"):
        model._hf_peft_config_loaded = False


def _peft_attach(model: nn.Module, targets: list[str], peft_config, lie: LieConfig | None = None) -> Adapted:
    before = {id(p) for p in model.parameters()}
    if lie is not None:
        add_lie_adapters(model, lie)
    elif hasattr(model, "add_adapter"):
        model.add_adapter(peft_config)
    else:
        from peft import inject_adapter_in_model

        inject_adapter_in_model(peft_config, model)
    return Adapted(_new_params(model, before), lambda: _unwrap(model, targets))


def _exact(targets: list[str]) -> tuple[str, ...]:
    return tuple(re.escape(t) for t in targets)


def attach_lie(mode: str):
    def attach(model, targets, rank):
        linears = [t for t in targets if isinstance(model.get_submodule(t), nn.Linear)]
        convs = [t for t in targets if t not in linears]
        config = LieConfig(rank=rank, mode=mode, attn_adapter="lie" if linears else "none",
                           conv_targets=_exact(convs), attn_targets=_exact(linears))
        return _peft_attach(model, targets, None, lie=config)

    return attach


def attach_lora(model, targets, rank):
    from peft import LoraConfig

    return _peft_attach(model, targets, LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)))


def attach_hira(model, targets, rank):
    """peft's own HiRA: base conv + a second conv with W ⊙ BA (peft 0.21 supports Conv2d)."""
    from peft import HiraConfig

    return _peft_attach(model, targets, HiraConfig(r=rank, target_modules=list(targets)))


def attach_lycoris(algo: str):
    """A LyCORIS algorithm ("locon", "loha", "lokr"; its default weight-rebuild forward) on exactly `targets`.

    LyCORIS takes its targets from class-level presets, so this sets them on `LycorisNetwork` itself.
    """

    def attach(model, targets, rank):
        from lycoris import LycorisNetwork

        LycorisNetwork.apply_preset({"enable_conv": True, "target_module": [],
                                     "target_name": [f"{t}$" for t in _exact(targets)]})
        network = LycorisNetwork(model, multiplier=1.0, lora_dim=rank, conv_lora_dim=rank, alpha=rank,
                                 conv_alpha=rank, network_module=algo, warn_on_unmatched=False)
        if len(network.loras) != len(targets):
            raise RuntimeError(f"LyCORIS wrapped {len(network.loras)} modules, expected {len(targets)}.")
        network.apply_to()
        return Adapted(list(network.parameters()), network.restore)  # the bound method keeps the network alive

    return attach


def attach_dora(model, targets, rank):
    """peft's DoRA (LoRA with a learned per-output-channel magnitude) on `targets`, convs included."""
    from peft import LoraConfig

    return _peft_attach(model, targets, LoraConfig(r=rank, lora_alpha=rank, use_dora=True,
                                                   target_modules=list(targets)))


def attach_floor(model, targets, rank):
    """The method's floor: frozen model, full weight gradients on the targeted layers, no optimizer. The
    targeted weights become the floor's own copies, so a clone that shares its base weights stays frozen."""
    weights = []
    for t in targets:
        module = model.get_submodule(t)
        module.weight = nn.Parameter(module.weight.detach().clone())
        weights.append(module.weight)
    return Adapted(weights, lambda: [w.requires_grad_(False) for w in weights], optimize=False)


def attach_full_targets(model, targets, rank):
    """Full fine-tuning of the targeted layers' weights: what every adapter on `targets` approximates."""
    weights = [model.get_submodule(t).weight for t in targets]
    return Adapted(weights, lambda: [w.requires_grad_(False) for w in weights])


def attach_full(model, targets, rank):
    """Full fine-tuning of every parameter (quality reference)."""
    params = list(model.parameters())
    return Adapted(params, lambda: model.requires_grad_(False))


METHODS: dict[str, Callable[..., Adapted]] = {
    "lie-exp": attach_lie("exp"),
    "lie-taylor": attach_lie("taylor"),
    "peft-lora": attach_lora,
    "peft-hira": attach_hira,
    "lycoris-locon": attach_lycoris("locon"),
    "lycoris-loha": attach_lycoris("loha"),
    "lycoris-lokr": attach_lycoris("lokr"),
    "peft-dora": attach_dora,
    "floor": attach_floor,
    "full": attach_full,
    "full-targets": attach_full_targets,
}
TRAIN_PEERS = ("lie-exp", "lie-taylor", "peft-lora", "peft-hira", "lycoris-locon", "floor")


def attach(method: str, model: nn.Module, targets: list[str], rank: int) -> Adapted:
    """Attach `method`; afterwards exactly `adapted.params` require grad (trainable ones in fp32)."""
    model.requires_grad_(False)
    adapted = METHODS[method](model, targets, rank)
    for p in adapted.params:
        if adapted.optimize and p.dtype != torch.float32:
            p.data = p.data.float()  # adapter weights train in fp32 even on a half-precision base
        p.requires_grad_(True)
    return adapted


def count_params(params) -> int:
    return sum(p.numel() for p in params)


def randomize_zero_factors(params, std: float = 1e-2, seed: int = 0) -> None:
    """Give zero-initialised factors small random values, so an adapter is not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g).to(p.device) * std)


# ---------------------------------------------------------------------------------------------
# Steps, timing and memory.


def unet_batch(model: nn.Module, batch: int, latent: int, device="cpu", dtype=torch.float32, seed: int = 0):
    """(forward kwargs, target) for a UNet2DConditionModel: noisy latents, timesteps, text states, noise."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    kwargs = dict(
        sample=torch.randn(batch, cfg.in_channels, latent, latent, generator=g),
        timestep=torch.randint(0, 1000, (batch,), generator=g),
        encoder_hidden_states=torch.randn(batch, 77, cfg.cross_attention_dim, generator=g),
    )
    target = torch.randn(batch, cfg.out_channels, latent, latent, generator=g)
    kwargs = {k: v.to(device, dtype if v.is_floating_point() else None) for k, v in kwargs.items()}
    return kwargs, target.to(device)


def train_step(model, adapted: Adapted, inputs: dict, target, optimizer=True, autocast_dtype=None):
    """A callable running one forward + backward (+ AdamW on the trainable params, if `optimizer`)."""
    opt = torch.optim.AdamW(adapted.params, lr=1e-4) if optimizer and adapted.optimize else None
    device = target.device.type

    def step():
        with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            prediction = model(**inputs)
        prediction = getattr(prediction, "sample", prediction)  # a diffusers model output, or a plain tensor
        F.mse_loss(prediction.float(), target.float()).backward()
        if opt is not None:
            opt.step()
        for p in adapted.params:
            p.grad = None

    return step


def inference_step(model, inputs: dict, autocast_dtype=None):
    device = inputs["sample"].device.type

    @torch.no_grad()
    def step():
        with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            model(**inputs)

    return step


def synchronizer(device) -> Callable[[], None]:
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)


def interleaved(cases: dict[str, Callable], reps: int, warmup: int = 1, sync=lambda: None, log=print):
    """Seconds per call of each case: `warmup` untimed rounds, then `reps` rounds, each in a rotated order."""
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    times = {name: [] for name in names}
    for rep in range(reps):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            sync()
            start = time.perf_counter()
            cases[name]()
            sync()
            times[name].append(time.perf_counter() - start)
        log(f"  round {rep + 1}/{reps}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names))
    return times


def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _glibc()


def cpu_allocator(measuring: bool) -> None:
    """glibc's malloc mode. Measuring: big blocks are mmapped and unmapped on free, so RSS follows live
    tensors. Otherwise (timing): freed blocks are kept for reuse, like glibc's warmed-up default."""
    if _LIBC is not None:
        threshold, trim = (32 * 1024, 32 * 1024) if measuring else (32 * 2**20, 64 * 2**20)
        _LIBC.mallopt(-3, threshold)  # M_MMAP_THRESHOLD
        _LIBC.mallopt(-1, trim)  # M_TRIM_THRESHOLD


def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def peak_memory(fn: Callable, device="cpu") -> dict[str, float | None]:
    """Peak memory one call of `fn` adds on top of what was live before it, in MiB, two ways.

    `tensor_mib`: the peak of live tensor bytes allocated during the call — exact and independent of
    the allocator (CUDA: torch.cuda.max_memory_allocated; CPU: torch.profiler's memory events).
    `rss_mib` (CPU): the RSS high-water mark, reset through /proc/self/clear_refs ("5"), minus the RSS
    before the call, with glibc in measuring mode (call `cpu_allocator(measuring=False)` before timing
    again); it also counts what the allocator holds beyond live tensors. None where unavailable.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return {"tensor_mib": (torch.cuda.max_memory_allocated() - before) / 2**20, "rss_mib": None}
    return {"tensor_mib": _profiled_tensor_peak(fn), "rss_mib": _rss_peak(fn)}


def _profiled_tensor_peak(fn: Callable) -> float | None:
    from torch.profiler import profile

    with profile(profile_memory=True) as prof:
        fn()
    try:
        events = [e for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    except AttributeError:  # the profiler's event API moved
        return None
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak / 2**20


def _rss_peak(fn: Callable) -> float | None:
    cpu_allocator(measuring=True)
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _proc_status_kib("VmRSS")
    except OSError:
        return None
    fn()
    return (_proc_status_kib("VmHWM") - before) / 1024


OP_GROUPS = {
    "convolutions": ("convolution", "conv2d"),
    "attention": ("scaled_dot_product", "attention", "bmm", "softmax"),
}


def op_times(fn: Callable, device="cpu") -> dict[str, float]:
    """Seconds one call of `fn` spends in each aten op (torch.profiler self time; device time on CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    return {e.key: getattr(e, attr) / 1e6 for e in prof.key_averages() if e.key.startswith("aten::")}


def op_shares(fn: Callable, device="cpu") -> dict[str, float]:
    """Where one call of `fn` spends its time, by op group (torch.profiler self time, summed)."""
    times = op_times(fn, device)
    total = sum(times.values()) or 1
    shares = {g: sum(t for op, t in times.items() if any(k in op for k in keys)) / total for g, keys in OP_GROUPS.items()}
    shares["other"] = 1 - sum(shares.values())
    return shares


# ---------------------------------------------------------------------------------------------
# Reports.


def median(values) -> float:
    return statistics.median(values)


def environment(device="cpu") -> dict:
    """Versions and machine, stored beside every result."""
    env = {"python": platform.python_version(), "machine": platform.machine(), "torch_threads": torch.get_num_threads()}
    for package in ("torch", "diffusers", "peft", "lycoris-lora", "lie-diffusion"):
        try:
            env[package] = version(package)
        except Exception:
            env[package] = None
    try:
        cpu = [l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")]
        env["cpu"] = cpu[0].split(":", 1)[1].strip() if cpu else platform.processor()
    except OSError:
        env["cpu"] = platform.processor()
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    env["date"] = time.strftime("%Y-%m-%d %H:%M")
    return env


def md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, data: dict, markdown: str, out_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    """results/<name>.json and results/<name>.md."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    return json_path, md_path


def add_page_argument(parser, section: str) -> None:
    """--page: the docs page whose generated section the run rewrites (--readme, its older name, still works)."""
    parser.add_argument("--page", "--readme", dest="page", default=str(PAGES[section]),
                        help=f"docs page whose bench:{section} section to update ('none': leave it alone; "
                             f"default: {PAGES[section].relative_to(ROOT)})")


def update_page(section: str, markdown: str, page: Path) -> None:
    """Replace what lies between `<!-- bench:<section>:start -->` and `<!-- bench:<section>:end -->`."""
    page = Path(page)
    text = page.read_text()
    start, end = f"<!-- bench:{section}:start -->", f"<!-- bench:{section}:end -->"
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"{page} needs exactly one {start} ... {end} pair.")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    page.write_text(f"{head}{start}\n{markdown.strip()}\n{end}{tail}")


def link(path: Path, page) -> str:
    """How `page` refers to `path` (a figure): relative to the page's folder, or to the repository without one."""
    path = Path(path).resolve()
    if str(page) == "none":
        return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    return os.path.relpath(path, Path(page).resolve().parent)


def publish(name: str, data: dict, markdown: str, out_dir=RESULTS_DIR, page="none") -> None:
    """A finished run: results/<name>.{json,md}, the docs page's section (unless page is 'none'), stdout."""
    write_results(name, data, markdown, out_dir)
    if str(page) != "none":
        update_page(name, markdown, Path(page))
    print(markdown)


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure as PNG (atomic: a half-written figure never replaces a good one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    fig.savefig(partial, format="png", dpi=120, bbox_inches="tight")
    partial.replace(path)
    return path


def clone(model: nn.Module, share_weights: bool = False) -> nn.Module:
    """A deep copy; with `share_weights`, one whose parameters and buffers are the original's (frozen base
    weights held once, for models too big to copy per method: every peer here leaves them unchanged)."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]} if share_weights else None
    return copy.deepcopy(model, memo)


# ------------------------------------------------------------------------------------- runs in worker processes

_RUNNER = None


def _start_runner(make: Callable, make_args: tuple, threads: int) -> None:
    global _RUNNER
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    _RUNNER = make(*make_args, prepare=False)


def _run_task(task: tuple):
    return _RUNNER.run(*task)


def task_map(stack: contextlib.ExitStack, jobs: int, threads: int, local, make: Callable, make_args: tuple):
    """A map over tasks: `local.run(*task)` in this process, or with `jobs` > 1 the same on `jobs` spawned
    worker processes, each with its own runner `make(*make_args, prepare=False)` and `threads` torch threads.
    The pool lives as long as `stack`."""
    if jobs <= 1:
        return functools.partial(map, lambda task: local.run(*task))
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = stack.enter_context(ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                                   initializer=_start_runner, initargs=(make, make_args, threads)))
    return functools.partial(pool.map, _run_task)


def reuse_or_run(run_fresh: Callable, done: dict, tasks: list, keep: Callable):
    """Each task's result in order: a finished one from `done`, the rest through `run_fresh` (one map call, so
    a worker pool runs them in parallel), each stored in `done` as `keep(result)` the moment it arrives."""
    fresh = iter(run_fresh([t for t in tasks if t not in done]))
    for task in tasks:
        if task not in done:
            done[task] = keep(next(fresh))
        yield done[task]
