"""tools/bench.py's recipe presets (recipe-1b, recipe-8b): a shipped recipe trained exactly as
`embedtrain train` trains it, beside the plain loops on the same examples.

The `embedtrain` run calls embedtrain.train.loop.train(config, on_step) itself: the recipe's
DeepSpeed config (`auto` or a JSON, resolved by embedtrain on the card), its token budget
(train.micro_batch_tokens) or micro-batch, its global batch, its activation checkpointing, its
DataLoader and collator; only model.path (random weights of the recipe's model shape), data.path
(the bench's examples written as a prepared dataset) and the run folder are set, and
train.max_steps is set past the measured steps (the bench stops the loop from on_step, so no
checkpoint is written). Step time is the interval between consecutive on_step calls (on_step
follows the loop's own host read of the step's loss, so each interval ends with the GPU idle).
Tokens are counted from the collated micro-batches (embedtrain.data.collate.encoder_parts, the
loop's own accounting), micro-steps from DeepSpeed's engine.step calls.

The plain runs (`torch_plain`, `deepspeed_plain`, tools/bench_baselines.py) train the same examples,
global batch by global batch, in micro-batches of the preset's `plain_micro_batch` queries.

The examples: the bench's long-tailed length mix (tools/bench_measure.py make_examples), one prepared
subset per subset name the recipe trains on, each query with its own 1 + hard_negatives passages.
Which example each step trains on is drawn by embedtrain's own Sampler and StepBatches (the
recipe's seed, mixing, positive sampling); the embedtrain run checks that it trained on exactly
those examples (`_notes.same_examples`).
"""

import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from embedtrain.plan import SHAPES  # noqa: E402

# Dense bf16 peaks (TFLOP/s, without sparsity) from the vendors' datasheets, matched in order against
# torch.cuda.get_device_name(): the H100/H200 SXM and NVL/PCIe variants differ.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # H100 SXM5 80GB ("NVIDIA H100 80GB HBM3")
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
)
LAYER_BYTES_PER_PARAM = 18  # model states per parameter on one GPU (embedtrain.plan: ZeRO with bf16 + fp32 Adam)
STATES_FRACTION = 0.5  # of the card's memory for model states; the rest for activations and the plain runs


def card_peak_tflops(name=None):
    """The dense bf16 peak of the current CUDA card, or None for a card not in PEAK_TFLOPS."""
    if name is None:
        import torch

        name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def nvidia_smi(query):
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0].strip() if out.returncode == 0 and out.stdout.strip() else None


