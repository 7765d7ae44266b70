"""Training throughput: the same model trained on the same batches three ways, each in a fresh process.

    python tools/bench.py --preset cpu-tiny --output /tmp/bench.json      # 2 CPU cores, about 2 minutes
    python tools/bench.py --preset h100-1b --output bench-1b.json         # one H100, about 3 minutes
    python tools/bench.py --preset h100-8b --output bench-8b.json         # one 80 GB GPU, 8 layers of the 8B
    python tools/bench.py --preset h100-8b --dry-run                      # the run's plan only, no GPU needed

Runs (the same examples, seed, model weights, DeepSpeed config and AdamW settings):
  embedtrain       the real training step: embedtrain.train.engine.build_engine, micro-batches from the
                   real Collator in whatever format it produces (padded or packed), then
                   embedtrain.train.loop.optimizer_step (micro_batch_backward + engine.step per micro-batch);
  deepspeed_plain  a minimal ZeRO-3 loop written here: the same model and DeepSpeed config, torch AdamW,
                   each side padded to its longest, queries and passages in two forwards, InfoNCE
                   (embedtrain.losses), activation checkpointing as configured;
  torch_plain      no DeepSpeed, one device: load_backbone + BiEncoder, torch AdamW, the same padded
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

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "embedtrain" / "assets"
RUNS = ("embedtrain", "deepspeed_plain", "torch_plain")
SUBSETS = ("FEVER", "SciFact", "SyntheticClassificationData")
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
QUICK = dict(micro_batch=2, accumulation=1, warmup=1, steps=2, passage_max_length=128)  # the smoke test


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
# One run, in its own process


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


def load_run_config(spec):
    from embedtrain.config import load_config

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
    return load_config(spec["recipe"], overrides + spec["overrides"], output_dir=str(Path(spec["work_dir"]) / "run"))


def step_examples(spec):
    """The examples, cut into steps of `accumulation` micro-batches."""
    from embedtrain.data.nemotron import Example

    examples = [Example(e["subset"], e["query"], e["passages"]) for e in json.loads(Path(spec["examples"]).read_text())]
    micro = spec["micro_batch"]
    micro_batches = [examples[i : i + micro] for i in range(0, len(examples), micro)]
    return [micro_batches[i : i + spec["accumulation"]] for i in range(0, len(micro_batches), spec["accumulation"])]


def padded_batches(spec, config, steps):
    """The plain runs' batches: each side padded to its longest, prompts as the Collator adds them."""
    from embedtrain.model.encoder import load_tokenizer
    from embedtrain.prompts import training_policy

    tokenizer = load_tokenizer(config.model.path, config.model.padding_side)
    info = subset_info()
    policy = training_policy(config.data, info)
    prompts = {name: policy.for_subset(meta) for name, meta in info.items()}

    def collate(examples):
        q = tokenizer(
            [prompts[e.subset][0] + e.query for e in examples],
            max_length=config.data.query_max_length,
            truncation=True,
            padding=True,
            return_tensors="pt",
        )
        p = tokenizer(
            [prompts[e.subset][1] + t for e in examples for t in e.passages],
            max_length=config.data.passage_max_length,
            truncation=True,
            padding=True,
            return_tensors="pt",
        )
        return {
            "query_ids": q["input_ids"],
            "query_mask": q["attention_mask"],
            "passage_ids": p["input_ids"],
            "passage_mask": p["attention_mask"],
        }

    return [[collate(micro) for micro in step] for step in steps]


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
    tokenizer = load_tokenizer(config.model.path, config.model.padding_side)
    collator = Collator(tokenizer, config.data, subset_info(), *collator_extras(config))
    batches = [[collator(micro) for micro in step] for step in steps]
    return engine.device, batches, loop_step(engine, config, spec["accumulation"])


def collator_extras(config):
    """The Collator's arguments after (tokenizer, data config, subsets), as train.loop passes them."""
    import inspect

    from embedtrain.data.collate import Collator

    return [config.train.grad_cache_chunk_size] if "chunk_size" in inspect.signature(Collator).parameters else []


def loop_step(engine, config, accumulation):
    """One optimizer step exactly as embedtrain's loop runs it: train.loop.optimizer_step, called with
    the arguments its signature names (it changes as embedtrain moves to packed batches); if it asks
    for one this bench does not know, the step it wraps: micro_batch_backward then engine.step per
    micro-batch."""
    import inspect

    from embedtrain.train import loop
    from embedtrain.train.step import micro_batch_backward

    given = {"engine": engine, "config": config, "accumulation": accumulation, "group": None}
    made = {"window": loop.new_window}
    if hasattr(loop, "FlopsCounter"):
        flops = loop.FlopsCounter(engine.module.backbone.config)
        made["flops"] = lambda: flops
    names = [n for n in inspect.signature(loop.optimizer_step).parameters if n != "micro_batches"]
    if all(n in given or n in made for n in names):

        def train_step(micro_batches):
            loop.optimizer_step(
                micro_batches=micro_batches, **{n: given[n] if n in given else made[n]() for n in names}
            )

        return train_step
    print(
        f"bench: train.loop.optimizer_step{inspect.signature(loop.optimizer_step)} takes arguments this bench "
        "does not know; timing micro_batch_backward + engine.step instead",
        file=sys.stderr,
        flush=True,
    )

    def fallback_step(micro_batches):
        for batch in micro_batches:
            micro_batch_backward(engine, batch, config.loss, accumulation, config.train.grad_cache_chunk_size, None)
            engine.step()

    return fallback_step


