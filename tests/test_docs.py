"""The docs are tested: README.md, every docs/*.md page and benchmarks/README.md.

- Every ```python block runs, in page order, in one namespace per page (a page reads like one session), in a
  folder that holds the tiny pipelines and adapter files the blocks name. Hub model names are swapped for
  local tiny pipelines by patching `from_pretrained` (HUB_MODELS below), never by editing a block. A block
  preceded by `<!-- docs: not run (reason) -->` is skipped (and must say why).
- Every shell command in a ```bash block that runs one of our scripts (train_scripts/, examples/,
  benchmarks/) or the `lie-diffusion` CLI names only flags (and subcommands) the real argparse parser has.
  A line that starts with a flag continues the page's previous command ("add to the command above").
- Every relative link and #anchor resolves (GitHub's heading slugs), and each benchmark script's generated
  section sits in the page the script writes to.
"""

from __future__ import annotations

import argparse
import re
import runpy
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
NOT_RUN = re.compile(r"^<!-- docs: not run \((.+)\) -->$")

# Hub names the blocks may use -> which tiny pipeline stands in for them: a `kind` that
# lie_diffusion.tiny.build_tiny_pipeline builds ("sd1", "sd2", "sdxl"). A new model family adds its names here.
HUB_MODELS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd1",
    "runwayml/stable-diffusion-v1-5": "sd1",
    "stabilityai/stable-diffusion-2-1": "sd2",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
    "black-forest-labs/FLUX.1-dev": "flux",
    "black-forest-labs/FLUX.1-schnell": "flux",
    "stabilityai/stable-diffusion-3-medium-diffusers": "sd3",
    "stabilityai/stable-diffusion-3.5-large": "sd3.5",
    "stabilityai/stable-diffusion-3.5-medium": "sd3.5",
}
# Local names the blocks use for a base pipeline (as a user's own folder would be), and their kind.
LOCAL_PIPELINES = {"path/to/base": "sd1", "tiny-sdxl": "sdxl"}
# Adapter folders the blocks load, and the base pipeline each was made for.
ADAPTERS = {
    "my-adapter": "sd1", "other-adapter": "sd1", "cat-adapter": "sd1", "dog-adapter": "sd1",
    "lie-dreambooth-dog": "sd1", "my-sdxl-adapter": "sdxl", "tiny-sdxl-lie": "sdxl",
}


