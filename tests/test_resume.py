"""Nothing lost: killed and resumed runs equal an uninterrupted one; damaged checkpoints fall back;
SIGTERM saves and exits 0; bad input fails early without damaging earlier checkpoints."""

import json
import math
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_cli import embedtrain

from conftest import REPO, WORKERS, run_ranks, worker_env
from embedtrain.export import export_checkpoint


def run(run_dir, records, *args, nproc=1, expect_kill=False, expect_code=None):
    """Run the worker; with expect_kill it must die by SIGKILL (as planned, not by a bug)."""
    result = run_ranks(
        [WORKERS / "resumable.py", "--run-dir", run_dir, "--records", records, *args],
        nproc=nproc,
        timeout=400,
        check=not (expect_kill or expect_code),
    )
    if expect_code is not None:
        assert result.returncode == expect_code, result.stdout[-2000:] + result.stderr[-3000:]
    if expect_kill:
        killed = result.returncode == -9 if nproc == 1 else "exitcode: -9" in result.stderr
        assert killed, result.stdout[-2000:] + result.stderr[-3000:]
    return result


LONGER = ("--set", "train.resume_new_schedule=true")  # resuming with a larger train.max_steps: asked for


def effective_stream(records):
    """step -> examples, the last record of each step winning (a resumed run redoes steps)."""
    stream, starts, previous = {}, [], None
    for line in records.read_text().splitlines():
        record = json.loads(line)
        if record["pid"] != previous:
            starts.append(record["step"])
            previous = record["pid"]
        stream[record["step"]] = record["ids"]
    return stream, starts


def weights(run_dir, out):
    return load_file(str(export_checkpoint(run_dir, out) / "model.safetensors"))


