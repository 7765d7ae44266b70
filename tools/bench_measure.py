"""One run of tools/bench.py, measured in its own process: what every run shares.

The examples (the long-tailed length mix, a pure function of the spec) and the token counts of a
collated batch; the instrumentation (ZeRO-3 all-gather bytes, peak memory, the end of every
micro-step); a run's config and steps; the embedtrain run (the real training step); the timed loop
and a run's metrics. The plain baselines are in tools/bench_baselines.py, the recipe presets'
embedtrain run in tools/bench_recipe.py, presets and the report in tools/bench.py.
"""

import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "embedtrain" / "assets"
SUBSETS = ("FEVER", "SciFact", "SyntheticClassificationData")
MICRO_STEP_ENDS = []  # perf_counter() at the end of every micro-step of the run in this process


# ----------------------------------------------------------------------------------------------------
# Batches


def sample_lengths(rng, count, passages_per_query):
    """(query lengths, passage lengths) in tokens, before the instruction and before truncation.

    Passages: log-length = log(156) + s x t, t ~ Student-t with 5 degrees of freedom (a heavier upper
    tail than a log-normal), s = 0.411 below the median and 0.570 above, so that p10 = 85, p50 = 156,
    p90 = 362 (t5's p90 is 1.476; ln(156/85) / 1.476 = 0.411, ln(362/156) / 1.476 = 0.570) and about
    1 in 2,000 passages exceeds 8,192 tokens."""
    import numpy as np

    t = rng.standard_t(5, size=(count, passages_per_query))
    passages = np.exp(np.log(156.0) + np.where(t < 0, 0.411, 0.570) * t)
    passages = np.clip(np.rint(passages), 8, None).astype(int)
    queries = rng.integers(5, 21, size=count)
    return queries, passages


def token_stream(tokenizer):
    """Every query and document of the demo data as one token-id list: the words texts are cut from."""
    import pyarrow.parquet as pq

    ids = []
    for subset in SUBSETS:
        folder = ASSETS / "demo-data" / subset
        texts = pq.read_table(folder / "corpus.parquet").column("text").to_pylist()
        texts += pq.read_table(folder / "queries.parquet").column("question").to_pylist()
        for text in texts:
            ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids


def make_examples(spec):
    """The bench's examples, a pure function of the spec (seed, counts, max lengths): a list of
    {"subset", "query", "passages"} and the sampled passage lengths."""
    import numpy as np
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tiny-llama")
    stream = token_stream(tokenizer)
    rng = np.random.default_rng(spec["seed"])
    count = spec["micro_batch"] * spec["accumulation"] * (spec["warmup"] + spec["steps"])
    group = 1 + spec["hard_negatives"]
    query_lengths, passage_lengths = sample_lengths(rng, count, group)

    def text(length, cap):
        # text beyond the max length is truncated away anyway: cut a little more than the cap only
        length = min(int(length), cap + 16)
        start = int(rng.integers(0, len(stream) - 1))
        window = (stream[start:] + stream)[:length] if start + length > len(stream) else stream[start : start + length]
        return tokenizer.decode(window).strip()

    examples = [
        {
            "subset": SUBSETS[int(rng.integers(len(SUBSETS)))],
            "query": text(query_lengths[i], spec["query_max_length"]),
            "passages": [text(n, spec["passage_max_length"]) for n in passage_lengths[i]],
        }
        for i in range(count)
    ]
    return examples, passage_lengths.ravel().tolist()


def subset_info():
    """subset -> {query_instruction, passage_instruction}, as a prepared manifest holds it."""
    return {name: json.loads((ASSETS / "demo-data" / name / "dataset_metadata.json").read_text()) for name in SUBSETS}


def percentiles(values, points=(10, 50, 90)):
    import numpy as np

    return {p: float(np.percentile(values, p)) for p in points}


