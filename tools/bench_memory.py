"""Peak memory of one training step (forward + backward under DeepSpeed ZeRO-3, 1 rank), by
micro-batch with and without GradCache, and by passage length.

    python tools/bench_memory.py grad-cache --batches 16,64,256 --chunk 8 --length 128
    python tools/bench_memory.py length --lengths 512,1024,2048,4096,8192
    python tools/bench_memory.py length --model /ckpt/Llama-3.2-1B --bf16 --lengths 512,8192   # on a GPU

Every point runs in a fresh process on a synthetic batch (random token ids, no padding) so that
peaks do not mix. Memory is what the step adds on top of the loaded engine: on CUDA
torch.cuda.max_memory_allocated minus the allocation before the step; on the CPU the process's
peak resident set (VmHWM, reset through /proc/self/clear_refs) minus the resident set before the
step. The optimizer step is not included (its states do not depend on the batch). Results go to
stdout as a table and, with --out, to a JSON file; docs/benchmarks.md records measured runs.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def read_status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak bytes added during a `with` block: CUDA allocator peak, or the host's resident peak."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.before = read_status("VmRSS")
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.before
        else:
            self.peak = read_status("VmHWM") - self.before


def synthetic_batch(collator, vocab, queries, per_query, query_length, passage_length, seed=0):
    """A micro-batch of random tokens at exactly these lengths, laid out by the real collator
    (packed or padded, cut into GradCache chunks, as the run's config says)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    passages = queries * per_query

    def texts(count, length):
        return torch.randint(0, vocab - 2, (count, length), generator=generator).tolist()

    return collator.assemble(
        texts(queries, query_length),
        texts(passages, passage_length),
        [q * per_query for q in range(queries)],
        list(range(passages)),
    )


def measure_point(point):
    """One step in this process; returns {peak_bytes, seconds, tokens}."""

    from embedtrain import distributed
    from embedtrain.config import deepspeed_config, load_config
    from embedtrain.data.collate import Collator, encoder_parts
    from embedtrain.model.encoder import load_tokenizer, read_model_config
    from embedtrain.train.engine import build_engine
    from embedtrain.train.step import micro_batch_backward

    distributed.init_distributed()
    chunk = point["chunk"]
    overrides = [
        f"model.path={point['model']}",
        f"train.micro_batch_size={point['batch']}",
        f"train.global_batch_size={point['batch']}",
        f"train.grad_cache_chunk_size={chunk}",
        f"loss.negatives={point['negatives']}",
        f"loss.hard_negatives={point['hard_negatives']}",
        f"data.query_max_length={point['query_length']}",
        f"data.passage_max_length={point['passage_length']}",
        f"deepspeed.bf16.enabled={'true' if point['bf16'] else 'false'}",
        f"model.attn_implementation={point['attn']}",
    ]
    config = load_config("tiny", overrides, output_dir="/tmp/embedtrain-bench-memory")
    engine = build_engine(config, deepspeed_config(config, 1))
    vocab = read_model_config(config.model.path).vocab_size
    collator = Collator(load_tokenizer(config.model.path), config.data, {}, chunk)
    batch = synthetic_batch(
        collator, vocab, point["batch"], 1 + point["hard_negatives"], point["query_length"], point["passage_length"]
    )
    start = time.perf_counter()
    with PeakMemory(engine.device) as peak:
        loss, _ = micro_batch_backward(engine, batch, config.loss, 1, chunk)
    seconds = time.perf_counter() - start
    engine.step()
    return {
        "peak_bytes": peak.peak,
        "seconds": seconds,
        "loss": float(loss),
        "tokens": sum(part["tokens"] for part in encoder_parts(batch)),
    }


def run_point(point, timeout):
    """measure_point in a fresh process (torch.distributed single rank)."""
    env = dict(
        os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", TOKENIZERS_PARALLELISM="false"
    )
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    result = subprocess.run(
        [sys.executable, __file__, "_point", json.dumps(point)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    for line in result.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"point {point} failed ({result.returncode}):\n{result.stderr[-3000:]}")


def base_point(args):
    return {
        "model": args.model,
        "chunk": 0,
        "negatives": "global",
        "hard_negatives": args.hard_negatives,
        "query_length": args.query_length,
        "passage_length": args.length,
        "bf16": args.bf16,
        "attn": args.attn,
        "batch": 1,
    }


def sweep(points, label, timeout):
    rows = []
    for point in points:
        result = run_point(point, timeout)
        rows.append({**point, **result})
        print(
            f"{label(point):<40} peak {result['peak_bytes'] / 2**20:>9.1f} MiB   {result['seconds']:>7.2f} s   "
            f"{result['tokens']:>8,} tokens   loss {result['loss']:.4f}",
            flush=True,
        )
    return rows


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "_point":
        print("RESULT " + json.dumps(measure_point(json.loads(sys.argv[2]))), flush=True)
        from embedtrain import distributed

        distributed.shutdown()
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", choices=["grad-cache", "length"])
    parser.add_argument("--model", default="assets:tiny-llama", help="Llama checkpoint folder (default: the tiny one)")
    parser.add_argument("--batches", default="16,64,256", help="grad-cache: micro-batches (queries per rank)")
    parser.add_argument("--chunk", type=int, default=8, help="grad-cache: GradCache chunk (queries)")
    parser.add_argument("--lengths", default="512,1024,2048,4096,8192", help="length: passage lengths")
    parser.add_argument("--length", type=int, default=128, help="grad-cache: passage length")
    parser.add_argument("--query-length", type=int, default=64)
    parser.add_argument("--hard-negatives", type=int, default=3)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per point")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    base = base_point(args)
    if args.sweep == "grad-cache":
        points = [
            {**base, "batch": b, "chunk": c}
            for b in map(int, args.batches.split(","))
            for c in (0, args.chunk)
            if c <= b
        ]
        rows = sweep(
            points,
            lambda p: f"micro {p['batch']:>4} {'GradCache ' + str(p['chunk']) if p['chunk'] else 'plain'}",
            args.timeout,
        )
    else:
        points = [
            {**base, "batch": 1, "hard_negatives": args.hard_negatives, "passage_length": n}
            for n in map(int, args.lengths.split(","))
        ]
        rows = sweep(points, lambda p: f"passage length {p['passage_length']:>5}", args.timeout)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
