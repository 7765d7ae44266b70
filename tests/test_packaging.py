"""A non-editable install (a wheel, as `pip install .` builds it) carries everything a run needs:
recipes, assets and the DeepSpeed configs, found from any directory.

It works from whatever environment runs the suite (the base interpreter, a virtualenv, a conda env):
the wheel is built by the running interpreter, and the nested venv that installs it sees the
running environment's packages through a .pth file, not the base interpreter's
(`--system-site-packages` would show a virtualenv's nested venv the base Python's packages, which
lack torch and often `wheel`)."""

import sys
from pathlib import Path

from conftest import REPO, run_checked, worker_env


def running_site_dirs():
    """The site-packages folders the running interpreter imports from (its venv's and, where that
    venv sees them, the base's), not the repository itself (an editable install's path)."""
    return [path for path in sys.path if path.rstrip("/").endswith(("site-packages", "dist-packages"))]


def test_a_non_editable_install_trains_from_another_directory(tmp_path):
    wheels = tmp_path / "wheels"
    # setuptools >= 70.1 builds wheels itself (the test extra asks for it): no `wheel` package needed
    run_checked([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels, REPO])
    (wheel,) = wheels.glob("embedtrain-*.whl")
    venv = tmp_path / "venv"
    run_checked([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    site = run_checked([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    # after the venv's own site-packages (where embedtrain goes), the running environment's packages;
    # plain path lines: their .pth files (an editable embedtrain's among them) are not processed
    (Path(site) / "running-environment.pth").write_text("\n".join(running_site_dirs()) + "\n")
    run_checked([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = worker_env()
    env.pop("PYTHONPATH")
    where = run_checked(
        [python, "-c", "import embedtrain.config as c; print(c.__file__); print(c.DS_CONFIGS_DIR)"],
        cwd=elsewhere,
        env=env,
    ).stdout.split()
    assert all(path.startswith(str(venv)) for path in where), where
    result = run_checked(
        [
            venv / "bin" / "embedtrain",
            "train",
            "--config",
            "tiny",
            "--output-dir",
            "run",
            "--set",
            "train.max_steps=2",
            "--set",
            "logging.every=1",
        ],
        cwd=elsewhere,
        env=env,
    )
    assert "step 2: loss" in result.stdout
    assert (elsewhere / "run" / "checkpoints" / "latest").read_text().strip() == "step_2"