def token_counts(batch):
    """(real tokens, total tokens, sum of squared real lengths per sequence) of a collated batch.

    Works on any batch format whose token tensors come as pairs X_ids / X_mask (or X_segments,
    X_labels, input_ids / attention_mask), which covers the padded keys query_ids/query_mask and
    passage_ids/passage_mask, the one-forward input_ids/attention_mask (padded or packed), and
    GradCache's per-chunk inputs under "chunks". The assumption,
    from embedtrain/model/packing.py: the mask-like tensor holds 0 for padding and a value > 0 for a
    real token; values above 1 label sequences within a row (contiguous runs, one per label), while
    a 0/1 mask means one sequence per row. Total = every element of the ids tensor."""
    import torch

    if "chunks" in batch:  # GradCache: one encoder input per chunk
        counts = [token_counts(chunk) for chunk in batch["chunks"]]
        return tuple(sum(c[i] for c in counts) for i in range(3))
    if hasattr(batch.get("inputs"), "input_ids"):  # embedtrain's EncoderInputs (model/packing.py)
        batch = {**batch, "input_ids": batch["inputs"].input_ids, "attention_mask": batch["inputs"].attention_mask}
    real = total = squares = 0
    pairs = 0
    for key, ids in batch.items():
        if not (key == "input_ids" or key.endswith("_ids")) or not torch.is_tensor(ids) or ids.dim() != 2:
            continue
        stem = key[: -len("ids")]
        names = [stem + "mask", stem + "segments", stem + "labels", stem + "attention_mask"]
        if key == "input_ids":
            names += ["attention_mask", "segments", "sequence_labels"]
        mask = next((batch[n] for n in names if torch.is_tensor(batch.get(n)) and batch[n].shape == ids.shape), None)
        if mask is None:
            continue  # e.g. position ids: not a token tensor with its own mask
        pairs += 1
        total += ids.numel()
        real += int((mask > 0).sum())
        if int(mask.max()) <= 1:
            lengths = mask.sum(-1)
        else:  # packed: one count per (row, label)
            lengths = torch.cat([torch.bincount(row[row > 0]) for row in mask])
        squares += int((lengths.long() ** 2).sum())
    if not pairs:
        raise ValueError(f"no token tensors with a mask found among the batch keys {sorted(batch)}")
    return real, total, squares


# ----------------------------------------------------------------------------------------------------
# Instrumentation


class GatherCounter:
    """Bytes all-gathered during the counted window: the outputs of DeepSpeed's backend collectives
    (outermost call only, so a collective built on another is counted once), and the full size of
    every partitioned parameter ZeRO-3's coordinator fetches (what it would gather on N ranks)."""

    def __init__(self):
        self.collective = 0
        self.fetched = 0
        self.counting = False
        self._depth = 0

    def install(self):
        import deepspeed.comm.comm as ds_comm
        from deepspeed.runtime.zero import partitioned_param_coordinator as coordinator_module
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        backend = ds_comm.cdb

        def output(key):  # the output argument, by keyword or first positional
            return lambda args, kwargs: kwargs.get(key, args[0] if args else None)

        def single(key):
            return lambda args, kwargs: _nbytes(output(key)(args, kwargs))

        def listed(key):
            return lambda args, kwargs: sum(map(_nbytes, output(key)(args, kwargs) or []))

        for name, size in (
            ("all_gather_into_tensor", single("output_tensor")),
            ("all_gather_base", single("output_tensor")),
            ("all_gather", listed("tensor_list")),
            ("all_gather_coalesced", listed("output_tensors")),
        ):
            if backend is not None and hasattr(backend, name):
                setattr(backend, name, self._wrap(getattr(backend, name), size))
        cls = coordinator_module.PartitionedParameterCoordinator
        original = cls._PartitionedParameterCoordinator__all_gather_params_
        counter = self

        def all_gather_params(self, params, forward, quantize=False):
            if counter.counting:
                counter.fetched += sum(
                    p.ds_numel * p.ds_tensor.element_size()
                    for p in params
                    if p.ds_status == ZeroParamStatus.NOT_AVAILABLE
                )
            return original(self, params, forward, quantize)

        cls._PartitionedParameterCoordinator__all_gather_params_ = all_gather_params

    def _wrap(self, function, size):
        def wrapped(*args, **kwargs):
            if self.counting and self._depth == 0:
                self.collective += size(args, kwargs)
            self._depth += 1
            try:
                return function(*args, **kwargs)
            finally:
                self._depth -= 1

        return wrapped

    def bytes(self):
        """(bytes, source): real collectives when any ran, else the coordinator's fetches."""
        return (self.collective, "collectives") if self.collective else (self.fetched, "parameter fetches")


def _nbytes(tensor):
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


