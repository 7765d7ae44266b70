"""One-command device check: proves the GPU path end to end and writes one table and one JSON.

    python tools/gpu_check.py                              # on a GPU machine (meant to take < 8 min on one H100)
    python tools/gpu_check.py --cpu --workdir /tmp/gpucheck   # the same sequence, tiny model, on the CPU (CI)

Stages, each a subprocess with its own timeout (one failure does not hide the rest; a stage whose
input is missing is skipped and says why):

  environment    torch, CUDA device, versions (fails on a GPU run when CUDA is not available)
  pytest -m gpu  python -m pytest -q -m gpu -n 0 tests (on --cpu run on the CPU, EMBEDTRAIN_GPU_TESTS_ON_CPU=1:
                 that checks the tests themselves, not the GPU)
  build model    a Llama-3.2-1B-shaped model from a config, random weights, no download, saved in
                 bf16 with the tiny tokenizer (on --cpu: embedtrain/assets/tiny-llama itself)
  train          the llama3_2_1b recipe as shipped (its DeepSpeed config and token budget; on --cpu: tiny),
                 one device, steps 1-20 (--cpu: 1-6); the log's start-up line says what was chosen
  resume         the same command with max_steps 30 (--cpu: 10) and train.resume_new_schedule=true:
                 must say it resumed from step 20 (6)
  export         embedtrain export of the run
  encode         embedtrain encode --device of the export; finite unit vectors (on GPU also compared
                 with a CPU fp32 encode of the same texts, reported, not judged: random 1B weights)
  eval           embedtrain eval --device of the export on assets:demo-data (--cpu: its FEVER subset);
                 metrics present and finite
                 (encode and eval load the untrained base model when the export failed, and say so)
  metrics        step time, tokens/s and peak memory from the training logs

Step time is the median interval between consecutive `[embedtrain] step N:` lines (logging every
step), leaving out each invocation's first two steps; tokens/s is the median of the loop's own
per-step figure (padded tokens, as the loop counts them). Peak device memory is
torch.cuda.max_memory_allocated of the training process (a wrapper prints it before the process
ends); on the CPU it is n/a and the peak resident set of the process is given instead.

Exit code 0 only when every stage that was not skipped passed. Installs nothing; nothing is
downloaded (docs/gpu.md: how to get the packages onto an offline GPU machine).
"""

import argparse
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "embedtrain" / "assets"
TINY = ASSETS / "tiny-llama"
DEMO = ASSETS / "demo-data"
TAIL_CHARS = 4000

# Llama-3.2-1B's published config.json, without its weights.
sys.path.insert(0, str(REPO))
from embedtrain.plan import SHAPES  # noqa: E402 (plan imports nothing heavy)

LLAMA_3_2_1B = dict(
    SHAPES["llama-3.2-1b"],  # layers, widths, heads, vocabulary, tied embeddings: embedtrain.plan's public shape
    head_dim=64,
    tie_word_embeddings=True,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
    initializer_range=0.02,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
)

# Runs `embedtrain ARGS` in this process and prints the peak memory before it ends.
# distributed.shutdown() ends with os._exit (no atexit), hence the patch as well as atexit.
PEAK_WRAPPER = r"""
import atexit, resource, sys
reported = []
def report():
    if reported:
        return
    reported.append(1)
    import torch
    line = f"[gpu_check] peak host RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        line += (f"; peak device memory allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
                 f", reserved {torch.cuda.max_memory_reserved() / 2**30:.2f} GiB")
    print(line, flush=True)
atexit.register(report)
from embedtrain import distributed
shutdown = distributed.shutdown
def report_then_shutdown(*args, **kwargs):
    report()
    shutdown(*args, **kwargs)
distributed.shutdown = report_then_shutdown
sys.argv[0] = "embedtrain"
from embedtrain.cli import main
main()
"""

ENVIRONMENT = r"""
import json, platform, torch, transformers, deepspeed
info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__, "deepspeed": deepspeed.__version__,
        "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    info["device_name"] = torch.cuda.get_device_name(0)
    info["device_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    info["bf16_supported"] = torch.cuda.is_bf16_supported()
try:
    import flash_attn
    info["flash_attn"] = flash_attn.__version__
except ImportError:
    info["flash_attn"] = None
print("GPU_CHECK_ENV " + json.dumps(info))
"""

