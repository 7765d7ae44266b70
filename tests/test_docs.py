"""The documentation keeps its promises: its commands run, its links resolve, the README stays a front
door, the config reference equals the config tree, and every command's --help shows an example.

Runnable blocks. A fenced block whose info string holds the word `runnable` (```bash runnable) in
README.md or docs/*.md is a command that runs on CPU in seconds with the tiny model and the demo data.
Each page's runnable blocks run in page order, with `bash -e -o pipefail`, in one temporary working
folder of their own (so a later block may use what an earlier one wrote), each under a timeout. In
that folder:
  - `embedtrain` runs this checkout's CLI (`python -m embedtrain.cli`); `python` and `torchrun` are the
    interpreter running the tests (a small script for each is put first on PATH);
  - PYTHONPATH starts with the repository root, and $EMBEDTRAIN_REPO is the repository root.
So a runnable block uses relative paths (runs/..., exported/...), `assets:NAME` for what
embedtrain/assets ships, or "$EMBEDTRAIN_REPO/..." for other files of the repository. Blocks that need
a GPU, big data or the network are left unmarked; their code paths are covered by the other tests.
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 250
BLOCK_TIMEOUT = 300  # seconds per runnable block (the slowest, 2 ranks under torchrun, takes ~25 s alone)
QUICKSTART = (  # the README's two Quickstart commands, exactly (CI and users copy them)
    "pip install torch==2.13.0 && DS_BUILD_OPS=0 pip install -c tools/constraints.txt -e . && "
    "embedtrain train --config tiny --output-dir runs/tiny",
    "pip install torch==2.13.0 && DS_BUILD_OPS=0 pip install -c tools/constraints.txt -e '.[test]' && "
    "python -m pytest -q tests",
)
# commands of embedtrain.cli whose --help has no example yet (cli.py is not this file's to change); an
# entry here is an expected failure, so remove it once the docstring shows an example
KNOWN_WITHOUT_EXAMPLE = set()

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*(.*)$")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+).*?\1")


def fenced_blocks(text):
    """(info words, body, line number of the opening fence) of every fenced code block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, info, body, j = opening.group(1), opening.group(2).split(), [], i + 1
        while j < len(lines) and not (lines[j].strip().startswith(fence) and not lines[j].strip().strip(fence[0])):
            body.append(lines[j])
            j += 1
        blocks.append((info, "\n".join(body) + "\n", i + 1))
        i = j + 1
    return blocks


def prose_lines(text):
    """The lines outside fenced code blocks, with their numbers."""
    inside, fence = False, ""
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if match and not inside:
            inside, fence = True, match.group(1)
        elif inside and line.strip().startswith(fence) and not line.strip().strip(fence[0]):
            inside = False
        elif not inside:
            yield number, line


def runnable_blocks(page):
    return [(body, line) for info, body, line in fenced_blocks(page.read_text()) if "runnable" in info]


def slug(heading):
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces -> hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(page):
    seen, found = {}, set()
    for _, line in prose_lines(page.read_text()):
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(page):
    """(line number, target) of every link that is not a URL, outside code."""
    for number, line in prose_lines(page.read_text()):
        for match in LINK.finditer(INLINE_CODE.sub("", line)):
            target = match.group(1)
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, ...
                yield number, target


def name(page):
    return str(page.relative_to(REPO))