class PeakMemory:
    """Peak memory over the timed steps: the CUDA allocator's peak, or the process's peak RSS (VmHWM,
    reset through /proc/self/clear_refs when the timed steps start)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def reset(self):
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")

    def peak_bytes(self):
        import torch

        if self.cuda:
            return torch.cuda.max_memory_allocated()
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("VmHWM not in /proc/self/status")


def time_micro_steps(engine):
    """Record the end of every micro-step: DeepSpeed's engine.step() closes each one (the optimizer
    updates at the accumulation boundary), whatever train.loop does around it."""
    step = engine.step

    def timed_step(*args, **kwargs):
        result = step(*args, **kwargs)
        MICRO_STEP_ENDS.append(time.perf_counter())
        return result

    engine.step = timed_step


def micro_step_times(began, ends, count):
    """Durations of one optimizer step's micro-steps from their end times. A step whose micro-steps
    were not all marked (a loop that does not call engine.step once per micro-batch) counts as
    `count` equal micro-steps."""
    if len(ends) != count:
        return [(time.perf_counter() - began) / count] * count
    marks = [began, *ends]
    return [b - a for a, b in zip(marks, marks[1:])]


# ----------------------------------------------------------------------------------------------------
# One run, in its own process


def load_run_config(spec, extra=()):
    from embedtrain.config import load_config

    if spec.get("kind") == "recipe":  # the plain runs of a recipe preset
        from bench_recipe import recipe_config

        return recipe_config(spec, plain=True)

    overrides = [
        f"model.path={spec['model_path']}",
        "data.path=unused-by-the-bench",
        f"data.query_max_length={spec['query_max_length']}",
        f"data.passage_max_length={spec['passage_max_length']}",
        "data.query_prefix=null",
        "data.passage_prefix=null",  # the subsets' instructions
        f"loss.hard_negatives={spec['hard_negatives']}",
        "loss.negatives=group",
        f"train.micro_batch_size={spec['micro_batch']}",
        f"train.global_batch_size={spec['micro_batch'] * spec['accumulation']}",
        f"train.max_steps={spec['warmup'] + spec['steps']}",
        "train.grad_cache_chunk_size=0",
        f"train.seed={spec['seed']}",
        f"deepspeed.bf16.enabled={'true' if spec['bf16'] else 'false'}",
    ]
    if spec["persistence_threshold"] is not None:
        overrides.append(
            f"deepspeed.zero_optimization.stage3_param_persistence_threshold={spec['persistence_threshold']}"
        )
    overrides += token_budget_off() if spec.get("micro_batch") else []
    return load_config(
        spec["recipe"], overrides + spec["overrides"] + list(extra), output_dir=str(Path(spec["work_dir"]) / "run")
    )


def token_budget_off():
    """The override that turns train.micro_batch_tokens off where the config has that key: a preset that
    sizes its micro-batches in queries (spec micro_batch) gives every run the same micro-batches.
    The off value is the key's default in embedtrain.config (the recipe's own value would cut the
    micro-batches by tokens instead)."""
    import dataclasses

    from embedtrain.config import TrainConfig

    field = next((f for f in dataclasses.fields(TrainConfig) if f.name == "micro_batch_tokens"), None)
    if field is None:
        return []
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    return [f"train.micro_batch_tokens={'null' if default is None else default}"]


def step_examples(spec):
    """The examples, cut into steps of `accumulation` micro-batches."""
    from embedtrain.data.nemotron import Example

    examples = [Example(e["subset"], e["query"], e["passages"]) for e in json.loads(Path(spec["examples"]).read_text())]
    micro = spec["micro_batch"]
    micro_batches = [examples[i : i + micro] for i in range(0, len(examples), micro)]
    return [micro_batches[i : i + spec["accumulation"]] for i in range(0, len(micro_batches), spec["accumulation"])]


def run_embedtrain(spec, config, steps, counter):
    from embedtrain import distributed
    from embedtrain.config import deepspeed_config
    from embedtrain.data.collate import Collator
    from embedtrain.model.encoder import load_tokenizer
    from embedtrain.train.engine import build_engine

    distributed.init_distributed()
    counter.install()
    ds_config = deepspeed_config(config, 1)
    engine = build_engine(config, ds_config)
    time_micro_steps(engine)
    tokenizer = load_tokenizer(config.model.path, config.model.padding_side)
    collator = Collator(tokenizer, config.data, subset_info(), *collator_extras(config))
    batches = [[collator(micro) for micro in step] for step in steps]
    return engine.device, batches, loop_step(engine, config, spec["accumulation"])


def collator_extras(config):
    """The Collator's arguments after (tokenizer, data config, subsets), as train.loop passes them."""
    return [config.train.grad_cache_chunk_size]