def run_deepspeed_plain(spec, config, steps, counter):
    import deepspeed
    import torch
    from transformers.integrations import HfDeepSpeedConfig

    from embedtrain import distributed
    from embedtrain.config import deepspeed_config, precision_dtype
    from embedtrain.losses import group_info_nce
    from embedtrain.model import BiEncoder, load_backbone

    distributed.init_distributed()  # embedtrain's: also skips DeepSpeed's CPU shared-memory op build
    counter.install()
    ds_config = deepspeed_config(config, 1)
    hf_ds_config = HfDeepSpeedConfig(ds_config)  # noqa: F841 - ZeRO-3 partitions while loading, while alive
    backbone = load_backbone(
        config.model.path,
        dtype=precision_dtype(ds_config),
        attn_implementation=config.model.attn_implementation,
        pooling=config.model.pooling,
    )
    if config.train.activation_checkpointing:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = BiEncoder(backbone, config.model.pooling, config.model.normalize)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=config.train.lr,
        betas=tuple(config.optim.betas),
        eps=config.optim.eps,
        weight_decay=config.optim.weight_decay,
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    engine.train()
    batches = padded_batches(spec, config, steps)
    device, temperature = engine.device, config.loss.temperature

    def train_step(micro_batches):
        total = 0.0
        for batch in micro_batches:
            queries = engine(batch["query_ids"].to(device), batch["query_mask"].to(device))
            passages = engine(batch["passage_ids"].to(device), batch["passage_mask"].to(device))
            loss = group_info_nce(queries, passages, temperature)[0]
            engine.backward(loss)
            engine.step()
            total += loss.detach()
        return float(total)

    return device, batches, train_step


def run_torch_plain(spec, config, steps, counter):
    import contextlib

    import torch

    from embedtrain.losses import group_info_nce
    from embedtrain.model import BiEncoder, load_backbone

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone = load_backbone(
        config.model.path,
        dtype=torch.float32,
        attn_implementation=config.model.attn_implementation,
        pooling=config.model.pooling,
    )
    if config.train.activation_checkpointing:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = BiEncoder(backbone, config.model.pooling, config.model.normalize).to(device).train()
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=config.train.lr,
        betas=tuple(config.optim.betas),
        eps=config.optim.eps,
        weight_decay=config.optim.weight_decay,
        fused=device.type == "cuda",
    )
    batches = padded_batches(spec, config, steps)
    accumulation, temperature = spec["accumulation"], config.loss.temperature
    clip = 1.0  # ds_configs' gradient_clipping, for the same optimizer step

    def autocast():
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(micro_batches):
        total = 0.0
        for batch in micro_batches:
            with autocast():
                queries = model(batch["query_ids"].to(device), batch["query_mask"].to(device))
                passages = model(batch["passage_ids"].to(device), batch["passage_mask"].to(device))
            loss = group_info_nce(queries, passages, temperature)[0]
            (loss / accumulation).backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(total)

    return device, batches, train_step


def measure(spec, name):
    """Build run `name`, train warm-up + timed steps on the spec's batches, return its metrics."""
    import torch

    from embedtrain.plan import Shape

    torch.manual_seed(spec["seed"])
    config = load_run_config(spec)
    steps = step_examples(spec)
    counter = GatherCounter()
    builder = {"embedtrain": run_embedtrain, "deepspeed_plain": run_deepspeed_plain, "torch_plain": run_torch_plain}[
        name
    ]
    device, batches, train_step = builder(spec, config, steps, counter)
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
    start = time.perf_counter()
    for micro_batches in timed:
        train_step(micro_batches)
    sync()
    seconds = time.perf_counter() - start
    counter.counting = False

    raw = json.loads((Path(config.model.path) / "config.json").read_text())
    shape = Shape(
        **{
            k: raw[k]
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
            )
        }
    )
    real, total, squares = (sum(c[i] for c in counts) for i in range(3))
    flops = 6 * shape.non_embedding_params * real + 12 * shape.num_hidden_layers * shape.hidden_size * squares
    peak_tflops = spec["peak_tflops"] if spec["peak_tflops"] is not None else (989.0 if device.type == "cuda" else None)
    gathered, source = counter.bytes()
    return {
        "name": name,
        "tokens_per_s": total / seconds,
        "real_tokens_per_s": real / seconds,
        "padding_efficiency": real / total,
        "mfu": flops / seconds / (peak_tflops * 1e12) if peak_tflops else None,
        "peak_memory_gib": peak.peak_bytes() / 2**30,
        "allgather_bytes_per_step": None if name == "torch_plain" else int(round(gathered / len(timed))),
        "step_time_s": seconds / len(timed),
        "_notes": {
            "allgather_source": None if name == "torch_plain" else source,
            "device": str(device),
            "timed_steps": len(timed),
            "real_tokens": real,
            "total_tokens": total,
        },
    }


