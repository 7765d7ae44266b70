"""Every collective embedtrain issues puts its tensors on the communication device (CUDA under
NCCL), on every call path of a training run: checked on CPU by marking that device's tensors
(tests/workers/collective_devices.py)."""

from conftest import ASSETS, run_worker

EXPECTED_PATHS = {
    "all_gather from embedtrain.distributed.gather_sizes",  # global pool: per-rank sizes
    "all_gather from embedtrain.distributed._gather_uneven",  # global pool and eval embeddings
    "all_reduce from embedtrain.distributed.backward",  # gradient of the gathered pool
    "all_reduce from embedtrain.distributed.all_reduce_mean",  # logging
    "all_reduce from embedtrain.distributed.exchange",  # stop and save flags (DeferredMax)
}


def test_every_collective_uses_the_communication_device(tmp_path):
    result, _ = run_worker(
        "collective_devices.py",
        tmp_path / "r.json",
        "--run-dir",
        tmp_path / "run",
        "--eval-path",
        ASSETS / "demo-data",
        nproc=2,
        timeout=400,
    )
    assert result["checker_refuses_plain_tensor"]
    for rank in result["ranks"]:
        assert rank["violations"] == []
        assert EXPECTED_PATHS <= set(rank["calls"]), sorted(rank["calls"])
