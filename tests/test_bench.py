"""tools/bench.py: a quick run of the three trainings writes the report's JSON schema with positive
numbers (no timing assertions), and the GPU presets build their configs without a GPU."""

import json
import subprocess
import sys

import pytest

from conftest import REPO, worker_env

BENCH = REPO / "tools" / "bench.py"


def bench(*args, timeout=240):
    return subprocess.run(
        [sys.executable, BENCH, *map(str, args)],
        cwd=REPO,
        env=worker_env(threads=2),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_quick_run_reports_three_runs(tmp_path):
    output = tmp_path / "bench.json"
    run = bench("--preset", "cpu-tiny", "--quick", "--output", output, "--work-dir", tmp_path / "work")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    report = json.loads(output.read_text())
    assert set(report) == {"device", "preset", "date", "runs"} and report["preset"] == "cpu-tiny"
    assert [r["name"] for r in report["runs"]] == ["embedtrain", "deepspeed_plain", "torch_plain"]
    for r in report["runs"]:
        assert set(r) == {
            "name",
            "tokens_per_s",
            "real_tokens_per_s",
            "padding_efficiency",
            "mfu",
            "peak_memory_gib",
            "allgather_bytes_per_step",
            "step_time_s",
        }
        assert r["tokens_per_s"] >= r["real_tokens_per_s"] > 0 and 0 < r["padding_efficiency"] <= 1
        assert r["peak_memory_gib"] > 0 and r["step_time_s"] > 0 and r["mfu"] is None  # no --peak-tflops on CPU
        if r["name"] == "torch_plain":
            assert r["allgather_bytes_per_step"] is None
        else:
            assert isinstance(r["allgather_bytes_per_step"], int) and r["allgather_bytes_per_step"] > 0
    # the same batches for all three: the same real tokens, whatever the padding
    real_per_step = {round(r["real_tokens_per_s"] * r["step_time_s"]) for r in report["runs"]}
    assert max(real_per_step) - min(real_per_step) <= 1, real_per_step
    assert "embedtrain" in run.stdout and "padding eff" in run.stdout


@pytest.mark.parametrize("preset", ["h100-1b", "h100-8b"])
def test_gpu_presets_plan_without_a_gpu(preset, tmp_path):
    run = bench("--preset", preset, "--dry-run", "--work-dir", tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "ZeRO-3, bf16 True" in run.stdout and "passages sampled p10" in run.stdout
    assert not (tmp_path / "model").exists()  # a dry run builds nothing