# ----------------------------------------------------------------------------------------------------
# The driver


def build_spec(args):
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
        # the tiny model's parameters are all below DeepSpeed's default threshold: 0 really partitions them
        "persistence_threshold": 0 if args.preset == "cpu-tiny" else None,
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


def percentiles(values, points=(10, 50, 90)):
    import numpy as np

    return {p: float(np.percentile(values, p)) for p in points}


def describe(spec, passage_lengths):
    """The run's plan: what the three runs will train on, and the DeepSpeed config they share."""
    from embedtrain.config import deepspeed_config
    from embedtrain.plan import Shape

    config = load_run_config(spec)
    shape_dims = spec["shape"] or {
        k: v
        for k, v in json.loads((Path(spec["model_path"]) / "config.json").read_text()).items()
        if k
        in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
        )
    }
    shape = Shape(**shape_dims)
    ds = deepspeed_config(config, 1)
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
            f"  runs: {', '.join(RUNS)}, each in a fresh process; "
            f"peak {spec['peak_tflops'] or '989 (CUDA) / none (CPU)'} "
            "TFLOP/s for MFU",
        ]
    )


def format_table(report):
    lines = [
        f"device: {report['device']}; preset {report['preset']}; {report['date']}",
        f"{'run':<16} {'tokens/s':>10} {'real tok/s':>10} {'padding eff':>11} {'MFU':>7} {'peak GiB':>9} "
        f"{'all-gather/step':>15} {'step s':>8}",
    ]
    for run in report["runs"]:
        mfu = "-" if run["mfu"] is None else f"{run['mfu']:.1%}"
        gathered = run["allgather_bytes_per_step"]
        gathered = "-" if gathered is None else f"{gathered / 1e6:,.2f} MB"
        lines.append(
            f"{run['name']:<16} {run['tokens_per_s']:>10,.0f} {run['real_tokens_per_s']:>10,.0f} "
            f"{run['padding_efficiency']:>11.1%} {mfu:>7} {run['peak_memory_gib']:>9.2f} {gathered:>15} "
            f"{run['step_time_s']:>8.3f}"
        )
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
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
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
    runs = args.runs.split(",")
    unknown = sorted(set(runs) - set(RUNS))
    if unknown:
        parser.error(f"--runs: unknown {', '.join(unknown)}; choose from {', '.join(RUNS)}")

    spec = build_spec(args)
    examples, passage_lengths = make_examples(spec)
    print(describe(spec, passage_lengths), flush=True)
    if args.dry_run:
        return
    work_dir = Path(spec["work_dir"])
    work_dir.mkdir(parents=True, exist_ok=True)
    Path(spec["examples"]).write_text(json.dumps(examples))
    spec_file = work_dir / "spec.json"
    spec_file.write_text(json.dumps(spec))
    if spec["shape"]:
        started = time.perf_counter()
        child(["_model"], spec_file, args.timeout)
        print(f"model ready in {time.perf_counter() - started:.0f} s: {spec['model_path']}", flush=True)
    threads = args.threads
    if threads is None and not has_cuda():
        threads = 1
    measured = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved: a slow spell of the machine hits every way alike
        for name in runs:
            started = time.perf_counter()
            result = child(["_run", name], spec_file, args.timeout, threads)
            notes = result.pop("_notes")
            measured[name].append(result)
            print(
                f"{name}: {time.perf_counter() - started:.0f} s wall, {notes['timed_steps']} timed steps, "
                f"{result['step_time_s']:.3f} s/step, {notes['real_tokens']:,} real of {notes['total_tokens']:,} tokens"
                + (f", all-gather bytes from {notes['allgather_source']}" if notes["allgather_source"] else ""),
                flush=True,
            )
    # each way's run with the median step time (the upper median for an even count)
    results = [sorted(measured[name], key=lambda r: r["step_time_s"])[len(measured[name]) // 2] for name in runs]
    report = {
        "device": device_name(threads),
        "preset": args.preset,
        "date": datetime.date.today().isoformat(),
        "runs": results,
    }
    print(format_table(report))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