# ------------------------------------------------------------------------------------------------ reading pages


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    not_run: str | None  # the reason given by a `<!-- docs: not run (...) -->` line just before the fence

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def code_blocks(page: Path) -> list[Block]:
    lines = page.read_text().split("\n")
    blocks, i = [], 0
    while i < len(lines):
        fence = re.match(r"^(```+)\s*([\w+-]*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == fence.group(1)), None)
        assert end is not None, f"{page.relative_to(ROOT)}:{i + 1}: code block never closed"
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = NOT_RUN.match(before)
        blocks.append(Block(page, i + 1, fence.group(2).lower(), "\n".join(lines[i + 1:end]),
                            marker.group(1) if marker else None))
        i = end + 1
    return blocks


def prose(page: Path) -> str:
    """The page without its code blocks and inline code (where link-like text is not a link)."""
    text = re.sub(r"^(```+).*?^\1\s*$", "", page.read_text(), flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def test_pages_found():
    names = {p.name for p in PAGES}
    assert {"README.md", "FORMAT.md"} <= names and len(PAGES) >= 4, names


def test_not_run_markers_give_a_reason():
    for page in PAGES:
        for line in page.read_text().split("\n"):
            if "docs: not run" in line:
                assert NOT_RUN.match(line.strip()), f"{page.name}: write `<!-- docs: not run (reason) -->`: {line!r}"


# ----------------------------------------------------------------------------------------- python blocks run


def _adapter(pipeline_dir: Path, out: Path, seed: int) -> None:
    """A small nonzero adapter (the model's default targets) on the UNet or transformer and every CLIP encoder."""
    from diffusers import DiffusionPipeline

    from lie_diffusion import LieConfig, add_lie_adapters, save_lie_weights

    pipe = DiffusionPipeline.from_pretrained(str(pipeline_dir))
    encoders = {k: getattr(pipe, k) for k in ("text_encoder", "text_encoder_2") if getattr(pipe, k, None) is not None}
    generator = torch.Generator().manual_seed(seed)
    denoiser = {k: getattr(pipe, k) for k in ("unet", "transformer") if getattr(pipe, k, None) is not None}
    for model in (*denoiser.values(), *encoders.values()):
        add_lie_adapters(model, LieConfig(rank=2))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.01)
    save_lie_weights(out, **denoiser, **encoders)


def _locon_style(pipeline_dir: Path, out: Path) -> None:
    """A LoCon-style LoRA (convs + attention) as diffusers' training scripts save one."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(str(pipeline_dir))
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian",
                                     target_modules=["conv1", "conv2", "to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(pipe.unet))


class TinyPipelines(dict):
    """kind -> a saved tiny pipeline folder, built the first time a block asks for that kind."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, kind: str) -> Path:
        from lie_diffusion.tiny import build_tiny_pipeline

        self[kind] = build_tiny_pipeline(self.root / f"tiny-{kind}", kind=kind)
        return self[kind]


@pytest.fixture(scope="module")
def materials(tmp_path_factory):
    """The tiny pipelines (lazily, per kind) and the adapter files the blocks name (built once)."""
    root = tmp_path_factory.mktemp("docs-materials")
    pipelines = TinyPipelines(root)
    adapters = {}
    for seed, (name, kind) in enumerate(sorted(ADAPTERS.items())):
        _adapter(pipelines[kind], root / "adapters" / name, seed)
        adapters[name] = root / "adapters" / name
    _locon_style(pipelines["sd1"], root / "adapters" / "style-locon")
    adapters["style-locon"] = root / "adapters" / "style-locon"
    return pipelines, adapters


@pytest.fixture
def hub_swapped(monkeypatch, materials):
    """from_pretrained of pipelines and models reads the tiny pipeline that stands in for a hub name; a hub name
    without one fails here (nothing may download)."""
    from diffusers import DiffusionPipeline, ModelMixin

    pipelines, _ = materials

    def swap(original):
        def from_pretrained(cls, name, *args, **kwargs):
            if isinstance(name, str) and name in HUB_MODELS:
                name = str(pipelines[HUB_MODELS[name]])
            elif isinstance(name, str) and not Path(name).exists():
                raise AssertionError(f"a docs block loads {name!r}: add it to HUB_MODELS in tests/test_docs.py "
                                     "(or to the files a page's folder holds), or mark the block not run")
            return original.__func__(cls, name, *args, **kwargs)
        return classmethod(from_pretrained)

    for owner in (DiffusionPipeline, ModelMixin):
        monkeypatch.setattr(owner, "from_pretrained", swap(owner.from_pretrained))


def _workdir(path: Path, materials) -> None:
    """What a page's blocks find in their folder: base pipelines (read-only links), fresh adapter copies, and
    this checkout as path/to/lie-diffusion (for the community pipeline folders)."""
    pipelines, adapters = materials
    for name, kind in LOCAL_PIPELINES.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).symlink_to(pipelines[kind], target_is_directory=True)
    (path / "path/to/lie-diffusion").symlink_to(ROOT, target_is_directory=True)
    for name, source in adapters.items():
        shutil.copytree(source, path / name)


RUNNABLE = [p for p in PAGES if any(b.lang == "python" and not b.not_run for b in code_blocks(p))]


