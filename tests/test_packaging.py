"""A non-editable install (`pip install .`) carries everything a run needs: recipes, assets and the
DeepSpeed configs, found from any directory."""

import subprocess
import sys

from conftest import REPO, worker_env


def test_a_non_editable_install_trains_from_another_directory(tmp_path):
    venv = tmp_path / "venv"
    # the venv sees the installed dependencies, but embedtrain itself only from its own site-packages
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-build-isolation", REPO],
        check=True,
        capture_output=True,
        timeout=300,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = worker_env()
    env.pop("PYTHONPATH")
    where = subprocess.run(
        [python, "-c", "import embedtrain.config as c; print(c.__file__); print(c.DS_CONFIGS_DIR)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert all(path.startswith(str(venv)) for path in where), where
    result = subprocess.run(
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
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 2: loss" in result.stdout
    assert (elsewhere / "run" / "checkpoints" / "latest").read_text().strip() == "step_2"