STEP_LINE = re.compile(r"\[embedtrain\] step (\d+): loss (\S+).*?([\d,.]+) tok/s")
PEAK_LINE = re.compile(
    r"\[gpu_check\] peak host RSS (\d+) MiB(?:; peak device memory allocated ([\d.]+) GiB"
    r", reserved ([\d.]+) GiB)?"
)


def shown(command):
    """The command as recorded in logs and JSON (inline code replaced by its name in this file)."""
    names = {id(PEAK_WRAPPER): "'<PEAK_WRAPPER: embedtrain CLI>'", id(ENVIRONMENT): "'<ENVIRONMENT probe>'"}
    return " ".join(names.get(id(part), str(part)) for part in command)


def child_env(cpu):
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}".rstrip(os.pathsep)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.setdefault("DS_BUILD_OPS", "0")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # each stage is its own 1-process group
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # --cpu means the CPU, even on a GPU machine
    return env


def run_command(command, log_path, timeout, env):
    """Run `command`, its stdout and stderr merged into `log_path`, killing its whole process group
    after `timeout` seconds. Returns (exit code or None on timeout, [(seconds since start, line)])."""
    start = time.perf_counter()
    lines = []
    with open(log_path, "w") as log:
        log.write("$ " + shown(command) + "\n")
        process = subprocess.Popen(
            list(map(str, command)),
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )

        def read():
            for line in process.stdout:
                lines.append((time.perf_counter() - start, line.rstrip("\n")))
                log.write(line)
                log.flush()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the stage's own process group, nothing else
            process.wait()
            code = None
        reader.join(timeout=10)
    return code, lines