def loop_step(engine, config, accumulation):
    """One optimizer step exactly as embedtrain's loop runs it: train.loop.optimizer_step, its stable
    call without the loop's logging window (the bench counts tokens and FLOPs itself)."""
    from embedtrain.train import loop

    def train_step(micro_batches):
        loop.optimizer_step(engine, micro_batches, config, accumulation)

    return train_step


def measure_steps(spec, name, build, profile=None):
    """Build run `name` with `build` (run_embedtrain or a plain baseline of tools/bench_baselines.py:
    (spec, config, steps, counter) -> (device, batches, train_step)), train warm-up + timed steps on
    the spec's batches, return its metrics. `profile`, when given, is a context manager entered around
    the timed steps (tools/profile_step.py)."""
    import contextlib

    import torch

    torch.manual_seed(spec["seed"])
    config = load_run_config(spec, spec.get("zero3_overrides", []) if name == "embedtrain_zero3" else ())
    steps = step_examples(spec)
    counter = GatherCounter()
    device, batches, train_step = build(spec, config, steps, counter)
    peak = PeakMemory(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for micro_batches in batches[: spec["warmup"]]:
        train_step(micro_batches)
    timed = batches[spec["warmup"] :]
    counts = [token_counts(batch) for step in timed for batch in step]
    sync()
    peak.reset()
    counter.counting = True
    micro_steps = []
    seconds = 0.0
    with profile if profile is not None else contextlib.nullcontext():
        for micro_batches in timed:
            MICRO_STEP_ENDS.clear()
            began = time.perf_counter()
            train_step(micro_batches)
            sync()
            seconds += time.perf_counter() - began
            micro_steps += micro_step_times(began, MICRO_STEP_ENDS, len(micro_batches))
    counter.counting = False
    real, total, squares = (sum(c[i] for c in counts) for i in range(3))
    gathered, source = counter.bytes()
    return run_metrics(
        spec,
        name,
        device,
        model_shape(config.model.path),
        seconds=seconds,
        steps=len(timed),
        real=real,
        total=total,
        squares=squares,
        micro_steps=micro_steps,
        peak_bytes=peak.peak_bytes(),
        gathered=None if name == "torch_plain" else (gathered, source),
    )


# ----------------------------------------------------------------------------------------------------
# Metrics


def model_shape(model_path):
    from embedtrain.plan import Shape

    raw = json.loads((Path(model_path) / "config.json").read_text())
    keys = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
    )
    return Shape(**{k: raw[k] for k in keys})


def run_metrics(spec, name, device, shape, *, seconds, steps, real, total, squares, micro_steps, peak_bytes, gathered):
    """One run's JSON entry. MFU counts the model FLOPs of real tokens (Shape.training_flops: 6 N + 12 L A s
    per token, no recompute) over the peak: --peak-tflops, else the card's dense bf16 peak
    (bench_recipe.PEAK_TFLOPS)."""
    import statistics

    flops = shape.training_flops(real, squares)  # embedtrain.shape: the loop's and plan's accounting
    peak_tflops = spec["peak_tflops"]
    if peak_tflops is None and device.type == "cuda":
        from bench_recipe import card_peak_tflops

        peak_tflops = card_peak_tflops()
    return {
        "name": name,
        "tokens_per_s": total / seconds,
        "real_tokens_per_s": real / seconds,
        "padding_efficiency": real / total,
        "mfu": flops / seconds / (peak_tflops * 1e12) if peak_tflops else None,
        "peak_memory_gib": peak_bytes / 2**30,
        "allgather_bytes_per_step": None if gathered is None else int(round(gathered[0] / steps)),
        "step_time_s": seconds / steps,
        "micro_step_time_s": statistics.median(micro_steps),
        "_notes": {
            "allgather_source": None if gathered is None else gathered[1],
            "device": str(device),
            "timed_steps": steps,
            "micro_steps": len(micro_steps),
            "real_tokens": real,
            "total_tokens": total,
            "peak_tflops": peak_tflops,
        },
    }
