"""The `global` negative pool: cross-rank gradients equal the 1-rank gradients at the same global
batch (fp32, relative 1e-5), a detached gather fails the same check, uneven ranks work, and the
batch order does not depend on the world size."""

import pytest
from safetensors.torch import load_file

from conftest import run_worker, shared_scenarios
from embedtrain.export import export_checkpoint

TOLERANCE = 1e-5
GLOBAL_POOL = [
    (2, []),
    (3, []),
    (2, ["--accumulation", "2"]),
    (2, ["--query-negatives"]),
    (2, ["--matryoshka"]),
]


TWO_RANKS = {"detached": ["--negatives", "global", "--detached"]}  # first: its patch must not leak into the rest
TWO_RANKS.update({" ".join(e): ["--negatives", "global", *e] for world, e in GLOBAL_POOL if world == 2})
shared_scenarios(__name__, 2, "grad_parity.py", TWO_RANKS)


@pytest.fixture(scope="module")
def two_ranks(scenario_launch):
    """Every 2-rank grad_parity.py scenario of this file (the session's shared launch), keyed by its arguments."""
    return scenario_launch(__name__, 2)


@pytest.mark.parametrize("world, extra", GLOBAL_POOL)
def test_global_pool_gradients_match_one_rank(two_ranks, tmp_path, world, extra):
    if world == 2:
        result = two_ranks[" ".join(extra)]
    else:
        result, _ = run_worker("grad_parity.py", tmp_path / "r.json", "--negatives", "global", *extra, nproc=world)
    assert result["world"] == world
    assert abs(result["ds_loss"] - result["ref_loss"]) <= TOLERANCE * abs(result["ref_loss"]), result
    assert result["max_rel_error"] < TOLERANCE, result


def test_a_detached_gather_fails_the_parity_check(two_ranks):
    """Gather without gradient, put the local slice back, local-queries loss: the scheme of several
    toolkits. Same loss, wrong gradient, so the parity test is able to fail."""
    result = two_ranks["detached"]
    assert abs(result["ds_loss"] - result["ref_loss"]) <= TOLERANCE * abs(result["ref_loss"])
    assert result["max_rel_error"] > 0.1, result


@pytest.mark.parametrize("sizes, extra", [("3,1", []), ("3,1,2", []), ("4,1", ["--query-negatives"])])
def test_uneven_rank_sizes_finish_with_the_right_loss(tmp_path, sizes, extra):
    result, _ = run_worker(
        "gather_uneven.py", tmp_path / "r.json", "--sizes", sizes, *extra, nproc=len(sizes.split(",")), timeout=300
    )
    assert abs(result["loss"] - result["ref_loss"]) <= TOLERANCE * abs(result["ref_loss"]), result
    assert result["max_grad_error"] < 1e-5 and result["masked_fraction"] > 0, result


def test_one_and_two_ranks_see_the_same_batches_and_end_equal(tmp_path):
    """Global batch 16: one rank with micro-batch 16, or two ranks with micro-batch 8 each, pool the
    same 16 queries' passages at every step."""
    results, weights = {}, {}
    for world in (1, 2):
        run = tmp_path / f"run{world}"
        results[world], _ = run_worker(
            "train_and_embed.py",
            tmp_path / f"r{world}.json",
            "--run-dir",
            run,
            "--steps",
            "5",
            "--set",
            "loss.negatives=global",
            "--set",
            f"train.micro_batch_size={16 // world}",
            nproc=world,
            timeout=400,
        )
        weights[world] = load_file(str(export_checkpoint(run, tmp_path / f"out{world}") / "model.safetensors"))
    assert results[1]["batches"] == results[2]["batches"]
    assert len(results[1]["batches"]) == 5 and len(results[1]["batches"][0]) == 16
    for name, one_rank in weights[1].items():
        error = (weights[2][name] - one_rank).norm() / one_rank.norm()
        assert error < TOLERANCE, (name, float(error))