class Check:
    def __init__(self, cpu, workdir):
        self.cpu = cpu
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.env = child_env(cpu)
        self.stages = []
        self.info = {}
        self.cli_options = {}

    # -- bookkeeping ---------------------------------------------------------------------------

    def record(self, name, status, seconds=0.0, note="", **extra):
        stage = {"stage": name, "status": status, "seconds": round(seconds, 1), "note": note, **extra}
        self.stages.append(stage)
        print(f"[gpu_check] {name}: {status} ({seconds:.1f} s){' - ' + note if note else ''}", flush=True)
        return stage

    def run(self, name, command, timeout, check=None, env=None):
        """Run a stage's command; `check(lines)` returns a note (passed) or raises AssertionError
        (failed, with its message). Returns (stage dict, lines)."""
        log = self.logs / (re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") + ".log")
        print(f"[gpu_check] {name}: running (timeout {timeout} s, log {log})", flush=True)
        started = time.perf_counter()
        code, lines = run_command(command, log, timeout, env or self.env)
        seconds = time.perf_counter() - started
        text = "\n".join(line for _, line in lines)
        extra = {"command": shown(command), "log": str(log), "exit_code": code}
        if code is None:
            return self.record(
                name, "failed", seconds, f"timed out after {timeout} s", tail=text[-TAIL_CHARS:], **extra
            ), lines
        if code != 0:
            return self.record(name, "failed", seconds, f"exit code {code}", tail=text[-TAIL_CHARS:], **extra), lines
        try:
            note = check(lines) if check else ""
        except (AssertionError, ValueError, OSError, KeyError) as err:
            return self.record(name, "failed", seconds, f"check failed: {err}", tail=text[-TAIL_CHARS:], **extra), lines
        return self.record(name, "passed", seconds, note or "", **extra), lines

    def skip(self, name, why):
        return self.record(name, f"skipped ({why})")

    def embedtrain(self, *args):
        return [sys.executable, "-m", "embedtrain.cli", *args]

    def device_options(self, command):
        """--device/--dtype for encode and eval: cuda + bf16, or cpu + fp32. A CLI without them
        (older embedtrain) runs on its default, the CPU: fine for --cpu, a failure on a GPU run."""
        if command not in self.cli_options:
            code, lines = run_command(
                self.embedtrain(command, "--help"), self.logs / f"{command}_help.log", 120, self.env
            )
            help_text = "\n".join(line for _, line in lines)
            self.cli_options[command] = {option for option in ("--device", "--dtype") if option in help_text}
        have = self.cli_options[command]
        if not self.cpu and "--device" not in have:
            raise AssertionError(f"embedtrain {command} has no --device option: it cannot run on the GPU")
        wanted = {"--device": "cpu" if self.cpu else "cuda", "--dtype": "float32" if self.cpu else "bfloat16"}
        return [part for option, value in wanted.items() if option in have for part in (option, value)]

    # -- stages --------------------------------------------------------------------------------

    def environment(self):
        def check(lines):
            line = next(text for _, text in lines if text.startswith("GPU_CHECK_ENV "))
            self.info = json.loads(line[len("GPU_CHECK_ENV ") :])
            if not self.cpu:
                assert self.info["cuda_available"], (
                    f"torch {self.info['torch']} sees no CUDA device (a CPU build of torch, or no driver?)"
                )
            device = self.info.get("device_name", "CPU")
            return (
                f"{device}; torch {self.info['torch']} (CUDA {self.info['torch_cuda']}), deepspeed "
                f"{self.info['deepspeed']}, transformers {self.info['transformers']}, "
                f"flash_attn {self.info['flash_attn']}"
            )

        return self.run("environment", [sys.executable, "-c", ENVIRONMENT], 120, check)

    def pytest(self):
        # on --cpu the GPU tests run on the CPU (EMBEDTRAIN_GPU_TESTS_ON_CPU): that checks the tests
        # themselves, so that they cannot rot between GPU runs; it proves nothing about a GPU
        env = {**self.env, "EMBEDTRAIN_GPU_TESTS_ON_CPU": "1"} if self.cpu else None

        def check(lines):
            summary = next((text for _, text in reversed(lines) if re.search(r"\d+ (passed|skipped)", text)), "")
            assert "passed" in summary, f"no test passed: {summary!r}"
            return summary.strip("= ")

        return self.run(
            "pytest -m gpu", [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-n", "0", "tests"], 300, check, env
        )[0]

    def build_model(self):
        if self.cpu:
            return self.record("build model", "passed", note=f"--cpu: {TINY.relative_to(REPO)} itself"), TINY
        target = self.workdir / "llama-3.2-1b-random"
        shutil.rmtree(target, ignore_errors=True)

        def check(lines):
            config = json.loads((target / "config.json").read_text())
            assert config["num_hidden_layers"] == 16 and config["vocab_size"] == 128256, config
            assert (target / "tokenizer.json").is_file(), "tokenizer.json was not copied"
            return next((text for _, text in lines if text.startswith("built ")), "")

        stage, _ = self.run("build model", [sys.executable, __file__, "--build-model", target], 300, check)
        return stage, target

    def train(self, model, run_dir):
        """Two invocations in one run folder: steps 1..first, then a resume to `total`."""
        first, total = (6, 10) if self.cpu else (20, 30)
        if self.cpu:
            common = ["--config", "tiny", "--set", "train.save_every=3"]
        else:
            # the recipe as shipped: its DeepSpeed config (`auto`: the stage and recompute embedtrain
            # picks for this card), its token budget or micro-batch, its global batch 128. One
            # checkpoint kept, written at steps 20 and 30 only: a 1B checkpoint with Adam states is
            # about 17 GB.
            common = [
                "--config",
                "llama3_2_1b",
                "--set",
                "train.save_every=20",
                "--set",
                "train.keep_checkpoints=1",
            ]
        common += [
            "--output-dir",
            run_dir,
            "--set",
            f"model.path={model}",
            "--set",
            "data.path=assets:demo-data",
            "--set",
            "logging.every=1",
        ]
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: an old one would be resumed
        wrapper = [sys.executable, "-c", PEAK_WRAPPER, "train"]
        runs = {}

        def check_steps(start, stop):
            def check(lines):
                steps = parse_steps(lines)
                numbers = [s["step"] for s in steps]
                expected = list(range(start + 1, stop + 1))
                assert numbers == expected, f"logged steps {numbers}, expected {start + 1}..{stop}"
                bad = [s["step"] for s in steps if not math.isfinite(s["loss"])]
                assert not bad, f"non-finite loss at steps {bad}"
                assert (run_dir / "checkpoints" / f"step_{stop}").is_dir(), f"no checkpoint step_{stop}"
                text = "\n".join(line for _, line in lines)
                if start:
                    found = re.search(r"resumed from (\S+) at step (\d+)", text)
                    assert found and int(found.group(2)) == start, f"the log does not say it resumed from step {start}"
                runs[stop] = lines
                # what the recipe resolved to on this device (stage, recompute, token budget), as logged
                chosen = next((line for _, line in lines if "ZeRO stage" in line), "")
                chosen = chosen[chosen.find("global batch") :] if "global batch" in chosen else chosen
                return (
                    f"loss {steps[0]['loss']:.4f} -> {steps[-1]['loss']:.4f}"
                    + (f"; resumed from {Path(found.group(1)).name}" if start else "")
                    + (f"; {chosen.strip()}" if chosen and not start else "")
                )

            return check

        first_stage, _ = self.run(
            f"train (steps 1-{first})",
            [*wrapper, *common, "--set", f"train.max_steps={first}"],
            420,
            check_steps(0, first),
        )
        if not (run_dir / "checkpoints" / f"step_{first}").is_dir():
            second = self.skip(f"resume (steps {first + 1}-{total})", f"no checkpoint step_{first} to resume from")
        else:
            second, _ = self.run(
                f"resume (steps {first + 1}-{total})",
                # a longer run than the checkpoint's: its LR schedule changes, as asked for
                [*wrapper, *common, "--set", f"train.max_steps={total}", "--set", "train.resume_new_schedule=true"],
                360,
                check_steps(first, total),
            )
        return first_stage, second, runs

    def export(self, run_dir, out):
        shutil.rmtree(out, ignore_errors=True)  # a stale export must not stand in for this run's
        if not (run_dir / "checkpoints" / "latest").is_file():
            return self.skip("export", "no checkpoint")

        def check(lines):
            assert (out / "config.json").is_file() and any(out.glob("*.safetensors")), f"{out} lacks weights"
            size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
            return f"{size / 2**20:,.0f} MiB of safetensors"

        return self.run("export", self.embedtrain("export", run_dir, out, "--overwrite"), 300, check)[0]

    def encode(self, model):
        if not (model / "config.json").is_file():
            return self.skip("encode", "no model")
        import numpy as np

        texts = demo_texts(32)
        source = self.workdir / "texts.txt"
        source.write_text("\n".join(texts) + "\n")
        output = self.workdir / "embeddings.npy"
        output.unlink(missing_ok=True)
        try:
            options = self.device_options("encode")
        except AssertionError as err:
            return self.record("encode", "failed", note=str(err))

        def check(lines):
            vectors = np.load(output)
            assert vectors.shape[0] == len(texts), f"{vectors.shape[0]} embeddings for {len(texts)} texts"
            assert np.isfinite(vectors).all(), "non-finite embeddings"
            norms = np.linalg.norm(vectors, axis=1)
            assert np.allclose(norms, 1, atol=1e-3), f"norms {norms.min():.4f}..{norms.max():.4f}, expected 1"
            return (
                f"{vectors.shape[0]} x {vectors.shape[1]}, unit norm ({' '.join(options) or 'CLI default device'})"
                + where(model)
            )

        stage, _ = self.run(
            "encode",
            self.embedtrain("encode", model, "--input", source, "--output", output, "--prompt", "query", *options),
            300,
            check,
        )
        if stage["status"] == "passed" and not self.cpu:
            self.compare_with_cpu(model, source, output, stage)
        return stage

    def compare_with_cpu(self, model, source, gpu_output, stage):
        """Informational: cosine of the GPU bf16 embeddings with a CPU fp32 encode of the same texts
        (random 1B weights over 16 layers: not judged; tests/test_gpu.py judges it on the tiny model)."""
        import numpy as np

        cpu_output = self.workdir / "embeddings_cpu.npy"
        cpu_env = dict(self.env, CUDA_VISIBLE_DEVICES="")
        code, _ = run_command(
            self.embedtrain(
                "encode",
                model,
                "--input",
                source,
                "--output",
                cpu_output,
                "--prompt",
                "query",
                "--device",
                "cpu",
                "--dtype",
                "float32",
            ),
            self.logs / "encode_cpu_fp32.log",
            300,
            cpu_env,
        )
        if code != 0:
            stage["cpu_fp32_cosine_min"] = None
            stage["note"] += "; CPU fp32 comparison did not run (logs/encode_cpu_fp32.log)"
            return
        a, b = np.load(gpu_output), np.load(cpu_output)
        cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        stage["cpu_fp32_cosine_min"] = float(cosine.min())
        stage["note"] += f"; min cosine with CPU fp32 {cosine.min():.5f} (not judged)"

    def eval(self, model):
        if not (model / "config.json").is_file():
            return self.skip("eval", "no model")
        output = self.workdir / "eval.json"
        output.unlink(missing_ok=True)
        try:
            options = self.device_options("eval")
        except AssertionError as err:
            return self.record("eval", "failed", note=str(err))

        def check(lines):
            result = json.loads(output.read_text())
            mean = result["mean"]
            for key in ("ndcg@10", "recall@10", "recall@100", "mrr@10"):
                assert key in mean and math.isfinite(mean[key]) and 0 <= mean[key] <= 1, f"mean {key}: {mean.get(key)}"
            return (
                f"nDCG@10 {mean['ndcg@10']:.4f}, Recall@10 {mean['recall@10']:.4f}, "
                f"MRR@10 {mean['mrr@10']:.4f} over {len(result.get('subsets', {}))} subset(s)" + where(model)
            )

        data = DEMO / "FEVER" if self.cpu else DEMO  # 2 CPU cores: one subset keeps the CPU run near a minute
        return self.run("eval", self.embedtrain("eval", model, data, "--output", output, *options), 300, check)[0]

    def metrics(self, runs):
        started = time.perf_counter()
        if not runs:
            return self.skip("metrics", "no training log"), {}
        intervals, rates, peaks = [], [], []
        for lines in runs.values():
            steps = parse_steps(lines)[2:]  # start-up and the first steps' allocations left out
            intervals += [b["time"] - a["time"] for a, b in zip(steps, steps[1:])]
            rates += [s["tokens_per_s"] for s in steps]
            peaks += [m for _, text in lines if (m := PEAK_LINE.search(text))]
        training = {
            "steps_measured": len(rates),
            "step_time_s": round(statistics.median(intervals), 3) if intervals else None,
            "tokens_per_s": round(statistics.median(rates)) if rates else None,
            "peak_device_memory_gib": max((float(m.group(2)) for m in peaks if m.group(2)), default=None),
            "peak_device_memory_reserved_gib": max((float(m.group(3)) for m in peaks if m.group(3)), default=None),
            "peak_host_rss_mib": max((int(m.group(1)) for m in peaks), default=None),
        }
        if training["peak_device_memory_gib"] is not None:
            memory = f"peak device memory {training['peak_device_memory_gib']:.2f} GiB"
        else:
            memory = f"peak device memory n/a (CPU; peak RSS {training['peak_host_rss_mib']} MiB)"
        note = (
            f"step {training['step_time_s']} s, {training['tokens_per_s']:,} tok/s, {memory}"
            if training["step_time_s"] and training["tokens_per_s"]
            else ""
        )
        status = "passed" if note and (self.cpu or training["peak_device_memory_gib"] is not None) else "failed"
        if status == "failed":
            note = note or "no step time / tokens/s in the training logs"
            note += "" if self.cpu or training["peak_device_memory_gib"] else "; no peak device memory reported"
        return self.record("metrics", status, time.perf_counter() - started, note, training=training), training


def where(model):
    return "" if model.name == "export" else f"; export missing: ran on the untrained base model {model.name}"


def parse_steps(lines):
    steps = []
    for seconds, text in lines:
        found = STEP_LINE.search(text)
        if found:
            steps.append(
                {
                    "step": int(found.group(1)),
                    "loss": float(found.group(2)),
                    "time": seconds,
                    "tokens_per_s": float(found.group(3).replace(",", "")),
                }
            )
    return steps


def demo_texts(count):
    """`count` FEVER queries and `count` FEVER documents of the demo dataset."""
    import pyarrow.parquet as pq

    queries = pq.read_table(DEMO / "FEVER" / "queries.parquet", columns=["question"]).column(0).to_pylist()
    corpus = pq.read_table(DEMO / "FEVER" / "corpus.parquet", columns=["text"]).column(0).to_pylist()
    return [" ".join(t.split()) for t in queries[:count] + corpus[:count]]  # one line each


def build_model(target):
    """Llama-3.2-1B's shape with random weights, saved as LlamaForCausalLM in bf16 (as Meta's
    checkpoint is), with the tiny tokenizer next to it (its ids fit any vocabulary above 1024)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = json.loads((TINY / "config.json").read_text())
    config = LlamaConfig(**LLAMA_3_2_1B, bos_token_id=tiny["bos_token_id"], eos_token_id=tiny["eos_token_id"])
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    with torch.device(device):  # random init on the GPU: seconds instead of a minute
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(target)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY / name, Path(target) / name)
    count = sum(p.numel() for p in model.parameters())
    seconds = time.perf_counter() - started
    print(f"built {count / 1e9:.3f} B parameters (bf16, random, {device} init) in {seconds:.0f} s", flush=True)


def print_table(stages, total):
    rows = [("stage", "status", "seconds", "notes")]
    rows += [(s["stage"], s["status"], f"{s['seconds']:.1f}", s["note"]) for s in stages]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for index, row in enumerate(rows):
        print(" | ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + " | " + row[3])
        if index == 0:
            print("-+-".join("-" * width for width in widths) + "-+-" + "-" * 5)
    print(f"total {total:.0f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="the same sequence on the CPU with the tiny model")
    parser.add_argument("--workdir", default=None, help="work folder (default: a new temporary folder)")
    parser.add_argument("--out", default=None, help="JSON results (default: WORKDIR/gpu_check.json)")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the checkpoints, export and built model (GPU run: about 25 GB); logs and JSON are always kept",
    )
    parser.add_argument("--build-model", default=None, help=argparse.SUPPRESS)  # the build stage's subprocess
    args = parser.parse_args()
    if args.build_model:
        build_model(args.build_model)
        return 0

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_check_")).resolve()
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else workdir / "gpu_check.json"
    check = Check(args.cpu, workdir)
    started = time.perf_counter()
    print(f"[gpu_check] {'CPU (tiny model)' if args.cpu else 'GPU'} run in {workdir}", flush=True)

    environment, _ = check.environment()
    if environment["status"] != "passed" and not args.cpu:
        # without CUDA every later stage would run the 1B model on the CPU into its timeout
        for name in ("pytest -m gpu", "build model", "train", "export", "encode", "eval", "metrics"):
            check.skip(name, "environment failed")
        return finish(check, args, out, started)
    check.pytest()
    _, model = check.build_model()
    run_dir, exported = workdir / "run", workdir / "export"
    if (model / "config.json").is_file():
        _, _, runs = check.train(model, run_dir)
    else:
        check.skip("train", "no model")
        runs = {}
    check.export(run_dir, exported)
    # A failed export must not hide the inference path: encode and eval then load the (untrained)
    # base model folder, and say so; the run still fails on the export stage.
    target = exported if (exported / "config.json").is_file() else model
    check.encode(target)
    check.eval(target)
    check.metrics(runs)

    if not args.keep:  # only what this script made; a 1B ZeRO-3 checkpoint with Adam states is ~17 GB
        for folder in (run_dir / "checkpoints", exported, workdir / "llama-3.2-1b-random"):
            shutil.rmtree(folder, ignore_errors=True)
    return finish(check, args, out, started)


def finish(check, args, out, started):
    """Write the JSON, print the table; the exit code."""
    total = time.perf_counter() - started
    passed = all(s["status"] == "passed" or s["status"].startswith("skipped") for s in check.stages)
    training = next((s["training"] for s in check.stages if "training" in s), {})
    result = {
        "mode": "cpu" if args.cpu else "cuda",
        "passed": passed,
        "total_seconds": round(total, 1),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "workdir": str(check.workdir),
        "environment": check.info,
        "training": training,
        "stages": check.stages,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print_table(check.stages, total)
    print(f"{'PASSED' if passed else 'FAILED'}; results in {out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
