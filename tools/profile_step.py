"""Where a bench preset's step spends its time: torch.profiler (and optionally cProfile) over a few
timed steps of one run of any tools/bench.py preset.

    python tools/profile_step.py --cpu --output /tmp/profile.json                 # CI: cpu-launch, embedtrain, 1 step
    python tools/profile_step.py --preset cpu-launch --run embedtrain_zero3 --steps 2 --python
    python tools/profile_step.py --preset recipe-1b --run embedtrain --output profile-1b.json   # on a GPU

The run is built exactly as tools/bench.py builds it (its presets, examples, model and runs, in this
process), warm-up steps first, then the profiled steps. Reported, as a table and as JSON:
  - the top operations by host (self CPU) time and, on CUDA, the top kernels by device time;
  - on CUDA, the fraction of the profiled window in which no kernel ran on the device (the union of
    every kernel's interval against the window's wall time): the device's idle fraction;
  - with --python, the top Python functions by own time (cProfile), which names the hooks and
    loops where host time goes (DeepSpeed's ZeRO-3 module hooks, the coordinator, the loop).
Profiling slows the step; the bench's numbers are measured without it.
"""

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

bench = None  # tools/bench.py (its presets and runs), imported by main(): nothing heavy when imported


def bench_args(args):
    """The namespace tools/bench.py's build_spec reads."""
    return argparse.Namespace(
        preset=args.preset,
        quick=False,
        micro_batch=None,
        accumulation=None,
        warmup=args.warmup,
        steps=args.steps,
        work_dir=args.work_dir,
        seed=0,
        peak_tflops=None,
        overrides=list(args.overrides),
        layers=args.layers,
        gpu_memory_gib=None,
        tiny_shape=False,
    )


class Profiled:
    """The context tools/bench.py's measure() enters around its timed steps."""

    def __init__(self, python):
        import torch

        self.cuda = torch.cuda.is_available()
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=activities)
        import cProfile

        self.python = cProfile.Profile() if python else None
        self.seconds = None

    def __enter__(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        self.profiler.__enter__()
        if self.python:
            self.python.enable()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.started
        if self.python:
            self.python.disable()
        self.profiler.__exit__(*exc)
        return False


def device_busy_seconds(profiler):
    """The union of the CUDA kernels' intervals (seconds)."""
    import torch

    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in profiler.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    )
    busy, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop <= end:
            continue
        busy += stop - max(start, end)
        end = stop
    return busy / 1e6


def summarize(profiled, top):
    averages = profiled.profiler.key_averages()

    def rows(key):
        ordered = sorted(averages, key=lambda e: getattr(e, key), reverse=True)
        return [
            {"name": e.key, "calls": e.count, "seconds": getattr(e, key) / 1e6}
            for e in ordered[:top]
            if getattr(e, key) > 0
        ]

    result = {
        "window_s": profiled.seconds,
        "top_host_ops": rows("self_cpu_time_total"),
        "top_device_kernels": rows("self_device_time_total") if profiled.cuda else [],
        "device_idle_fraction": None,
        "top_python_functions": [],
    }
    if profiled.cuda:
        result["device_idle_fraction"] = max(0.0, 1 - device_busy_seconds(profiled.profiler) / profiled.seconds)
    if profiled.python:
        import pstats

        stats = pstats.Stats(profiled.python)
        functions = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
        result["top_python_functions"] = [
            {
                "name": f"{Path(file).name}:{line}({name})",
                "calls": calls,
                "own_seconds": own,
                "cumulative_seconds": cumulative,
            }
            for (file, line, name), (_, calls, own, cumulative, _) in functions
        ]
    return result


def format_report(report):
    window = report["window_s"]
    lines = [
        f"profile of {report['run']} in preset {report['preset']}: {report['steps']} step(s), window {window:.3f} s; "
        f"{report['device']}; {report['date']}"
    ]
    if report["device_idle_fraction"] is not None:
        lines.append(f"device idle: {report['device_idle_fraction']:.1%} of the window")
    for title, key, seconds in (
        ("top operations by host (self CPU) time", "top_host_ops", "seconds"),
        ("top kernels by device time", "top_device_kernels", "seconds"),
        ("top Python functions by own time (cProfile)", "top_python_functions", "own_seconds"),
    ):
        if not report[key]:
            continue
        lines.append(f"{title}:")
        for row in report[key]:
            lines.append(
                f"  {row[seconds]:>9.4f} s {row[seconds] / window:>6.1%} {row['calls']:>8} calls  {row['name'][:100]}"
            )
    return "\n".join(lines)


def main():
    global bench
    sys.path.append(str(Path(__file__).resolve().parent))
    import bench

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(bench.PRESETS), default="cpu-launch")
    parser.add_argument("--run", default="embedtrain", help=f"one of {', '.join(bench.ALL_RUNS)}")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: the preset's)")
    parser.add_argument("--steps", type=int, default=2, help="profiled optimizer steps (default 2)")
    parser.add_argument("--top", type=int, default=15, help="rows per table")
    parser.add_argument("--python", action="store_true", help="also cProfile the Python functions")
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="the CI form: preset cpu-launch, run embedtrain, 1 warm-up + 1 profiled step, with --python",
    )
    parser.add_argument("--layers", type=int, help="recipe-8b: decoder layers (tools/bench.py --layers)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--work-dir", help="default /tmp/embedtrain-profile/PRESET")
    parser.add_argument("--output", help="write the JSON here")
    args = parser.parse_args()
    if args.cpu:
        args.preset, args.run, args.warmup, args.steps, args.python = "cpu-launch", "embedtrain", 1, 1, True
    if args.run not in bench.ALL_RUNS:
        parser.error(f"--run: {args.run} is not one of {', '.join(bench.ALL_RUNS)}")
    args.work_dir = args.work_dir or str(Path("/tmp/embedtrain-profile") / args.preset)

    spec = bench.build_spec(bench_args(args))
    cuda = bench.has_cuda()
    spec["threads"] = None if cuda else 1
    examples, _ = bench.make_examples(spec)
    work_dir = Path(spec["work_dir"])
    work_dir.mkdir(parents=True, exist_ok=True)
    Path(spec["examples"]).write_text(json.dumps(examples))
    spec_file = work_dir / "spec.json"
    spec_file.write_text(json.dumps(spec))
    if spec["shape"]:
        bench.child(["_model"], spec_file, 1200)
    if spec.get("kind") == "recipe":
        from bench_recipe import prepare_recipe_data

        prepare_recipe_data(spec, examples)
    profiled = Profiled(args.python)
    result = bench.measure(spec, args.run, profile=profiled)
    report = {
        "preset": args.preset,
        "run": args.run,
        "steps": spec["steps"],
        "device": bench.device_name(spec["threads"]),
        "date": datetime.date.today().isoformat(),
        "step_time_s": result["step_time_s"],
        "micro_step_time_s": result["micro_step_time_s"],
        **summarize(profiled, args.top),
    }
    print(format_report(report), flush=True)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
