"""tools/bench.py: a quick run of the three trainings writes the report's JSON schema with positive
numbers (no timing assertions), the GPU presets build their configs without a GPU, and the recipe
presets' pure parts (ratios and targets, layers that fit, card peaks, the drawn examples) compute
what they say."""

import argparse
import json
import subprocess
import sys

import pytest

from conftest import REPO, worker_env

BENCH = REPO / "tools" / "bench.py"
sys.path.append(str(REPO / "tools"))
import bench as bench_tool  # noqa: E402
import bench_measure  # noqa: E402
import bench_recipe  # noqa: E402


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
    assert set(report) == {"device", "preset", "date", "runs", "ratios_to_torch_plain"}
    assert report["preset"] == "cpu-tiny"
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
            "micro_step_time_s",
        }
        assert r["tokens_per_s"] >= r["real_tokens_per_s"] > 0 and 0 < r["padding_efficiency"] <= 1
        assert r["peak_memory_gib"] > 0 and r["step_time_s"] > 0 and r["mfu"] is None  # no --peak-tflops on CPU
        assert 0 < r["micro_step_time_s"] <= r["step_time_s"]  # accumulation 1: the step is its micro-step
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
    assert "DeepSpeed: ZeRO-" in run.stdout and "bf16 True" in run.stdout and "passages sampled p10" in run.stdout
    assert not (tmp_path / "model").exists()  # a dry run builds nothing


@pytest.mark.parametrize(
    "preset, expected",
    [
        ("cpu-launch", ["16 layers, hidden 32", "runs: embedtrain, embedtrain_zero3, torch_plain", "-> ZeRO-3"]),
        ("recipe-1b", ["recipe llama3_2_1b as shipped", "all 16 layers", "global batch 128", "micro-batch 16"]),
        ("recipe-8b", ["llama_embed_nemotron_8b as shipped", "8 of 32 layers", "within 50% of 80 GiB"]),
    ],
)
def test_new_presets_plan_without_a_gpu(preset, expected, tmp_path):
    extra = ["--gpu-memory-gib", "80"] if preset == "recipe-8b" else []
    run = bench("--preset", preset, "--dry-run", "--work-dir", tmp_path, *extra, timeout=120)
    assert run.returncode == 0, run.stderr[-4000:]
    for text in expected:
        assert text in run.stdout, (text, run.stdout)
    assert not (tmp_path / "model").exists()


def result(name, micro, step, real=100.0, total=200.0, mfu=None):
    return {
        "name": name,
        "micro_step_time_s": micro,
        "step_time_s": step,
        "real_tokens_per_s": real,
        "tokens_per_s": total,
        "mfu": mfu,
    }


def test_ratios_and_targets():
    spec = {"targets": {"embedtrain": 1.3, "embedtrain_zero3": 2.0}}
    runs = [result("embedtrain", 0.12, 0.5), result("embedtrain_zero3", 0.25, 1.0), result("torch_plain", 0.1, 0.4)]
    out = bench_tool.comparisons(spec, runs)
    assert out["ratios_to_torch_plain"]["embedtrain"] == pytest.approx({"micro_step_time": 1.2, "step_time": 1.25})
    assert out["ratios_to_torch_plain"]["embedtrain_zero3"]["micro_step_time"] == pytest.approx(2.5)
    assert [(t["met"], round(t["value"], 6)) for t in out["targets"]] == [(True, 1.2), (False, 2.5)]
    # the GPU targets: MFU floor, and real tokens/s over torch_plain's total tokens/s
    spec = {"targets": {"mfu": {"embedtrain": 0.4}, "real_tokens_vs_torch_plain": {"embedtrain": 1.3}}}
    runs = [result("embedtrain", 1, 1, real=300.0, mfu=0.41), result("torch_plain", 1, 1, total=200.0)]
    targets = bench_tool.comparisons(spec, runs)["targets"]
    assert [(t["met"], t["value"]) for t in targets] == [(True, 0.41), (True, 1.5)]
    # a run that was not measured: the target is neither met nor missed
    assert bench_tool.comparisons(spec, runs[1:])["targets"][0] == {
        "target": "embedtrain MFU >= 40%",
        "value": None,
        "met": None,
    }


def test_micro_step_times():
    assert bench_measure.micro_step_times(10.0, [10.5, 11.25, 12.0], 3) == [0.5, 0.75, 0.75]
    spread = bench_measure.micro_step_times(0.0, [1.0], 4)  # not every micro-step marked: the step split evenly
    assert len(spread) == 4 and len(set(spread)) == 1


def test_layers_that_fit_and_card_peaks():
    shape = bench_recipe.SHAPES["llama-3.1-8b"]
    # 8 layers of 218M + 525M embedding at 18 B/parameter = 40.9 GB <= half of 80 GiB (the h100-8b preset's size)
    assert bench_recipe.default_layers(shape, 80 * 2**30) == 8
    assert bench_recipe.default_layers(shape, 141 * 2**30) == 16
    assert bench_recipe.default_layers(shape, 1e12) == 32  # never more than the model has
    assert bench_recipe.card_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench_recipe.card_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench_recipe.card_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench_recipe.card_peak_tflops("Some GPU") is None


def test_recipe_examples_are_the_loops_draws(tmp_path):
    """The recipe presets' dataset holds every example with its own passages, and the plain runs'
    examples are what embedtrain's sampler draws for each step: whole global batches of the recipe."""
    args = argparse.Namespace(
        preset="recipe-1b",
        work_dir=str(tmp_path),
        micro_batch=4,
        warmup=1,
        steps=1,
        seed=0,
        peak_tflops=None,
        overrides=["train.global_batch_size=8"],
        layers=None,
        gpu_memory_gib=None,
        tiny_shape=True,
    )
    spec = bench_recipe.build_recipe_spec(args, bench_tool.PRESETS["recipe-1b"])
    spec["model_path"] = str(REPO / "embedtrain" / "assets" / "tiny-llama")
    examples, _ = bench_tool.make_examples(spec)
    bench_recipe.prepare_recipe_data(spec, examples)
    drawn = json.loads((tmp_path / "examples.json").read_text())
    assert len(drawn) == 2 * 8  # (warm-up + timed steps) x the global batch
    known = {(e["query"], tuple(e["passages"])) for e in examples}
    assert all((e["query"], tuple(e["passages"])) in known for e in drawn)  # each query with its own passages
    assert {e["subset"] for e in drawn} <= set(spec["subsets"])
