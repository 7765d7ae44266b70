import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "embedtrain" / "assets"
WORKERS = REPO / "tests" / "workers"


def worker_env(threads=1):
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}",
        TOKENIZERS_PARALLELISM="false",
    )
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run_ranks(args, nproc=1, timeout=300, check=True):
    """Run `args` (a script and its arguments) on `nproc` CPU ranks (torchrun + gloo), with a timeout."""
    if nproc == 1:
        command = [sys.executable, *map(str, args)]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            *map(str, args),
        ]
    result = subprocess.run(command, cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    return result


def run_checked(command, timeout=300, **kwargs):
    """subprocess.run(command) that must succeed; a failure shows the command, its exit code and the
    tail of its stdout and stderr (a bare CalledProcessError hides why, e.g. pip's error)."""
    command = [str(part) for part in command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    return result


def run_worker(name, out, *args, nproc=1, timeout=300, check=True):
    result = run_ranks([WORKERS / name, "--out", out, *args], nproc=nproc, timeout=timeout, check=check)
    if Path(out).exists():
        return json.loads(Path(out).read_text()), result
    return None, result


def embedtrain_cli(*args, timeout=400):
    """`embedtrain ARGS...` in a subprocess, as a user types it."""
    return subprocess.run(
        [sys.executable, "-m", "embedtrain.cli", *map(str, args)],
        cwd=REPO,
        env=worker_env(threads=2),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """The tiny recipe trained 2 steps and exported (instruction prompts): one model for every test
    that only needs some exported model."""
    root = tmp_path_factory.mktemp("tiny_export")
    train = (
        "train",
        "--config",
        "tiny",
        "--output-dir",
        root / "run",
        "--set",
        "train.max_steps=2",
        "--set",
        "logging.every=1",
    )
    for args in (train, ("export", root / "run", root / "model")):
        result = embedtrain_cli(*args)
        assert result.returncode == 0, result.stderr[-3000:]
    return root / "model"


@pytest.fixture(scope="session")
def tiny_llama():
    return ASSETS / "tiny-llama"


@pytest.fixture(scope="session")
def demo_data():
    return ASSETS / "demo-data"


def pytest_configure(config):
    # registered here rather than in a pytest.ini: the repository's top level stays as documented
    config.addinivalue_line(
        "markers",
        "gpu: needs a CUDA device; skipped when torch.cuda.is_available() is False "
        "(python -m pytest -q -m gpu tests runs only these; docs/gpu.md)",
    )


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests need CUDA: skipped when torch.cuda.is_available() is False.
    EMBEDTRAIN_GPU_TESTS_ON_CPU=1 runs them on the CPU instead, to check the tests themselves on a
    machine without a GPU (it proves nothing about the GPU)."""
    import torch

    if torch.cuda.is_available() or os.environ.get("EMBEDTRAIN_GPU_TESTS_ON_CPU") == "1":
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
