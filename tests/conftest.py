import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

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


def run_scenarios(name, scenarios, root, nproc=1, timeout=600):
    """Every scenario ({key: the worker's arguments, less --out}) of worker `name` in ONE launch on
    `nproc` ranks (tests/workers/scenario_batch.py), each in its own folder under `root` and as a
    single run would compute it; returns {key: its result}. A launch costs about 8 s on 2 cores, a
    parity scenario about 1 s, so scenarios of one world size share a launch. With `name` None each
    scenario is (worker, arguments) and scenario_batch.py runs them (several workers, one launch)."""
    root = Path(root)
    batch = []
    for index, args in enumerate(scenarios.values()):
        folder = root / f"scenario{index}"
        folder.mkdir(parents=True, exist_ok=True)
        worker, args = (name, args) if name else args
        entry = {} if name else {"worker": worker}
        batch.append({**entry, "out": str(folder / "r.json"), "args": [str(arg) for arg in args]})
    (root / "scenarios.json").write_text(json.dumps(batch, indent=1))
    script = WORKERS / (name or "scenario_batch.py")
    run_ranks([script, "--scenarios", root / "scenarios.json"], nproc=nproc, timeout=timeout)
    return {key: json.loads(Path(entry["out"]).read_text()) for key, entry in zip(scenarios, batch)}


SCENARIOS = {}  # {(test module, world size): {key: (worker, arguments)}}, filled by shared_scenarios


def shared_scenarios(module, nproc, worker, scenarios):
    """Register, at a test module's import, scenarios ({key: arguments less --out}) of `worker` on
    `nproc` ranks for the session's shared launch (the `scenario_launch` fixture)."""
    SCENARIOS.setdefault((module, nproc), {}).update({key: (worker, args) for key, args in scenarios.items()})


@pytest.fixture(scope="session")
def scenario_launch(request, tmp_path_factory):
    """`results(module, nproc)` -> {key: result} of that module's registered scenarios. The first
    call for a world size runs the scenarios of every collected module of that size in ONE launch
    (tests/workers/scenario_batch.py; a launch costs about 8 s on 2 cores, a scenario about 1 s), so
    the tests using this fixture run on one xdist worker (pytest_collection_modifyitems)."""
    launched = {}

    def results(module, nproc):
        if nproc not in launched:
            collected = {item.module.__name__ for item in request.session.items}
            entries, keys = [], []
            for (owner, size), scenarios in sorted(SCENARIOS.items()):
                if size == nproc and owner in collected:
                    for key, (worker, args) in scenarios.items():
                        keys.append((owner, key))
                        entries.append((worker, args))
            root = tmp_path_factory.mktemp(f"scenarios{nproc}")
            launched[nproc] = dict(zip(keys, run_scenarios(None, dict(enumerate(entries)), root, nproc).values()))
        return {key: result for (owner, key), result in launched[nproc].items() if owner == module}

    return results


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


def built_once(tmp_path_factory, name, build):
    """The folder `name`, made by `build(folder)` once per test session, across pytest-xdist workers
    too: the first worker that needs it builds it under a file lock in the session's shared temp
    folder, the others wait and reuse it. Tests read such a folder and never write into it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # pytest-N: shared by the workers of this session (popen-gwK below it)
    folder = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not (folder / ".built").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".built").write_text("")
    return folder


@pytest.fixture
def run_cli(monkeypatch):
    """`embedtrain ARGS` in this process through click's CliRunner: (exit code, output). The error
    path's distributed.shutdown (which ends the process with os._exit) becomes a SystemExit."""
    from click.testing import CliRunner

    import embedtrain.distributed
    from embedtrain.cli import main

    def exit_instead(exit_code=0, wait_for_peers=True):
        raise SystemExit(exit_code)

    monkeypatch.setattr(embedtrain.distributed, "shutdown", exit_instead)

    def run(*args):
        result = CliRunner().invoke(main, [str(a) for a in args])
        return result.exit_code, result.output

    return run