def environment():
    """Card, driver, software and date, as the JSON records them."""
    import deepspeed
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if cuda else None
    return {
        "card": name,
        "card_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
        "peak_bf16_tflops": card_peak_tflops(name) if cuda else None,
        "driver": nvidia_smi("driver_version"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def card_memory_bytes():
    """The GPU's memory from nvidia-smi (no CUDA context in the driver process), else None."""
    mib = nvidia_smi("memory.total")
    return int(float(mib)) * 2**20 if mib else None


def default_layers(shape, memory_bytes):
    """As many decoder layers of `shape` as fit one GPU of `memory_bytes`: model states at 18 bytes
    per parameter (bf16 weights and gradients, fp32 master weights and Adam moments; torch_plain's
    fp32 weights, gradients and Adam take 16) within half the memory, the other half left for the
    activations of the token budget and the plain runs' padded micro-batches. 80 GB H100: 8 layers
    (the h100-8b preset's 8 layers peaked at 43.6 GiB); 141 GB H200: 16."""
    from embedtrain.shape import Shape

    full = Shape(**{k: v for k, v in shape.items() if k != "tie_word_embeddings"})
    embedding = full.params - full.non_embedding_params
    per_layer = full.non_embedding_params / full.num_hidden_layers
    budget = STATES_FRACTION * memory_bytes / LAYER_BYTES_PER_PARAM - embedding
    return max(1, min(full.num_hidden_layers, int(budget // per_layer)))


def build_recipe_spec(args, preset):
    """The spec of a recipe preset (tools/bench.py PRESETS: kind "recipe")."""
    import yaml

    from embedtrain.config import recipe_path

    recipe = yaml.safe_load(recipe_path(preset["recipe"]).read_text())
    shape = dict(SHAPES[preset["shape"]])
    layers_note = f"all {shape['num_hidden_layers']} layers"
    if preset.get("fit_layers"):
        if args.layers:
            layers, layers_note = args.layers, f"{args.layers} of {shape['num_hidden_layers']} layers (--layers)"
        else:
            memory = (args.gpu_memory_gib * 2**30) if args.gpu_memory_gib else card_memory_bytes()
            source = "--gpu-memory-gib" if args.gpu_memory_gib else "nvidia-smi"
            if memory is None:
                memory, source = 80 * 10**9, "no GPU found: an 80 GB card assumed"
            layers = default_layers(shape, memory)
            layers_note = (
                f"{layers} of {shape['num_hidden_layers']} layers: model states (18 B/parameter) within "
                f"{STATES_FRACTION:.0%} of {memory / 2**30:.0f} GiB ({source}; --layers to choose)"
            )
        shape["num_hidden_layers"] = layers
    if args.tiny_shape:  # the CPU smoke test of this machinery (tests/test_bench.py): the launch proxy's width
        from bench import LAUNCH_SHAPE

        shape, layers_note = dict(LAUNCH_SHAPE), "--tiny-shape: the cpu-launch preset's 16 layers of width 32"
    settings = dict(o.split("=", 1) for o in args.overrides if "=" in o)
    global_batch = int(settings.get("train.global_batch_size", recipe["train"]["global_batch_size"]))
    plain = args.micro_batch or preset["plain_micro_batch"]
    if global_batch % plain:
        raise SystemExit(f"--micro-batch {plain} does not divide the recipe's global batch {global_batch}")
    work_dir = Path(args.work_dir or Path("/tmp/embedtrain-bench") / args.preset).resolve()
    return {
        "preset": args.preset,
        "kind": "recipe",
        "recipe": preset["recipe"],
        "model_path": str(work_dir / "model"),
        "shape": shape,
        "layers_note": layers_note,
        "query_max_length": recipe["data"]["query_max_length"],
        "passage_max_length": recipe["data"]["passage_max_length"],
        "subsets": recipe["data"].get("subsets"),
        "global_batch": global_batch,
        "micro_batch": plain,  # the plain runs' micro-batch (queries)
        "accumulation": global_batch // plain,
        "warmup": args.warmup if args.warmup is not None else preset["warmup"],
        "steps": args.steps if args.steps is not None else preset["steps"],
        "hard_negatives": recipe["loss"]["hard_negatives"],
        "seed": args.seed,
        "bf16": True,
        "persistence_threshold": None,
        "peak_tflops": args.peak_tflops,
        "work_dir": str(work_dir),
        "data_path": str(work_dir / "data"),
        "overrides": list(args.overrides),
        "examples": str(work_dir / "examples.json"),
        "runs": list(preset["runs"]),
        "zero3_overrides": [],
        "targets": preset.get("targets", {}),
    }


def recipe_config(spec, plain):
    """The recipe as shipped, on the bench's model and data. The plain runs' config sizes
    micro-batches in queries (spec micro_batch, token budget off); the embedtrain run's is the
    recipe's own."""
    from bench_measure import token_budget_off

    from embedtrain.config import load_config

    overrides = [f"model.path={spec['model_path']}", f"data.path={spec['data_path']}"]
    if plain:
        overrides += [f"train.micro_batch_size={spec['micro_batch']}", *token_budget_off()]
    else:
        overrides += [f"train.max_steps={spec['warmup'] + spec['steps'] + 1}", "train.save_every=0"]
    run = Path(spec["work_dir"]) / ("run_plain" if plain else "run")
    if not plain:
        shutil.rmtree(run, ignore_errors=True)  # a fresh run folder: never a resume
    return load_config(spec["recipe"], overrides + spec["overrides"], output_dir=str(run))


def prepare_recipe_data(spec, examples):
    """Write the examples as a prepared dataset at spec data_path, then draw every step's examples the
    way the loop will (embedtrain's Sampler and StepBatches) and save them, in order, as the plain
    runs' examples (global batch after global batch)."""
    import pyarrow as pa
    from bench_measure import subset_info

    from embedtrain.data.nemotron import content_hash
    from embedtrain.data.shards import CORPUS_SCHEMA, FORMAT, MANIFEST, QUERY_SCHEMA, write_sharded
    from embedtrain.data.stream import StepBatches
    from embedtrain.train.loop import make_sampler

    out = Path(spec["data_path"])
    shutil.rmtree(out, ignore_errors=True)
    names = spec["subsets"] or sorted({e["subset"] for e in examples})
    info = subset_info()
    subsets = {}
    for index, name in enumerate(names):
        # each recipe subset takes every len(names)-th example: all of them are used
        mine = examples[index :: len(names)]
        docs = [p for e in mine for p in e["passages"]]
        group = 1 + spec["hard_negatives"]
        folder = out / name
        folder.mkdir(parents=True)
        corpus = pa.table({"id": [f"d{i}" for i in range(len(docs))], "text": docs}, schema=CORPUS_SCHEMA)
        queries = pa.table(
            {
                "question_id": [f"q{i}" for i in range(len(mine))],
                "question": [e["query"] for e in mine],
                "corpus": [name] * len(mine),
                "positives": [[group * i] for i in range(len(mine))],
                "positive_hashes": [[content_hash(docs[group * i])] for i in range(len(mine))],
                "negs": [list(range(group * i + 1, group * (i + 1))) for i in range(len(mine))],
                "length": [len(e["query"]) + sum(map(len, e["passages"])) for e in mine],
            },
            schema=QUERY_SCHEMA,
        )
        meta = info.get(name, next(iter(info.values())))
        subsets[name] = {
            "corpus_id": name,
            "query_instruction": meta.get("query_instruction", ""),
            "passage_instruction": meta.get("passage_instruction", ""),
            "task_type": meta.get("task_type", "Retrieval"),
            "num_queries": len(mine),
            "num_docs": len(docs),
            "skipped_rows": 0,
            "corpus_shards": write_sharded(folder, "corpus", corpus, 256 << 20),
            "query_shards": write_sharded(folder, "queries", queries, 256 << 20),
        }
    (out / MANIFEST).write_text(json.dumps({"format": FORMAT, "source": "tools/bench.py", "subsets": subsets}))

    from embedtrain.data.shards import PreparedDataset

    config = recipe_config(spec, plain=True)
    dataset = PreparedDataset(out, config.data.subsets)
    batches = StepBatches(
        dataset,
        make_sampler(config, dataset),
        None,
        0,
        1,
        config.train.micro_batch_size,
        config.loss.hard_negatives,
        0,
        spec["warmup"] + spec["steps"],
        length_bucketing=config.data.length_bucketing,
        positive_sampling=config.data.positive_sampling,
    )
    drawn = [
        {"subset": e.subset, "query": e.query, "passages": list(e.passages)}
        for step in range(spec["warmup"] + spec["steps"])
        for micro in batches.examples(step)
        for e in micro
    ]
    if len(drawn) != spec["global_batch"] * (spec["warmup"] + spec["steps"]):
        raise RuntimeError(f"drew {len(drawn)} examples for {spec['warmup'] + spec['steps']} global batches")
    Path(spec["examples"]).write_text(json.dumps(drawn))


class Done(Exception):
    """Raised from on_step after the last measured step: ends embedtrain's loop before its final save."""


def measure_recipe(spec, name, profile=None):
    """The `embedtrain` run of a recipe preset: embedtrain.train.loop.train as `embedtrain train` runs it."""
    import contextlib

    import bench_measure
    import torch

    from embedtrain import distributed
    from embedtrain.train import loop

    config = recipe_config(spec, plain=False)
    distributed.init_distributed()  # the loop's own call then finds the group made
    counter = bench_measure.GatherCounter()
    counter.install()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    peak = bench_measure.PeakMemory(device)
    original = loop.optimizer_step
    state = {"timing": False, "counts": [], "micro_steps": [], "ticks": [], "examples": [], "timed": set()}
    profiler = profile if profile is not None else contextlib.nullcontext()

    def counted(engine, micro_batches, *args, **kwargs):  # optimizer_step's stable leading parameters
        if id(engine) not in state["timed"]:
            bench_measure.time_micro_steps(engine)
            state["timed"].add(id(engine))
        bench_measure.MICRO_STEP_ENDS.clear()
        began = time.perf_counter()
        result = original(engine, micro_batches, *args, **kwargs)
        if state["timing"]:
            state["counts"] += [batch_tokens(batch) for batch in micro_batches]
            state["micro_steps"] += bench_measure.micro_step_times(
                began, bench_measure.MICRO_STEP_ENDS, len(micro_batches)
            )
        return result

    def on_step(step, stats, examples):
        state["ticks"].append(time.perf_counter())
        state["examples"] += [
            {"subset": e.subset, "query": e.query, "passages": list(e.passages)} for micro in examples for e in micro
        ]
        done = len(state["ticks"])
        if done == spec["warmup"]:
            if cuda:
                torch.cuda.synchronize()
            peak.reset()
            counter.counting = state["timing"] = True
            profiler.__enter__()
            state["ticks"][-1] = time.perf_counter()
        elif done == spec["warmup"] + spec["steps"]:
            profiler.__exit__(None, None, None)
            counter.counting = state["timing"] = False
            raise Done

    loop.optimizer_step = counted
    try:
        loop.train(config, on_step)
    except Done:
        pass
    finally:
        loop.optimizer_step = original
    ticks = state["ticks"][spec["warmup"] - 1 :]
    real, total, squares = (sum(c[i] for c in state["counts"]) for i in range(3))
    drawn = json.loads(Path(spec["examples"]).read_text())
    result = bench_measure.run_metrics(
        spec,
        name,
        device,
        bench_measure.model_shape(config.model.path),
        seconds=ticks[-1] - ticks[0],
        steps=len(ticks) - 1,
        real=real,
        total=total,
        squares=squares,
        micro_steps=state["micro_steps"],
        peak_bytes=peak.peak_bytes(),
        gathered=counter.bytes(),
    )
    result["_notes"]["same_examples"] = state["examples"] == drawn[: len(state["examples"])]
    result["_notes"]["micro_steps_per_step"] = len(state["micro_steps"]) / max(1, len(ticks) - 1)
    deepspeed_json = Path(config.train.output_dir) / "deepspeed.json"  # the resolved config, where recorded
    if deepspeed_json.is_file():
        result["_notes"]["deepspeed"] = json.loads(deepspeed_json.read_text())
    return result


def batch_tokens(batch):
    """(real, total, sum of squared lengths) of a collated micro-batch: the loop's own accounting
    (encoder_parts: tokens, real_tokens, squared_lengths per encoder call), else the bench's parser."""
    from bench_measure import token_counts

    try:
        from embedtrain.data.collate import encoder_parts

        parts = encoder_parts(batch)
        return tuple(sum(int(part[key]) for part in parts) for key in ("real_tokens", "tokens", "squared_lengths"))
    except (ImportError, KeyError, TypeError, AttributeError):
        return token_counts(batch)


def describe_recipe(spec, passage_lengths):
    """The recipe preset's plan, printed before anything runs (all that --dry-run does)."""
    from bench_measure import percentiles

    from embedtrain.config import deepspeed_config
    from embedtrain.shape import Shape

    shape = Shape(**{k: v for k, v in spec["shape"].items() if k != "tie_word_embeddings"})
    lengths = percentiles(passage_lengths)
    over = sum(n > spec["passage_max_length"] for n in passage_lengths) / len(passage_lengths)
    lines = [
        f"preset {spec['preset']}: recipe {spec['recipe']} as shipped, model {spec['model_path']} (built on first use)",
        f"  shape: {spec['layers_note']}, hidden {shape.hidden_size}, {shape.params / 1e9:,.3f} B parameters "
        f"({shape.non_embedding_params / 1e9:,.3f} B non-embedding); model FLOPs at 512 tokens "
        f"{shape.flops_per_token(512) / 1e9:,.2f} GFLOP/token",
        f"  batches: global batch {spec['global_batch']} queries x (1 + {spec['hard_negatives']}) passages, "
        f"{spec['warmup']} warm-up + {spec['steps']} timed steps, seed {spec['seed']}; plain runs: micro-batch "
        f"{spec['micro_batch']} x accumulation {spec['accumulation']}",
        f"  lengths: query 5-20 tokens + prompt (max {spec['query_max_length']}); passages sampled p10 "
        f"{lengths[10]:.0f}, p50 {lengths[50]:.0f}, p90 {lengths[90]:.0f}, max {max(passage_lengths):,}, "
        f"{over:.1%} truncated at {spec['passage_max_length']}",
    ]
    try:
        spec_dir = Path(spec["model_path"])
        if not (spec_dir / "config.json").is_file():
            raise FileNotFoundError(spec_dir)
        config = recipe_config(spec, plain=False)
        ds = deepspeed_config(config, 1)
        train = config.train
        lines.append(
            f"  embedtrain: deepspeed.config {config.deepspeed.get('config')} -> ZeRO-"
            f"{ds.get('zero_optimization', {}).get('stage')}, token budget "
            f"{getattr(train, 'micro_batch_tokens', None) or 'off'}, micro-batch {train.micro_batch_size}, "
            f"activation checkpointing {train.activation_checkpointing}"
        )
    except Exception as err:  # noqa: BLE001 - the plan of a run that resolves on its card
        lines.append(
            f"  embedtrain: the recipe's deepspeed config and token budget, resolved at start on the card "
            f"({type(err).__name__} here: {str(err)[:160]})"
        )
    lines.append(
        f"  runs: {', '.join(spec['runs'])}, each in a fresh process; MFU against "
        f"{spec['peak_tflops'] or 'the dense bf16 peak of the card'} TFLOP/s; targets {json.dumps(spec['targets'])}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    print(os.path.basename(__file__), "is imported by tools/bench.py; run that", file=sys.stderr)
    sys.exit(2)
