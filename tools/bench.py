"""Training throughput: the same model trained on the same batches three ways, each in a fresh process.

    python tools/bench.py --preset cpu-tiny --output /tmp/bench.json      # 2 CPU cores, about 2 minutes
    python tools/bench.py --preset h100-1b --output bench-1b.json         # one H100, about 3 minutes
    python tools/bench.py --preset h100-8b --output bench-8b.json         # one 80 GB GPU, 8 layers of the 8B
    python tools/bench.py --preset h100-8b --dry-run                      # the run's plan only, no GPU needed
    python tools/bench.py --preset cpu-launch --output launch.json        # host time per micro-step, ~1 minute
    python tools/bench.py --preset recipe-1b --output recipe-1b.json      # the 1B recipe as shipped, one GPU
    python tools/bench.py --preset recipe-8b --output recipe-8b.json      # the 8B recipe, the layers that fit

cpu-launch: the 1B recipe's 16 layers at hidden 32 (host overhead dominates), runs embedtrain (the
recipe's `auto` stage), embedtrain_zero3 (ZeRO-3 forced) and torch_plain, one thread each;
micro_step_time_s and the ratios to torch_plain against issue 26's targets (--check: exit 1 when
missed). recipe-1b / recipe-8b: tools/bench_recipe.py (embedtrain.train.loop.train itself).

Runs (the same examples, seed, model weights, DeepSpeed config and AdamW settings):
  embedtrain       the real training step: embedtrain.train.engine.build_engine, micro-batches from the
                   real Collator in whatever format it produces (padded or packed), then
                   embedtrain.train.loop.optimizer_step (micro_batch_backward + engine.step per micro-batch);
  deepspeed_plain  a minimal ZeRO-3 loop (tools/bench_baselines.py): the same model and DeepSpeed
                   config, torch AdamW, each side padded to its longest, queries and passages in two
                   forwards, InfoNCE (embedtrain.losses), activation checkpointing as configured;
  torch_plain      no DeepSpeed, one device: load_backbone + Encoder, torch AdamW, the same padded
                   batches and two forwards, autocast bf16 on CUDA, fp32 on the CPU.

Batches: synthetic texts cut from the demo data's token stream (embedtrain/assets/demo-data, tiny-llama
tokenizer) at lengths drawn from the long-tailed mix of docs/benchmarks.md: passages p10 ~85, p50 ~156,
p90 ~362 tokens (a two-sided log-t, so a few run into the thousands), queries 5-20 tokens plus the
subset's instruction; truncated at the preset's max lengths. Every batch is tokenised before the clock
starts (the real loop collates in DataLoader workers, off the critical path); warm-up steps are not timed.

Per run: tokens/s (every token fed to the model, padding included), real tokens/s (non-padding),
padding efficiency (real / total), MFU = model FLOPs / time / peak, where a sequence of n real tokens
costs n x (6 x non-embedding params + 12 x layers x hidden x n) (the 6N + 12 L h s rule of
embedtrain.plan with each sequence's own length; recomputation not counted), peak memory
(torch.cuda.max_memory_allocated on GPU, peak RSS on the CPU, both over the timed steps), ZeRO-3
all-gather bytes per step and step time (one optimizer step = accumulation micro-batches).

All-gather bytes: the output sizes of every all-gather DeepSpeed's communication backend issues
during the timed steps. On one rank DeepSpeed 0.19 issues none (all_gather_coalesced returns at once
when the partition world size is 1), so the bench also counts what ZeRO-3's parameter coordinator
fetches (full size of every partitioned parameter it gathers) and reports that when no collective
ran: the bytes the same run would all-gather per rank on N ranks (of which (N-1)/N cross the wire).
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench_baselines import run_deepspeed_plain, run_torch_plain
from bench_measure import (
    ASSETS,
    REPO,
    load_run_config,
    make_examples,
    measure_steps,
    model_shape,
    percentiles,
    run_embedtrain,
)

RUNS = ("embedtrain", "deepspeed_plain", "torch_plain")  # a preset's default runs, unless it names its own
ALL_RUNS = (*RUNS, "embedtrain_zero3")  # embedtrain_zero3: the embedtrain step with the preset's zero3_overrides
PEAK_DEFAULT = "the card's dense bf16 (CUDA) / none (CPU)"
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the package's public shapes
from embedtrain.plan import SHAPES  # noqa: E402 (plan imports nothing heavy)

# Steps and micro-batches: the CPU preset takes about 2 minutes for all three runs on 2 cores; the H100
# presets a few minutes on one GPU (model build and load included). hard negatives 4: 1 + 4 passages.
PRESETS = {
    "cpu-tiny": dict(
        recipe="tiny",
        model="assets:tiny-llama",
        query_max_length=64,
        passage_max_length=256,
        micro_batch=8,
        accumulation=2,
        warmup=2,
        steps=8,
        bf16=False,
    ),
    "h100-1b": dict(
        recipe="llama3_2_1b",
        shape=SHAPES["llama-3.2-1b"],
        query_max_length=512,
        passage_max_length=512,
        micro_batch=16,
        accumulation=1,
        warmup=2,
        steps=10,
        bf16=True,
    ),
    # 8 of Llama-3.1-8B's 32 layers: 2.27B parameters, 41 GB of ZeRO-3 model states (18 bytes each) and
    # 36 GB for torch_plain (fp32 weights, gradients, Adam), which leaves activation room on 80 GB
    "h100-8b": dict(
        recipe="llama_embed_nemotron_8b",
        shape=dict(SHAPES["llama-3.1-8b"], num_hidden_layers=8),
        query_max_length=512,
        passage_max_length=512,
        micro_batch=8,
        accumulation=1,
        warmup=2,
        steps=8,
        bf16=True,
    ),
}
# The 1B recipe's layout (16 Llama decoder layers, GQA 4:1, tied embeddings, MLP 4 x hidden) at a width
# where a micro-step's arithmetic is a few milliseconds: what is left is host time per micro-step
# (Python, hooks, kernel launches), the cost that ZeRO-3's per-module hooks add.
LAUNCH_SHAPE = dict(
    vocab_size=1024,  # the tiny tokenizer's ids
    hidden_size=32,
    intermediate_size=128,
    num_hidden_layers=16,
    num_attention_heads=4,
    num_key_value_heads=1,
    tie_word_embeddings=True,
)
PRESETS["cpu-launch"] = dict(
    recipe="llama3_2_1b",
    shape=LAUNCH_SHAPE,
    query_max_length=32,
    passage_max_length=32,
    micro_batch=4,  # the recipe's micro-batch in queries
    accumulation=4,
    warmup=2,
    steps=4,
    bf16=False,
    runs=("embedtrain", "embedtrain_zero3", "torch_plain"),
    # ZeRO-3 forced: the explicit config (explicit configs win over `auto`)
    zero3_overrides=["deepspeed.config=zero3.json"],
    targets={"embedtrain": 1.3, "embedtrain_zero3": 2.0},
)
# The shipped recipes as `embedtrain train` runs them (tools/bench_recipe.py): random weights of the
# recipe's model shape, the length mix above, the recipe's global batch of 128 queries per step.
# plain_micro_batch: the plain runs' micro-batch in queries (the h100-* presets' sizes, which fit 80 GB).
PRESETS["recipe-1b"] = dict(
    kind="recipe",
    recipe="llama3_2_1b",
    shape="llama-3.2-1b",
    plain_micro_batch=16,
    warmup=1,
    steps=3,
    runs=("embedtrain", "deepspeed_plain", "torch_plain"),
    targets={"mfu": {"embedtrain": 0.40}, "real_tokens_vs_torch_plain": {"embedtrain": 1.3}},
)
# As many of the 8B's 32 layers as fit one GPU (bench_recipe.default_layers, or --layers).
PRESETS["recipe-8b"] = dict(
    kind="recipe",
    recipe="llama_embed_nemotron_8b",
    shape="llama-3.1-8b",
    fit_layers=True,
    plain_micro_batch=8,
    warmup=1,
    steps=2,
    runs=("embedtrain", "deepspeed_plain", "torch_plain"),
    targets={"mfu": {"embedtrain": 0.40}},
)
QUICK = dict(micro_batch=2, accumulation=1, warmup=1, steps=2, passage_max_length=128)  # the smoke test


# ----------------------------------------------------------------------------------------------------
# The driver


def measure(spec, name, profile=None):
    """Run `name` in this process and return its metrics: a recipe preset's embedtrain run through
    embedtrain's own loop (bench_recipe.measure_recipe), every other run as its step builder (the
    embedtrain step or a plain baseline) over the shared timed loop (bench_measure.measure_steps).
    `profile`, when given, is a context manager entered around the timed steps (tools/profile_step.py)."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])  # one thread: the comparison measures host overhead
    if spec.get("kind") == "recipe" and name == "embedtrain":
        from bench_recipe import measure_recipe

        return measure_recipe(spec, name, profile)
    builders = {
        "embedtrain": run_embedtrain,
        "embedtrain_zero3": run_embedtrain,  # with the preset's zero3_overrides (load_run_config)
        "deepspeed_plain": run_deepspeed_plain,
        "torch_plain": run_torch_plain,
    }
    return measure_steps(spec, name, builders[name], profile)


