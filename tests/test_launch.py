"""Launchers: the deepspeed launcher with a hostfile trains on CPU; the Slurm templates produce the
right commands under a fake Slurm; every shell script parses."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, worker_env

SCRIPTS = sorted((REPO / "launch").rglob("*.sbatch")) + sorted((REPO / "launch").rglob("*.sh")) + [REPO / ".ci" / "run"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_shell_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


def test_deepspeed_launcher_with_a_localhost_hostfile_trains(tmp_path):
    (tmp_path / "hosts").write_text("localhost slots=2\n")
    deepspeed = Path(sys.executable).with_name("deepspeed")
    env = worker_env()
    env["DS_ACCELERATOR"] = "cpu"
    run = subprocess.run(
        [
            str(deepspeed),
            "--hostfile",
            str(tmp_path / "hosts"),
            "--no_ssh_check",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            "29731",
            str(REPO / "launch" / "train.py"),
            "--config",
            "tiny",
            "--output-dir",
            str(tmp_path / "run"),
            "--set",
            "train.max_steps=2",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "2 rank(s)" in run.stdout
    assert (tmp_path / "run" / "checkpoints" / "step_2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()


@pytest.fixture
def fake_slurm(tmp_path):
    """Stub srun and scontrol on PATH, SLURM_* variables of a 2-node job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f'#!/bin/bash\necho "srun $*" >> {tmp_path}/calls\n')
    (bin_dir / "scontrol").write_text(
        f'#!/bin/bash\necho "scontrol $*" >> {tmp_path}/calls\n'
        'if [ "$1 $2" = "show hostnames" ]; then printf "gpu-a01\\ngpu-a02\\n"; fi\n'
    )
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_NNODES="2",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="gpu-a[01-02]",
        SLURM_JOB_NAME="embedtrain",
        SLURM_GPUS_PER_NODE="h100:8",
        SLURM_SUBMIT_DIR=str(REPO),
        RUN_DIR=str(tmp_path / "run"),
    )
    return env, tmp_path


def test_multinode_sbatch_dry_run_prints_the_commands(fake_slurm):
    env, _ = fake_slurm
    run = subprocess.run(
        ["bash", str(REPO / "launch/slurm/train_multinode.sbatch"), "--config", "tiny"],
        env=dict(env, DRY_RUN="1"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    first, command = run.stdout.strip().splitlines()
    assert "MASTER_ADDR=gpu-a01 MASTER_PORT=24242 NNODES=2 GPUS_PER_NODE=8" in first
    assert command.startswith("srun --nodes 2 --ntasks-per-node 1 --kill-on-bad-exit=1")
    assert (
        f"python -m torch.distributed.run --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d "
        f"--rdzv_endpoint gpu-a01:24242 --rdzv_id 4242 {REPO}/launch/train.py"
    ) in command
    assert command.endswith("--config tiny")


def test_multinode_sbatch_runs_srun_and_records_the_job(fake_slurm):
    env, tmp = fake_slurm
    run = subprocess.run(
        ["bash", str(REPO / "launch/slurm/train_multinode.sbatch"), "--config", "tiny"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    calls = (tmp / "calls").read_text()
    assert "scontrol show hostnames gpu-a[01-02]" in calls
    assert "srun --nodes 2 --ntasks-per-node 1" in calls and "--rdzv_endpoint gpu-a01:24242" in calls
    assert (tmp / "run" / "job-4242.sbatch").is_file() and "srun" in (tmp / "run" / "job-4242.command").read_text()


def test_single_node_sbatch_dry_run(fake_slurm):
    env, _ = fake_slurm
    run = subprocess.run(
        ["bash", str(REPO / "launch/slurm/train_single_node.sbatch"), "--config", "tiny"],
        env=dict(env, DRY_RUN="1"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0 and "--standalone --nproc_per_node 8" in run.stdout


@pytest.mark.parametrize("template", ["train_multinode.sbatch", "train_single_node.sbatch"])
def test_sbatch_dry_run_outside_slurm_prints_the_commands(template, tmp_path):
    """The DRY_RUN=1 example of each template's header, on a machine without Slurm; a real run
    there is refused with what to do instead of a bare unset-variable error."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    script = str(REPO / "launch" / "slurm" / template)
    run = subprocess.run(
        ["bash", script, "--config", "tiny"], env=dict(env, DRY_RUN="1"), capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    first, command = run.stdout.strip().splitlines()
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=900" in first  # torchrun waits for the workers' save
    assert "-m torch.distributed.run" in command and command.endswith("--config tiny")
    if template == "train_multinode.sbatch":
        refused = subprocess.run(["bash", script, "--config", "tiny"], env=env, capture_output=True, text=True)
        assert refused.returncode == 2 and "run this under sbatch (or with DRY_RUN=1" in refused.stderr
