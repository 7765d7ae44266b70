"""GradCache: the loss and gradients of the plain step at the same batch (fp32, relative 1e-5) under
ZeRO-3 and ZeRO-2, on 1 and 2 ranks, with the global pool and activation checkpointing; RNG replay
of dropout; one optimizer step per global batch in the training loop."""

import pytest

from conftest import run_worker, shared_scenarios
from embedtrain.config import ConfigError, deepspeed_config, deepspeed_micro_steps, load_config

TOLERANCE = 1e-5
PLAIN_STEP = [
    (1, ["--stage", "3", "--micro", "4", "--grad-cache", "2"]),
    (2, ["--stage", "3", "--micro", "4", "--grad-cache", "2", "--accumulation", "2"]),
    (2, ["--stage", "2", "--micro", "2", "--grad-cache", "1", "--query-negatives"]),
    (2, ["--stage", "3", "--micro", "4", "--grad-cache", "1", "--matryoshka"]),
]
DROPOUT = ["--micro", "4", "--grad-cache", "2", "--dropout", "0.3"]


RUNS = {
    1: {"replayed": DROPOUT, "broken": [*DROPOUT, "--no-replay"]},
    2: {},
}
for _world, _extra in PLAIN_STEP:
    RUNS[_world][" ".join(_extra)] = ["--negatives", "global", *_extra]
for _world, _scenarios in RUNS.items():
    shared_scenarios(__name__, _world, "grad_parity.py", _scenarios)


@pytest.fixture(scope="module")
def parity(scenario_launch):
    """This file's grad_parity.py scenarios (the session's shared launches): {world: {key: result}}."""
    return {world: scenario_launch(__name__, world) for world in RUNS}


@pytest.mark.parametrize("world, extra", PLAIN_STEP)
def test_grad_cache_matches_the_plain_step(parity, world, extra):
    """DeepSpeed + GradCache on W ranks against one plain PyTorch step on the whole global batch."""
    result = parity[world][" ".join(extra)]
    assert abs(result["ds_loss"] - result["ref_loss"]) <= TOLERANCE * abs(result["ref_loss"]), result
    assert result["max_rel_error"] < TOLERANCE, result
    assert result["replay_error"] == 0.0, result
    chunks = int(extra[extra.index("--micro") + 1]) // int(extra[extra.index("--grad-cache") + 1])
    accumulation = int(extra[extra.index("--accumulation") + 1]) if "--accumulation" in extra else 1
    assert result["ds_accumulation"] == chunks * accumulation, result


def test_grad_cache_replays_dropout_and_the_check_can_fail(parity):
    """With attention dropout, the second pass reproduces the cached embeddings exactly only
    because the RNG state is replayed; without replay the difference shows."""
    replayed = parity[1]["replayed"]
    assert replayed["replay_error"] == 0.0, replayed
    broken = parity[1]["broken"]
    assert broken["replay_error"] > 1e-3, broken


def test_grad_cache_trains_like_the_plain_step(tmp_path):
    """Three optimizer steps through the training loop, plain and with GradCache chunks of 2:
    the same losses at every step, so the LR schedule and the optimizer advance once per global
    batch, not once per chunk."""
    losses = {}
    for name, chunk in (("plain", 0), ("grad_cache", 2)):
        result, _ = run_worker(
            "train_and_embed.py",
            tmp_path / f"{name}.json",
            "--run-dir",
            tmp_path / name,
            "--steps",
            "3",
            "--set",
            f"train.grad_cache_chunk_size={chunk}",
            timeout=300,
        )
        losses[name] = result["losses"]
    assert len(losses["plain"]) == 3
    for plain, cached in zip(losses["plain"], losses["grad_cache"]):
        assert abs(plain - cached) <= TOLERANCE * abs(plain), losses


def test_grad_cache_chunk_must_divide_the_micro_batch():
    with pytest.raises(
        ConfigError, match="train.grad_cache_chunk_size=3 must be 0 .off. or divide train.micro_batch_size=8"
    ):
        load_config("tiny", ["train.grad_cache_chunk_size=3"])


def test_deepspeed_sees_one_micro_step_per_chunk():
    config = load_config(
        "tiny", ["train.global_batch_size=32", "train.micro_batch_size=8", "train.grad_cache_chunk_size=2"]
    )
    assert deepspeed_micro_steps(config, 2) == (2, 8)  # 2 accumulation x 4 chunks
    ds = deepspeed_config(config, 2)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (
        2,
        8,
        32,
    )