def build_spec(args):
    if PRESETS[args.preset].get("kind") == "recipe":
        from bench_recipe import build_recipe_spec

        return build_recipe_spec(args, PRESETS[args.preset])
    preset = dict(PRESETS[args.preset])
    if args.quick:
        preset.update(QUICK)
    for key in ("micro_batch", "accumulation", "warmup", "steps"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    work_dir = Path(args.work_dir or Path("/tmp/embedtrain-bench") / args.preset).resolve()
    if "model" in preset:
        model_path = str(ASSETS / preset["model"].split(":", 1)[1])
    else:
        model_path = str(work_dir / "model")
    return {
        "preset": args.preset,
        "recipe": preset["recipe"],
        "model_path": model_path,
        "shape": preset.get("shape"),
        "query_max_length": preset["query_max_length"],
        "passage_max_length": preset["passage_max_length"],
        "micro_batch": preset["micro_batch"],
        "accumulation": preset["accumulation"],
        "warmup": preset["warmup"],
        "steps": preset["steps"],
        "hard_negatives": 4,
        "seed": args.seed,
        "bf16": preset["bf16"],
        # the tiny model's parameters are all below DeepSpeed's default threshold: 0 really partitions them;
        # the launch proxy's threshold is its hidden size: its norms persist and every matrix is partitioned,
        # as in the 1B model under zero3.json (norms 2,048 elements, threshold 100,000, matrices >= 1M)
        "persistence_threshold": {"cpu-tiny": 0, "cpu-launch": LAUNCH_SHAPE["hidden_size"]}.get(args.preset),
        "runs": list(preset.get("runs", RUNS)),
        "zero3_overrides": list(preset.get("zero3_overrides", [])),
        "targets": preset.get("targets", {}),
        "peak_tflops": args.peak_tflops,
        "work_dir": str(work_dir),
        "overrides": list(args.overrides),
        "examples": str(work_dir / "examples.json"),
    }


def make_model(spec):
    """A random-init Llama of the preset's shape with the tiny tokenizer beside it (ids < 1,024 are
    valid in any Llama vocabulary). Built on the GPU when there is one; reused when already written."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    folder = Path(spec["model_path"])
    marker = folder / "bench-shape.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec["shape"]:
        return
    shutil.rmtree(folder, ignore_errors=True)
    config = LlamaConfig(  # a LlamaModel has no output layer: tying the embeddings changes nothing here
        **{"tie_word_embeddings": False, **spec["shape"]},
        max_position_embeddings=8192,
        rope_theta=500000.0,
        bos_token_id=1022,
        eos_token_id=1023,
    )
    torch.manual_seed(spec["seed"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaModel(config)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ASSETS / "tiny-llama" / name, folder / name)
    marker.write_text(json.dumps(spec["shape"]))


def child(command, spec_file, timeout, threads=None):
    """Run `tools/bench.py <command> SPEC` in a fresh process; its RESULT line, parsed."""
    env = dict(
        os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", TOKENIZERS_PARALLELISM="false"
    )
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # each run is its own 1-process group on a free port
    result = subprocess.run(
        [sys.executable, __file__, *command, str(spec_file)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    for line in result.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(
        f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    )


def has_cuda():
    import torch

    return torch.cuda.is_available()


def device_name(threads=None):
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
    model = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").is_file()
        else ""
    )
    return f"{len(os.sched_getaffinity(0))}-core CPU ({model}), no GPU" + (
        f"; runs on {threads} thread(s)" if threads else ""
    )


def describe(spec, passage_lengths):
    """The run's plan: what the three runs will train on, and the DeepSpeed config they share."""
    from embedtrain.config import deepspeed_config
    from embedtrain.errors import ConfigError
    from embedtrain.plan import Shape

    if spec.get("kind") == "recipe":
        from bench_recipe import describe_recipe

        return describe_recipe(spec, passage_lengths)
    config = load_run_config(spec)
    if spec["shape"]:
        shape = Shape(**{k: v for k, v in spec["shape"].items() if k != "tie_word_embeddings"})
    else:
        shape = model_shape(spec["model_path"])
    try:
        ds = deepspeed_config(config, 1)
        resolved = lambda extra=(): deepspeed_config(load_run_config(spec, extra), 1)  # noqa: E731
    except ConfigError as err:  # `auto` sizes the model from its folder, which a dry run does not build
        print(f"  (DeepSpeed config resolved at start: {err})", flush=True)
        ds = deepspeed_config(
            load_run_config(spec, ["deepspeed.config=zero3.json", "train.activation_checkpointing=true"]), 1
        )
        ds["zero_optimization"]["stage"] = f"{config.deepspeed.get('config')} (resolved at start)"
        resolved = lambda extra=(): deepspeed_config(  # noqa: E731 - an explicit JSON resolves without the model
            load_run_config(spec, [*extra, "train.activation_checkpointing=true"]), 1
        )
    lengths = percentiles(passage_lengths)
    over = sum(n > spec["passage_max_length"] for n in passage_lengths) / len(passage_lengths)
    return "\n".join(
        [
            f"preset {spec['preset']}: recipe {spec['recipe']}, model {spec['model_path']}"
            + (" (built on first use)" if spec["shape"] else ""),
            f"  shape: {shape.num_hidden_layers} layers, hidden {shape.hidden_size}, "
            f"{shape.params / 1e6:,.2f}M parameters "
            f"({shape.non_embedding_params / 1e6:,.2f}M non-embedding); model FLOPs at 512 tokens "
            f"{shape.flops_per_token(512) / 1e6:,.2f} MFLOP/token",
            f"  batches: micro-batch {spec['micro_batch']} queries x (1 + {spec['hard_negatives']}) passages, "
            "accumulation "
            f"{spec['accumulation']}, {spec['warmup']} warm-up + {spec['steps']} timed steps, seed {spec['seed']}",
            f"  lengths: query 5-20 tokens + instruction (max {spec['query_max_length']}); passages sampled p10 "
            f"{lengths[10]:.0f}, p50 {lengths[50]:.0f}, p90 {lengths[90]:.0f}, max {max(passage_lengths):,}, "
            f"{over:.1%} truncated at {spec['passage_max_length']}",
            f"  DeepSpeed: ZeRO-{ds['zero_optimization']['stage']}, bf16 {ds.get('bf16', {}).get('enabled', False)}, "
            f"activation checkpointing {config.train.activation_checkpointing}, persistence threshold "
            f"{ds['zero_optimization'].get('stage3_param_persistence_threshold')}, "
            f"micro {ds['train_micro_batch_size_per_gpu']} x accumulation {ds['gradient_accumulation_steps']}",
            f"  runs: {', '.join(spec['runs'])}, each in a fresh process; "
            f"peak {spec['peak_tflops'] or PEAK_DEFAULT} "
            "TFLOP/s for MFU",
        ]
        + [
            f"  embedtrain_zero3: {' '.join(spec['zero3_overrides'])} -> ZeRO-"
            f"{resolved(spec['zero3_overrides'])['zero_optimization']['stage']}"
            for _ in [1]
            if "embedtrain_zero3" in spec["runs"]
        ]
    )


def format_table(report):
    lines = [
        f"device: {report['device']}; preset {report['preset']}; {report['date']}",
        f"{'run':<16} {'tokens/s':>10} {'real tok/s':>10} {'padding eff':>11} {'MFU':>7} {'peak GiB':>9} "
        f"{'all-gather/step':>15} {'step s':>8} {'micro-step ms':>13}",
    ]
    for run in report["runs"]:
        mfu = "-" if run["mfu"] is None else f"{run['mfu']:.1%}"
        gathered = run["allgather_bytes_per_step"]
        gathered = "-" if gathered is None else f"{gathered / 1e6:,.2f} MB"
        lines.append(
            f"{run['name']:<16} {run['tokens_per_s']:>10,.0f} {run['real_tokens_per_s']:>10,.0f} "
            f"{run['padding_efficiency']:>11.1%} {mfu:>7} {run['peak_memory_gib']:>9.2f} {gathered:>15} "
            f"{run['step_time_s']:>8.3f} {run['micro_step_time_s'] * 1e3:>13.1f}"
        )
    for name, ratios in report.get("ratios_to_torch_plain", {}).items():
        lines.append(
            f"{name} / torch_plain: micro-step time {ratios['micro_step_time']:.2f}x, "
            f"step time {ratios['step_time']:.2f}x"
        )
    for entry in report.get("targets", []):
        value = "not measured" if entry["value"] is None else f"{entry['value']:.3g}"
        verdict = {True: "met", False: "MISSED", None: "-"}[entry["met"]]
        lines.append(f"target {entry['target']}: {value} {verdict}")
    return "\n".join(lines)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "_model":
        make_model(json.loads(Path(sys.argv[2]).read_text()))
        print("RESULT {}", flush=True)
        return
    if len(sys.argv) == 4 and sys.argv[1] == "_run":
        result = measure(json.loads(Path(sys.argv[3]).read_text()), sys.argv[2])
        print("RESULT " + json.dumps(result), flush=True)
        if sys.argv[2] != "torch_plain":
            from embedtrain import distributed

            distributed.shutdown()
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-tiny")
    parser.add_argument("--output", help="write the results as JSON here")
    parser.add_argument(
        "--runs",
        default=None,
        help=f"comma-separated subset of {', '.join(ALL_RUNS)} (default: the preset's, e.g. {', '.join(RUNS)})",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 when a target of the preset (issue 26) is missed; without it the report only says so",
    )
    parser.add_argument("--steps", type=int, help="timed optimizer steps (default: the preset's)")
    parser.add_argument("--warmup", type=int, help="untimed optimizer steps first (default: the preset's)")
    parser.add_argument("--micro-batch", type=int, help="queries per micro-batch (default: the preset's)")
    parser.add_argument("--accumulation", type=int, help="micro-batches per optimizer step (default: the preset's)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test: micro-batch 2, 1 warm-up + 2 timed steps, passages cut at 128 tokens",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak for MFU (default: 989, the H100's dense bf16, on CUDA; no MFU on the CPU)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for all three runs, as for embedtrain train (e.g. "
        "deepspeed.zero_optimization.stage3_max_reuse_distance=0)",
    )
    parser.add_argument(
        "--layers", type=int, help="recipe-8b: decoder layers of the 8B (default: as many as fit the GPU)"
    )
    parser.add_argument(
        "--gpu-memory-gib",
        type=float,
        help="recipe-8b: the card's memory for the default --layers (default: nvidia-smi's; 80 GB without)",
    )
    parser.add_argument("--tiny-shape", action="store_true", help=argparse.SUPPRESS)  # recipe presets on a CPU
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", help="examples and built models (default /tmp/embedtrain-bench/PRESET)")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per run")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS of every run (default: 1 without a GPU: on a shared 2-core machine a "
        "2-thread torch step measured 5x slower than a 1-thread one whenever another process "
        "held a core; unset on GPU)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run the three ways this many times, interleaved, and report each one's median-step-time "
        "run (a shared CPU machine varies by 20-30 %% from one process to the next)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the run's plan and exit (no model, no GPU)")
    args = parser.parse_args()
    spec = build_spec(args)
    if args.runs:
        spec["runs"] = args.runs.split(",")
    unknown = sorted(set(spec["runs"]) - set(ALL_RUNS))
    if unknown:
        parser.error(f"--runs: unknown {', '.join(unknown)}; choose from {', '.join(ALL_RUNS)}")
    threads = args.threads
    if threads is None and not has_cuda():
        threads = 1
    spec["threads"] = threads
    examples, passage_lengths = make_examples(spec)
    if args.dry_run:
        print(describe(spec, passage_lengths), flush=True)
        return 0
    work_dir = Path(spec["work_dir"])
    work_dir.mkdir(parents=True, exist_ok=True)
    Path(spec["examples"]).write_text(json.dumps(examples))
    spec_file = work_dir / "spec.json"
    spec_file.write_text(json.dumps(spec))
    if spec["shape"]:  # first: `auto` configs size the model from its folder
        started = time.perf_counter()
        child(["_model"], spec_file, args.timeout)
        print(f"model ready in {time.perf_counter() - started:.0f} s: {spec['model_path']}", flush=True)
    print(describe(spec, passage_lengths), flush=True)
    if spec.get("kind") == "recipe":
        from bench_recipe import prepare_recipe_data

        prepare_recipe_data(spec, examples)
        spec_file.write_text(json.dumps(spec))
    measured = {name: [] for name in spec["runs"]}
    for _ in range(args.repeats):  # interleaved: a slow spell of the machine hits every way alike
        for name in spec["runs"]:
            started = time.perf_counter()
            result = child(["_run", name], spec_file, args.timeout, threads)
            notes = result.pop("_notes")
            measured[name].append(result)
            print(
                f"{name}: {time.perf_counter() - started:.0f} s wall, {notes['timed_steps']} timed steps, "
                f"{result['step_time_s']:.3f} s/step, {notes['micro_steps']} micro-steps "
                f"(median {result['micro_step_time_s'] * 1e3:.1f} ms), "
                f"{notes['real_tokens']:,} real of {notes['total_tokens']:,} tokens"
                + (f", all-gather bytes from {notes['allgather_source']}" if notes["allgather_source"] else "")
                + (f", same examples as drawn: {notes['same_examples']}" if "same_examples" in notes else "")
                + (f", {notes['micro_steps_per_step']:.1f} micro-steps/step" if "same_examples" in notes else ""),
                flush=True,
            )
    # each way's run with the median step time (the upper median for an even count)
    results = [
        sorted(measured[name], key=lambda r: r["step_time_s"])[len(measured[name]) // 2] for name in spec["runs"]
    ]
    report = {
        "device": device_name(threads),
        "preset": args.preset,
        "date": datetime.date.today().isoformat(),
        "runs": results,
    }
    report.update(comparisons(spec, results))
    if spec.get("kind") == "recipe":
        from bench_recipe import environment

        report["environment"] = environment()
    print(format_table(report))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    missed = [t for t in report.get("targets", []) if t["met"] is False]
    if args.check and missed:
        print("targets missed: " + "; ".join(t["target"] for t in missed), file=sys.stderr)
        return 1
    return 0


def comparisons(spec, results):
    """Ratios to torch_plain (host time per micro-step; step time) and the preset's targets, each
    with its measured value and whether it is met (None when a run it needs was not measured).

    spec["targets"]: {run: limit} bounds run's micro_step_time_s / torch_plain's; {"mfu": {run: floor}}
    bounds a run's MFU; {"real_tokens_vs_torch_plain": {run: floor}} bounds a run's real tokens/s over
    torch_plain's total tokens/s."""
    by_name = {r["name"]: r for r in results}
    base = by_name.get("torch_plain")
    out = {}
    if base:
        out["ratios_to_torch_plain"] = {
            r["name"]: {
                "micro_step_time": r["micro_step_time_s"] / base["micro_step_time_s"],
                "step_time": r["step_time_s"] / base["step_time_s"],
            }
            for r in results
            if r["name"] != "torch_plain"
        }
    targets = []
    for key, bound in spec.get("targets", {}).items():
        if key == "mfu":
            for run, floor in bound.items():
                value = by_name[run]["mfu"] if run in by_name else None
                targets.append(target(f"{run} MFU >= {floor:.0%}", value, lambda v, f=floor: v >= f))
        elif key == "real_tokens_vs_torch_plain":
            for run, floor in bound.items():
                value = by_name[run]["real_tokens_per_s"] / base["tokens_per_s"] if run in by_name and base else None
                targets.append(
                    target(f"{run} real tokens/s >= {floor}x torch_plain tokens/s", value, lambda v, f=floor: v >= f)
                )
        else:
            value = out.get("ratios_to_torch_plain", {}).get(key, {}).get("micro_step_time")
            targets.append(target(f"{key} micro-step time <= {bound}x torch_plain", value, lambda v, b=bound: v <= b))
    if targets:
        out["targets"] = targets
    return out


def target(text, value, test):
    return {"target": text, "value": value, "met": None if value is None else bool(test(value))}


if __name__ == "__main__":
    sys.exit(main())