@pytest.fixture
def shell_env(tmp_path):
    """PATH with `embedtrain`, `python` and `torchrun` of this interpreter and checkout, and
    $EMBEDTRAIN_REPO; see the module docstring."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "embedtrain": f'exec "{sys.executable}" -m embedtrain.cli "$@"',
        "python": f'exec "{sys.executable}" "$@"',
        "torchrun": f'exec "{sys.executable}" -m torch.distributed.run "$@"',
    }
    for script, line in scripts.items():
        path = bin_dir / script
        path.write_text(f"#!/bin/sh\n{line}\n")
        path.chmod(0o755)
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}",
        EMBEDTRAIN_REPO=str(REPO),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )
    return env


@pytest.mark.parametrize("page", [p for p in PAGES if runnable_blocks(p)], ids=name)
def test_runnable_blocks_run(page, tmp_path, shell_env):
    work = tmp_path / "work"
    work.mkdir()
    for body, line in runnable_blocks(page):
        where = f"{name(page)}:{line}"
        try:
            result = subprocess.run(
                ["bash", "-e", "-o", "pipefail", "-c", body],
                cwd=work,
                env=shell_env,
                capture_output=True,
                text=True,
                timeout=BLOCK_TIMEOUT,
            )
        except subprocess.TimeoutExpired as err:
            pytest.fail(f"{where}: the block ran past {BLOCK_TIMEOUT} s:\n{body}\n{(err.stderr or '')[-3000:]}")
        assert result.returncode == 0, (
            f"{where}: exit {result.returncode}\n{body}\n--- stdout\n{result.stdout[-3000:]}\n"
            f"--- stderr\n{result.stderr[-5000:]}"
        )


def test_every_page_has_its_commands_marked():
    """At least the topic pages that promise commands carry runnable blocks (a guard against a
    marker lost in an edit)."""
    for page in ("data", "training", "distributed", "reliability", "inference", "evaluation"):
        assert runnable_blocks(REPO / "docs" / f"{page}.md"), f"docs/{page}.md has no runnable block"


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_relative_links_resolve(page):
    broken = []
    for number, target in relative_links(page):
        path, _, anchor = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        if not destination.exists():
            broken.append(f"{name(page)}:{number}: {target} (no such file)")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{name(page)}:{number}: {target} (no heading #{anchor} in {destination.name})")
    assert not broken, "\n".join(broken)


def test_readme_is_a_front_door():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES, f"README.md has {len(text.splitlines())} lines"
    commands = [body.strip() for info, body, _ in fenced_blocks(text) if info[:1] == ["bash"]]
    for command in QUICKSTART:
        assert command in commands, f"the README's Quickstart lost its command: {command}"


def load_config_reference():
    spec = importlib.util.spec_from_file_location("config_reference", REPO / "tools" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_reference_is_generated_from_the_config_tree():
    tool = load_config_reference()
    text = (REPO / "docs" / "training.md").read_text()
    _, start, rest = text.partition(tool.START)
    block, end, _ = rest.partition(tool.END)
    assert start and end, "docs/training.md lost its config-reference markers"
    assert block == "\n" + tool.reference(), (
        "docs/training.md's config reference differs from embedtrain/config.py: run "
        "python tools/config_reference.py --write docs/training.md"
    )
    from embedtrain.config import Config

    for section in ("model", "data", "loss", "optim", "train", "logging", "eval"):
        for field in getattr(Config(), section).__dataclass_fields__:
            assert f"`{section}.{field}`" in block, f"{section}.{field} is missing from the reference"


def cli_commands():
    from embedtrain.cli import main

    return sorted(main.commands)


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(c, marks=pytest.mark.xfail(reason=f"embedtrain {c} --help has no example yet", strict=False))
        if c in KNOWN_WITHOUT_EXAMPLE
        else c
        for c in cli_commands()
    ],
)
def test_every_command_help_shows_an_example(command):
    from click.testing import CliRunner

    from embedtrain.cli import main

    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output, f"embedtrain {command} --help shows no example:\n{result.output}"


def test_design_module_map_matches_the_code():
    """Every module named in the name column of docs/design.md's layout block exists, and every module
    of the package is named there (so the map cannot drift from the code). Lines indented 2 name
    embedtrain/ entries, lines indented 4 the entries of the folder above them."""
    text = (REPO / "docs" / "design.md").read_text()
    block = text[text.index("## Layout") : text.index("## Contracts")]
    block = block[block.index("```") + 3 : block.rindex("```")]
    named, folder, inside = set(), None, False
    for line in block.splitlines():
        names = re.split(r"\s{2,}", line.strip())[0].split()  # the name column ends at a wider gap
        indent = len(line) - len(line.lstrip())
        if indent == 0:
            inside = bool(names) and names[0] == "embedtrain/"
            continue
        if not inside or not names or indent not in (2, 4):
            continue
        if indent == 2:
            folder = names[0].rstrip("/") if names[0].endswith("/") else None
        prefix = "embedtrain/" if indent == 2 else f"embedtrain/{folder}/"
        named.update(prefix + name for name in names if name.endswith(".py"))
    modules = {
        str(p.relative_to(REPO))
        for p in (REPO / "embedtrain").rglob("*.py")
        if p.name != "__init__.py" and "assets" not in p.parts
    }
    missing, unnamed = sorted(named - modules), sorted(modules - named)
    assert not missing, f"docs/design.md names modules that do not exist: {missing}"
    assert not unnamed, f"modules docs/design.md's layout does not name: {unnamed}"