def assert_same_weights(a, b, tolerance=1e-6):
    assert a.keys() == b.keys()
    for name in a:
        error = float((a[name] - b[name]).norm() / b[name].norm())
        assert error <= tolerance, (name, error)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The worker's run (tiny recipe, 8 steps, a checkpoint every 2) uninterrupted on one rank:
    the reference of the interrupted runs below. Returns its folder; its records are next to it."""
    root = tmp_path_factory.mktemp("straight")
    run(root / "straight", root / "straight.jsonl")
    return root / "straight"


def test_killed_three_times_then_resumed_equals_uninterrupted(tmp_path, straight):
    killed = tmp_path / "killed"
    records = tmp_path / "killed.jsonl"
    run(killed, records, "--kill-after-step", "2", expect_kill=True)  # after step 3, checkpoint step_2 exists
    run(killed, records, "--kill-after-step", "4", expect_kill=True)  # resumes at 2, dies after step 5
    run(killed, records, "--kill-in-save", "6", expect_kill=True)  # resumes at 4, dies inside the save of step 6
    assert (killed / "checkpoints" / "step_6.partial").is_dir()
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step_4"
    run(killed, records)  # resumes at 4 and finishes

    stream, starts = effective_stream(records)
    assert starts == [0, 2, 4, 4]  # each run began exactly at the last complete checkpoint
    assert stream == effective_stream(straight.with_suffix(".jsonl"))[0]  # none repeated, none skipped
    assert not (killed / "checkpoints" / "step_6.partial").exists()  # cleaned by the next save
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(killed / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))  # one curve, no doubled steps
    assert_same_weights(weights(killed, tmp_path / "a"), weights(straight, tmp_path / "b"))


def test_damaged_latest_falls_back_to_the_previous_checkpoint(tmp_path):
    run_dir, records = tmp_path / "run", tmp_path / "r.jsonl"
    run(run_dir, records, "--steps", "4")
    damaged = run_dir / "checkpoints" / "step_4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    step_2 = sorted((run_dir / "checkpoints" / "step_2").rglob("*"))
    before = {p: p.read_bytes() for p in step_2 if p.is_file()}
    result = run(run_dir, records, "--steps", "6", *LONGER)
    assert "warning: skipping checkpoint step_4" in result.stdout + result.stderr
    assert "resumed from" in result.stdout and "step_2 at step 2" in result.stdout
    assert all(p.read_bytes() == data for p, data in before.items() if p.name != "complete.json")


def test_time_limit_under_the_slurm_template_saves_exits_zero_and_resumes_exactly(tmp_path, straight):
    """launch/slurm/train_single_node.sbatch run by bash, as sbatch runs it, on 2 CPU ranks under
    torchrun. Slurm's time-limit warning (--signal=B:USR1) reaches the shell mid-run: the workers
    save the step they are in (the stop is seen one step later), every process exits 0, and the
    same command run again (the requeued job) resumes there and ends where the uninterrupted run
    of the same recipe ends (one rank, same global batch)."""
    env = dict(
        worker_env(),
        GPUS_PER_NODE="2",
        RUN_DIR=str(tmp_path / "run"),
        PYTHON=sys.executable,
        EMBEDTRAIN_REPO=str(REPO),
        DS_ACCELERATOR="cpu",
    )
    for key in [k for k in env if k.startswith("SLURM_")]:
        env.pop(key)
    same_as_straight = ["--set", "train.max_steps=8", "--set", "train.save_every=2"]
    same_as_straight += ["--set", "train.keep_checkpoints=0", "--set", "logging.every=1"]
    same_as_straight += ["--set", f"data.path={straight / 'prepared'}"]  # its demo data, prepared: not again
    command = ["bash", str(REPO / "launch/slurm/train_single_node.sbatch"), "--config", "tiny", *same_as_straight]
    with open(tmp_path / "stderr", "w") as errors:  # a file: a full stderr pipe would stall the run
        job = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=errors, text=True)
        lines = []
        for line in job.stdout:
            lines.append(line)
            if "step 3:" in line:
                break
        job.send_signal(signal.SIGUSR1)  # what Slurm sends the batch shell 300 s before the time limit
        out = "".join(lines) + job.communicate(timeout=300)[0]
    err = (tmp_path / "stderr").read_text()
    assert job.returncode == 0 and "stop requested (SIGTERM): saved step " in out, out[-2000:] + err[-3000:]
    saved = int(out.split("stop requested (SIGTERM): saved step ")[1].split(",")[0])
    assert 5 <= saved < 8, out[-2000:]  # the signal came after step 3's poll: seen at step 5 at the earliest
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == f"step_{saved}"
    assert (checkpoints / f"step_{saved}" / "complete.json").is_file()

    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert f"step_{saved} at step {saved}" in again.stdout
    assert_same_weights(weights(tmp_path / "run", tmp_path / "a"), weights(straight, tmp_path / "b"))


def test_resume_never_refuses_a_run_with_checkpoints(tmp_path):
    run(tmp_path / "run", tmp_path / "r.jsonl", "--steps", "2")
    result = embedtrain("train", "--config", "tiny", "--output-dir", tmp_path / "run", "--resume", "never")
    assert result.returncode == 2 and "already holds checkpoints and train.resume=never" in result.stderr
    # and resuming it on another data order is refused, by name, before a step is trained
    result = embedtrain(
        "train",
        "--config",
        "tiny",
        "--output-dir",
        tmp_path / "run",
        *("--set", "train.max_steps=4", *LONGER, "--set", "data.mixing=temperature"),
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "the data order would change (data.mixing: proportional -> temperature): keep" in result.stderr
    assert "step 3:" not in result.stdout and (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_2\n"


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    run(tmp_path / "run", tmp_path / "r.jsonl", "--steps", "2")
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=1024,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).save_pretrained(tmp_path / "other")
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REPO / "embedtrain" / "assets" / "tiny-llama" / name, tmp_path / "other" / name)
    result = embedtrain(
        "train",
        "--config",
        "tiny",
        "--output-dir",
        tmp_path / "again",
        "--resume",
        tmp_path / "run",
        "--set",
        f"model.path={tmp_path / 'other'}",
        "--set",
        "train.max_steps=4",
        *LONGER,
    )
    assert result.returncode == 2 and "does not match this model" in result.stderr


def test_unwritable_output_directory_fails_early(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    result = embedtrain("train", "--config", "tiny", "--output-dir", tmp_path / "file" / "run")
    assert result.returncode == 2 and "train.output_dir: cannot write to" in result.stderr


def test_tokenizer_without_pad_or_eos_is_refused(tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(REPO / "embedtrain" / "assets" / "tiny-llama", model)
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    tokenizer_config.pop("eos_token", None)
    (model / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    tokenizer["post_processor"] = None
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    result = embedtrain("train", "--config", "tiny", "--output-dir", tmp_path / "run", "--set", f"model.path={model}")
    assert result.returncode == 2 and "has neither a pad nor an eos token" in result.stderr


def test_full_disk_during_a_save_fails_clearly_and_keeps_the_last_checkpoint(tmp_path):
    run_dir, records = tmp_path / "run", tmp_path / "r.jsonl"
    result = run(run_dir, records, "--steps", "6", "--disk-full-in-save", "4", expect_code=2)
    assert "saving checkpoint step_4 under" in result.stdout and "No space left on device" in result.stdout
    assert "the newest complete checkpoint (step_2) is intact" in result.stdout
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_2"
    assert not (run_dir / "checkpoints" / "step_4.partial").exists()
    result = run(run_dir, records, "--steps", "6")  # space is back: resume from step_2 and finish
    assert "step_2 at step 2" in result.stdout


def test_resume_on_another_world_size_continues_the_same_run(tmp_path):
    """Two ranks die after step 3; one rank resumes from step_2 (ZeRO-3 partitions resharded) and
    ends where an uninterrupted one-rank run ends, having seen the same examples at every step.
    Both runs use token-budget micro-steps (train.micro_batch_tokens), whose cut depends on the
    world size: each step holds the same queries (in another order) and the weights agree."""
    budget = ("--set", "train.micro_batch_tokens=400")
    run(tmp_path / "straight", tmp_path / "straight.jsonl", "--steps", "6", *budget)
    records = tmp_path / "elastic.jsonl"
    run(tmp_path / "elastic", records, "--steps", "6", "--kill-after-step", "2", *budget, nproc=2, expect_kill=True)
    result = run(tmp_path / "elastic", records, "--steps", "6", *budget)
    assert "1 rank(s)" in result.stdout and "step_2 at step 2" in result.stdout
    assert "micro-steps of at most 400 tokens" in result.stdout
    stream, starts = effective_stream(records)
    straight = effective_stream(tmp_path / "straight.jsonl")[0]
    assert starts == [0, 2] and {s: sorted(ids) for s, ids in stream.items()} == {
        s: sorted(ids) for s, ids in straight.items()
    }
    assert_same_weights(weights(tmp_path / "elastic", tmp_path / "a"), weights(tmp_path / "straight", tmp_path / "b"))


PRECISIONS = {
    "fp32-zero3": [],
    # the recipes train in bf16: DeepSpeed skips on the non-finite gradient norm in ZeRO-3, and in
    # ZeRO-1/2 only with bf16.check_grad_overflow (which embedtrain's config check insists on)
    "bf16-zero3": ["--set", "deepspeed.bf16.enabled=true"],
    "bf16-zero2": ["--set", "deepspeed.bf16.enabled=true", "--set", "deepspeed.config=zero2.json"],
}


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_a_non_finite_step_is_skipped_and_counted(tmp_path, precision):
    records = tmp_path / "r.jsonl"
    result = run(tmp_path / "run", records, "--steps", "5", "--nan-at", "2", *PRECISIONS[precision])
    assert "warning: step 3 skipped: non-finite loss or gradient (1 skipped so far" in result.stdout
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [0, 0, 1, 1, 1]
    assert rows[2]["checksum"] == rows[1]["checksum"]  # the NaN step changed no weight
    assert rows[3]["checksum"] != rows[2]["checksum"]  # and training went on
    assert all(math.isfinite(r["checksum"]) for r in rows)  # the weights stayed finite
    assert all(r["loss"] == r["loss"] for i, r in enumerate(rows) if i != 2)


def test_too_many_non_finite_steps_stop_the_run_with_a_checkpoint(tmp_path):
    result = run(
        tmp_path / "run",
        tmp_path / "r.jsonl",
        "--steps",
        "8",
        "--nan-at",
        "3,4,5",
        "--set",
        "train.max_skipped_steps=2",
        expect_code=2,
    )
    assert "3 steps skipped for non-finite losses or gradients, more than train.max_skipped_steps=2" in result.stdout
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_6"


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    run(tmp_path / "run", tmp_path / "r.jsonl", "--steps", "6", "--set", "train.keep_checkpoints=2")
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert kept == ["step_4", "step_6"]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_6"


def test_zero2_on_another_world_size_stops_with_what_to_do(tmp_path):
    zero2 = ["--set", "deepspeed.config=zero2.json"]
    run(tmp_path / "run", tmp_path / "r.jsonl", "--steps", "2", *zero2, nproc=2)
    result = run(tmp_path / "run", tmp_path / "r.jsonl", "--steps", "4", *zero2, *LONGER, expect_code=2)
    assert "was written by 2 rank(s) and this run has 1" in result.stdout
    assert "supported under ZeRO-3 only (this run uses ZeRO stage 2). Resume on 2 rank(s)" in result.stdout
    result = run(tmp_path / "run", tmp_path / "r.jsonl", "--steps", "4", *zero2, *LONGER, nproc=2)  # as it says
    assert "resumed from" in result.stdout and "step_2 at step 2" in result.stdout
    assert all(torch.isfinite(w).all() for w in weights(tmp_path / "run", tmp_path / "export").values())


def test_bf16_zero3_checkpoints_export_and_resume_on_another_world_size(tmp_path):
    """bf16 runs name their optimizer files bf16_zero_pp_rank_R_...: export and resharding read them."""
    bf16 = ["--set", "deepspeed.bf16.enabled=true"]
    run(tmp_path / "run", tmp_path / "r.jsonl", "--steps", "2", *bf16, nproc=2)
    assert (tmp_path / "run" / "checkpoints" / "step_2" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    exported = weights(tmp_path / "run", tmp_path / "export")
    assert exported and all(torch.isfinite(w).all() for w in exported.values())
    result = run(tmp_path / "run", tmp_path / "r.jsonl", "--steps", "4", *bf16, *LONGER)
    assert "1 rank(s)" in result.stdout and "step_2 at step 2" in result.stdout


@pytest.mark.parametrize(
    "case, override, code",
    [
        ("config error", "train.global_batch_size=24", 2),  # 24 = micro 8 x world 2 x 1.5: refused after init
        ("failure", "model.attn_implementation=flash_attention_2", 1),  # flash-attn is not installed: a crash
    ],
)
def test_two_rank_errors_exit_with_their_code_not_a_signal(tmp_path, case, override, code):
    """Exit codes 2 (bad input) and 1 (failure) come through as such on every rank, not as an
    abort (SIGABRT, -6) in the process-group teardown."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "embedtrain.cli",
        "train",
        "--config",
        "tiny",
        "--output-dir",
        str(tmp_path / "run"),
        "--set",
        override,
    ]
    result = subprocess.run(command, cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "embedtrain: error:" in result.stderr
    assert f"exitcode  : {code}" in result.stderr, result.stderr[-3000:]
    assert "terminate called" not in result.stderr and "Signal 6" not in result.stderr
