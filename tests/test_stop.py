"""Stopping and time-based saves, at unit level (the whole path, SIGTERM under torchrun as the Slurm
template sends it, is tests/test_resume.py::test_time_limit_under_the_slurm_template_...): Ctrl-C
asks to stop and a second one aborts; rank 0's clock alone decides a timed save; the launch
warnings and .deepspeed_env of multi-host launches."""

import importlib.util
import os
import signal

import pytest

from conftest import REPO
from embedtrain.train import loop
from embedtrain.train.loop import StopRequest


def test_ctrl_c_asks_to_stop_and_a_second_one_aborts(monkeypatch, capfd):
    before = signal.getsignal(signal.SIGINT)
    stop = StopRequest(rank=0)
    try:
        assert stop.poll(1) == (False, False)  # nothing in flight yet
        os.kill(os.getpid(), signal.SIGINT)  # a stop request, not KeyboardInterrupt (click's "Aborted!")
        os.kill(os.getpid(), signal.SIGINT)  # the launcher's forwarded copy of the same key press
        assert stop.poll(2) == (False, False)  # reads the flags sent at step 1, before the signal
        assert stop.poll(3) == (True, False) and stop.reason() == "SIGINT"  # one exchange later
        assert "Ctrl-C again to abort" in capfd.readouterr().err
        monkeypatch.setattr(StopRequest, "REPEAT_SECONDS", 0.0)

        def exit_now(code):
            raise SystemExit(code)

        monkeypatch.setattr(loop.os, "_exit", exit_now)
        with pytest.raises(SystemExit) as aborted:
            os.kill(os.getpid(), signal.SIGINT)
        assert aborted.value.code == 130 and "aborted, nothing saved" in capfd.readouterr().err
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is before  # the handler is given back


@pytest.mark.parametrize("rank", [0, 1])
def test_timed_saves_follow_rank_0s_clock_and_a_save_in_between_answers_them(rank):
    stop = StopRequest(rank=rank, save_every_minutes=1e-9)  # due at once, on rank 0's clock only
    try:
        assert stop.poll(1) == (False, False)
        assert stop.poll(2) == (False, rank == 0)  # rank 0 sent "save" at step 1: every rank saves at 2
        stop.saved(2)
        assert stop.poll(3) == (False, False)  # sent at 2 before that save: already answered
        assert stop.poll(4) == (False, rank == 0)
    finally:
        stop.finish()
        stop.restore()


def load_launch_train():
    spec = importlib.util.spec_from_file_location("launch_train", REPO / "launch" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_launch_warns_about_torchruns_30_seconds_and_a_missing_deepspeed_env(tmp_path, monkeypatch):
    launch = load_launch_train()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    monkeypatch.delenv("PET_SHUTDOWN_TIMEOUT", raising=False)
    warnings = launch.launch_warnings({"CROSS_SIZE": "2"}, folders=[tmp_path])
    assert len(warnings) == 2
    assert "torchrun kills the workers 30 s after" in warnings[0] and ".deepspeed_env" in warnings[1]
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "900")  # as the Slurm templates export it
    (tmp_path / ".deepspeed_env").write_text("NCCL_DEBUG=WARN\n")
    assert launch.launch_warnings({"CROSS_SIZE": "2"}, folders=[tmp_path]) == []


def test_deepspeed_env_carries_the_templates_settings_and_this_shells(tmp_path):
    spec = importlib.util.spec_from_file_location("deepspeed_env", REPO / "launch" / "deepspeed_env.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    chosen = module.environment({"NCCL_DEBUG": "INFO", "HF_HOME": "/shared/hf", "CUDA_VISIBLE_DEVICES": "0", "X": "1"})
    assert chosen["NCCL_DEBUG"] == "INFO" and chosen["HF_HOME"] == "/shared/hf"
    assert chosen["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and "X" not in chosen
    assert "CUDA_VISIBLE_DEVICES" not in chosen  # the launcher sets it per host