@pytest.mark.parametrize("page", RUNNABLE, ids=[str(p.relative_to(ROOT)) for p in RUNNABLE])
def test_python_blocks_run(page, materials, hub_swapped, tmp_path, monkeypatch):
    blocks = [b for b in code_blocks(page) if b.lang == "python" and not b.not_run]
    _workdir(tmp_path, materials)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for block in blocks:
        try:
            exec(compile(block.text, block.where(), "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"the python block at {block.where()} failed: {type(error).__name__}: {error}\n"
                                 f"{block.text}") from error


def test_hub_names_are_swapped_and_unknown_ones_fail(hub_swapped, materials):
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", subfolder="unet")
    assert unet.config.block_out_channels == UNet2DConditionModel.from_pretrained(
        materials[0]["sd1"], subfolder="unet").config.block_out_channels
    with pytest.raises(AssertionError, match="HUB_MODELS"):
        DiffusionPipeline.from_pretrained("someone/a-model-no-test-knows")


# ------------------------------------------------------------------------------------ shell lines vs parsers


class _Parsed(Exception):
    def __init__(self, parser):
        self.parser = parser


def script_parser(script: Path) -> argparse.ArgumentParser:
    """The parser a script builds: run it as __main__ until it parses its arguments, then stop it there."""

    def stop(self, *args, **kwargs):
        raise _Parsed(self)

    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv, sys.path[:0] = [str(script)], [str(script.parent)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", stop)
        patch.setattr(argparse.ArgumentParser, "parse_known_args", stop)
        try:
            runpy.run_path(str(script), run_name="__main__")
        except _Parsed as parsed:
            return parsed.parser
        finally:
            sys.argv, sys.path[:] = saved_argv, saved_path
    raise AssertionError(f"{script.relative_to(ROOT)} never parsed its arguments")


def cli_parser() -> argparse.ArgumentParser:
    from lie_diffusion.cli import build_parser

    return build_parser()


def shell_commands(text: str) -> list[list[str]]:
    """The commands of a shell block: continuation lines joined, comments dropped, split at && || ; |."""
    commands = []
    for line in text.replace("\\\n", " ").split("\n"):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        current = []
        for token in lexer:
            if token in ("&&", "||", ";", "|", "&"):
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
    return [c for c in commands if c]


def target(command: list[str]) -> tuple[str, list[str]] | None:
    """(script path or 'cli', its arguments) when the command runs one of ours, else None."""
    while command and re.match(r"^[A-Za-z_]\w*=", command[0]):  # VAR=value prefixes
        command = command[1:]
    if not command:
        return None
    head = command[0]
    if head == "lie-diffusion":
        return "cli", command[1:]
    if head in ("python", "python3") and command[1:3] == ["-m", "lie_diffusion"]:
        return "cli", command[3:]
    if head in ("python", "python3", "accelerate", "torchrun"):
        script = next((i for i, t in enumerate(command) if t.endswith(".py")), None)
        if script is not None and "-c" not in command[:script]:
            path = command[script].removeprefix("./")
            if path.split("/")[0] in ("train_scripts", "examples", "benchmarks"):
                return path, command[script + 1:]
    return None


def flags(arguments: list[str]) -> list[str]:
    """The option names among arguments, `[--opt value]` (optional parts in docs) included."""
    names = []
    for token in arguments:
        token = token.strip("[]")
        if re.match(r"^--?[A-Za-z]", token):
            names.append(token.split("=")[0])
    return names


def check_command(where: str, script: str, arguments: list[str], parsers: dict) -> list[str]:
    """Problems with one command: unknown flags, an unknown CLI subcommand."""
    if script not in parsers:
        if script != "cli" and not (ROOT / script).is_file():
            return [f"{where}: {script} does not exist"]
        parsers[script] = cli_parser() if script == "cli" else script_parser(ROOT / script)
    parser = parsers[script]
    if script == "cli":
        subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        positional = next((t for t in arguments if not t.startswith("-")), None)
        if positional is None:
            return [f"{where}: `lie-diffusion` without a subcommand"] if not arguments else [
                f"{where}: unknown flag {f} of lie-diffusion" for f in flags(arguments)
                if f not in parser._option_string_actions]
        if positional not in subcommands:
            return [f"{where}: `lie-diffusion {positional}`: no such subcommand (have: {', '.join(subcommands)})"]
        parser = subcommands[positional]
        script = f"lie-diffusion {positional}"
    return [f"{where}: {script} has no flag {f}" for f in flags(arguments) if f not in parser._option_string_actions]


def test_shell_flags_exist():
    parsers, problems, checked = {}, [], 0
    for page in PAGES:
        last = None
        for block in code_blocks(page):
            if block.lang not in ("bash", "sh", "shell", "console"):
                continue
            for command in shell_commands(block.text):
                if command[0].startswith("--") and last is not None:  # "add to the command above"
                    found = (last, command)
                else:
                    found = target(command)
                if found is None:
                    continue
                last = found[0]
                problems += check_command(block.where(), found[0], found[1], parsers)
                checked += 1
    assert checked >= 20, f"only {checked} commands found: is the parsing of shell blocks broken?"
    assert not problems, "\n".join(problems)


def test_the_checker_catches_a_wrong_flag_and_subcommand():
    parsers = {}
    assert check_command("x", "cli", ["merge", "--base", "b", "--weigths", "w"], parsers) == [
        "x: lie-diffusion merge has no flag --weigths"]
    assert "no such subcommand" in check_command("x", "cli", ["mrege"], parsers)[0]
    script = "train_scripts/train_dreambooth_lie.py"
    assert check_command("x", script, ["--rank=4", "--lie_balance", "rms"], parsers) == []
    assert check_command("x", script, ["--rnak=4"], parsers) == [f"x: {script} has no flag --rnak"]
    assert target(["ACCELERATE_USE_CPU=1", "torchrun", "--nproc_per_node=2", "train_scripts/x.py", "--seed", "0"]) == (
        "train_scripts/x.py", ["--seed", "0"])
    assert shell_commands("a --x 1 \\\n  --y 2 && lie-diffusion inspect f | head  # note") == [
        ["a", "--x", "1", "--y", "2"], ["lie-diffusion", "inspect", "f"], ["head"]]


# -------------------------------------------------------------------------------------------- links, anchors


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    text = re.sub(r"^(```+).*?^\1\s*$", "", page.read_text(), flags=re.M | re.S)
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_slugs_follow_github():
    assert slug("Everywhere else: `lie-diffusion export` to kohya/LyCORIS") == (
        "everywhere-else-lie-diffusion-export-to-kohyalycoris")
    assert slug("DreamBooth: the default against LoRA / LoCon at equal forgetting") == (
        "dreambooth-the-default-against-lora--locon-at-equal-forgetting")
    assert slug("Speed switches: W' cache, torch.compile") == "speed-switches-w-cache-torchcompile"


def link_problems(page: Path) -> list[str]:
    """Relative links and images of a page whose file or #anchor does not exist."""
    problems = []
    for link in re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose(page)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            problems.append(f"{page.name}: ({link}): {path} does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{page.name}: ({link}): no heading #{anchor} in {resolved.name}")
    return problems


def test_links_and_anchors_resolve():
    problems = [problem for page in PAGES for problem in link_problems(page)]
    assert not problems, "\n".join(problems)


def test_link_check_catches_broken_links(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A: `b` / c\n\n## A: `b` / c\n")
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](other.md#a-b--c-1) [ok](#title) [web](https://example.com/x#y) `[code](nowhere.md)`\n"
                    "[gone](missing.md) [no anchor](other.md#nope) ![img](pic.png)\n\n```python\n[x](in-code.md)\n```\n")
    assert link_problems(page) == ["page.md: (missing.md): missing.md does not exist",
                                   "page.md: (other.md#nope): no heading #nope in other.md",
                                   "page.md: (pic.png): pic.png does not exist"]


def test_benchmark_sections_live_where_their_scripts_write():
    sys.path.insert(0, str(ROOT))
    from benchmarks import benchlib as B

    for section, page in B.PAGES.items():
        text = page.read_text()
        for marker in (f"<!-- bench:{section}:start -->", f"<!-- bench:{section}:end -->"):
            assert text.count(marker) == 1, f"{page.relative_to(ROOT)} needs one {marker} (benchlib.PAGES)"
    for page in PAGES:
        for section in re.findall(r"<!-- bench:([\w-]+):start -->", prose(page)):
            assert B.PAGES.get(section) == page, (
                f"{page.relative_to(ROOT)} holds bench:{section}, which its script writes to {B.PAGES.get(section)}")