def check_cli(*args):
    result = embedtrain_cli(*args)
    assert result.returncode == 0, f"embedtrain {' '.join(map(str, args))}:\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """The tiny recipe trained 2 steps and exported (instruction prompts): one model for every test
    that only needs some exported model."""

    def build(root):
        check_cli("train", "--config", "tiny", "--output-dir", root / "run", "--set", "train.max_steps=2")
        check_cli("export", root / "run", root / "model")

    return built_once(tmp_path_factory, "tiny_export", build) / "model"


@pytest.fixture(scope="session")
def tiny_colbert_export(tmp_path_factory):
    """The tiny_colbert recipe (model.kind=multi_vector) with query expansion (attend: true, packed)
    trained 4 steps, one log line every 2, and exported with `embedtrain export`: the model folder;
    beside it `run/` (the run) and `train.log` (the training command's stdout). For every test that
    needs some exported multi-vector model."""

    def build(root):
        steps = ["--set", "train.max_steps=4", "--set", "logging.every=2", "--set", "train.save_every=0"]
        expansion = ["--set", "model.multi_vector.query_expansion={attend: true}"]
        train = check_cli("train", "--config", "tiny_colbert", "--output-dir", root / "run", *steps, *expansion)
        (root / "train.log").write_text(train.stdout)
        check_cli("export", root / "run", root / "model")

    return built_once(tmp_path_factory, "tiny_colbert_export", build) / "model"


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory):
    """The tiny recipe as shipped (10 steps) trained and exported: `run/`, `model/` and the training
    command's stdout in `train.log`, for every test that needs a trained model."""

    def build(root):
        train = check_cli("train", "--config", "tiny", "--output-dir", root / "run")
        (root / "train.log").write_text(train.stdout)
        check_cli("export", root / "run", root / "model")

    return built_once(tmp_path_factory, "tiny_trained", build)


@pytest.fixture(scope="session")
def tiny_sparse_trained(tmp_path_factory):
    """The tiny_sparse recipe (model.kind=sparse) with inference-free queries (the learned query table)
    trained 4 steps, one log line each, the FLOPS weight warming up over those 4 steps, and exported:
    `run/` (its checkpoint at step 4), `model/` (a sentence-transformers SparseEncoder folder in the
    Router layout) and the training command's stdout in `train.log`, for every test that needs a
    trained sparse model."""

    def build(root):
        steps = ["--set", "train.max_steps=4", "--set", "logging.every=1", "--set", "model.sparse.flops_warmup_steps=4"]
        steps += ["--set", "model.sparse.inference_free_queries=true"]
        train = check_cli("train", "--config", "tiny_sparse", "--output-dir", root / "run", *steps)
        (root / "train.log").write_text(train.stdout)
        check_cli("export", root / "run", root / "model")

    return built_once(tmp_path_factory, "tiny_sparse_trained", build)


@pytest.fixture(scope="session")
def tiny_llama():
    return ASSETS / "tiny-llama"


@pytest.fixture(scope="session")
def demo_data():
    return ASSETS / "demo-data"


def xdist_group_of(item):
    """The xdist group of a test: "scenario_launch" for the users of the session's shared scenario
    launch, its module's name for the users of a module-scoped fixture (such a fixture runs once
    per worker that runs one of its tests, so they belong on one worker), else None."""
    if "scenario_launch" in getattr(item, "fixturenames", ()):
        return "scenario_launch"
    definitions = getattr(item, "_fixtureinfo", None)
    scopes = {d[-1].scope for d in definitions.name2fixturedefs.values()} if definitions else set()
    return item.module.__name__ if "module" in scopes else None


def pytest_itemcollected(item):
    """Each test's xdist_group marker, set as it is collected: before any pytest_collection_modifyitems
    hook, so pytest-xdist's (which reads the groups, --dist loadgroup in tests/pytest.ini) sees it
    whatever order pytest calls those hooks in (under pytest 9.2 a tryfirst conftest hook came too
    late, and the groups were silently ignored: module fixtures ran on both workers)."""
    group = xdist_group_of(item)
    if group is not None:
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.hookimpl(trylast=True)  # after pytest-xdist's, which marks a grouped test's id with "@group"
def pytest_collection_modifyitems(config, items):
    """The grouped tests go out first (a worker refuses to run when --dist loadgroup would drop the
    groups, rather than silently run every module fixture on both workers); `@pytest.mark.gpu` tests
    need CUDA: skipped when torch.cuda.is_available() is False. EMBEDTRAIN_GPU_TESTS_ON_CPU=1 runs
    them on the CPU instead, to check the tests themselves on a machine without a GPU (it proves
    nothing about the GPU)."""
    import torch

    grouped = {item for item in items if item.get_closest_marker("xdist_group") is not None}
    lost = [item.nodeid for item in grouped if "@" not in item.nodeid]
    if os.environ.get("PYTEST_XDIST_WORKER") and config.getvalue("loadgroup") and lost:
        raise pytest.UsageError(
            f"pytest-xdist's --dist loadgroup did not apply the xdist_group of {lost[0]} (pytest "
            f"{pytest.__version__}): install the test extra's pytest (`pip install -e '.[test]'`, pytest<9.2)"
        )
    items.sort(key=lambda item: item not in grouped)
    if torch.cuda.is_available() or os.environ.get("EMBEDTRAIN_GPU_TESTS_ON_CPU") == "1":
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
