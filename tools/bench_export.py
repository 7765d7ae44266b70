"""Export memory benchmark: peak host memory of `embedtrain export` on a model large enough to matter.

    python tools/bench_export.py --out /tmp/bench_export            # ~340M parameters, 1.4 GB in fp32

1. Saves a random Llama (hidden 1024, 24 layers, vocab 32k: ~340M parameters) with the tiny tokenizer.
2. Trains it one step with ZeRO-3 in fp32 on CPU (2 ranks) and checkpoints.
3. In fresh processes, exports with embedtrain's streaming consolidation and, for comparison,
   consolidates with DeepSpeed's get_fp32_state_dict_from_zero_checkpoint, sampling memory every
   20 ms: peak RSS, split into private (anonymous) memory and file-backed pages.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from bench_data import memory_kib  # noqa: E402  (same /proc/self/status reading)


def sample_peak(function):
    peak, done = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}, threading.Event()

    def watch():
        while not done.is_set():
            now = memory_kib()
            for key in peak:
                peak[key] = max(peak[key], now[key])
            time.sleep(0.02)

    thread = threading.Thread(target=watch)
    thread.start()
    start = time.perf_counter()
    function()
    elapsed = time.perf_counter() - start
    done.set()
    thread.join()
    return {"peak_mib": {k: round(v / 1024, 1) for k, v in peak.items()}, "seconds": round(elapsed, 1)}


def child(mode, run, out):
    if mode == "embedtrain":
        from embedtrain.export import export_checkpoint

        result = sample_peak(lambda: export_checkpoint(run, out, overwrite=True, max_shard_gb=0.5))
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        result = sample_peak(lambda: get_fp32_state_dict_from_zero_checkpoint(str(Path(run) / "checkpoints")))
    print(json.dumps(result))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/bench_export")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    out = Path(args.out)
    model_dir, run = out / "model", out / "run"
    if not (model_dir / "config.json").is_file():
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=32000,
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=24,
            num_attention_heads=16,
            num_key_value_heads=16,
            max_position_embeddings=2048,
        )
        LlamaForCausalLM(config).save_pretrained(model_dir)
        AutoTokenizer.from_pretrained(REPO / "embedtrain" / "assets" / "tiny-llama").save_pretrained(model_dir)
    if not (run / "checkpoints" / "latest").is_file():
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node=2",
                str(REPO / "launch" / "train.py"),
                "--config",
                "tiny",
                "--output-dir",
                str(run),
                "--set",
                f"model.path={model_dir}",
                "--set",
                "train.max_steps=1",
                "--set",
                "train.global_batch_size=2",
                "--set",
                "train.micro_batch_size=1",
                "--set",
                "data.query_max_length=16",
                "--set",
                "data.passage_max_length=16",
                "--set",
                "loss.hard_negatives=1",
                "--set",
                "train.activation_checkpointing=false",
            ],
            check=True,
            env=env,
        )
    size = sum(f.stat().st_size for f in (run / "checkpoints").rglob("*optim_states.pt"))
    results = {"optimizer_partition_files_mib": round(size / 2**20, 1)}
    for mode in ("embedtrain", "deepspeed"):
        proc = subprocess.run(
            [sys.executable, __file__, "--child", mode, str(run), str(out / "exported")],
            capture_output=True,
            text=True,
            check=True,
        )
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(mode, results[mode], flush=True)
    weights = sum(f.stat().st_size for f in (out / "exported").glob("*.safetensors"))
    results["exported_weights_mib"] = round(weights / 2**20, 1)
    print(json.dumps(results, indent=2))
    shutil.rmtree(out / "exported", ignore_errors=True)


if __name__ == "__main__":
    main()
