"""Shared storage checked, not assumed (issue 28, item 2) and raw data prepared without a long
collective wait (item 3): a run folder that is not one folder on every rank stops the run before
step 1; a checkpoint that lacks one rank's shards is never taken as complete, whatever its
complete.json says; a resharded resume reads about 1/W of the optimizer state per rank."""

import json
import math
import shutil

import pytest
import torch

from conftest import run_worker
from embedtrain.errors import CheckpointError
from embedtrain.train import checkpoint
from embedtrain.train.checkpoint import (
    READS,
    checkpoint_problem,
    find_resume_checkpoint,
    partition_pieces,
    publish_checkpoint,
    reset_reads,
    zero3_full_tensors,
    zero3_local_tensors,
)


def test_ranks_with_different_output_folders_stop_before_step_one(tmp_path):
    result, _ = run_worker("shared_folder.py", tmp_path / "r.json", "--root", tmp_path, nproc=2, timeout=300)
    for rank in result["ranks"]:
        assert rank["error"] is not None and not rank["engine_built"]
        assert rank["error"].startswith(
            f"train.output_dir: {tmp_path / 'rank0'} is not one folder shared by every rank"
        )
        assert f"(rank 1) cannot see it; rank 1 was given {tmp_path / 'rank1'}." in rank["error"]
        assert rank["error"].endswith("not a node-local disk")
    # one folder: the check passes on both ranks; the raw data is prepared once, under the lock
    assert len({rank["token"] for rank in result["ranks"]}) == 1
    assert sorted(rank["prepared"] for rank in result["ranks"]) == [0, 1] and result["manifest"]


STATES = {"zero_optimization": {"stage": 3}}


def fake_checkpoint(folder, stage, world, ranks, bf16=False):
    """A checkpoint folder laid out as DeepSpeed 0.19 writes one at `stage` on `world` ranks, with the
    shards of `ranks` only, and a complete.json listing what is there (as a save that listed a
    folder missing a rank's files would have written it)."""
    folder.mkdir(parents=True)
    config = {"zero_optimization": {"stage": stage}}
    models = [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in ranks] if stage == 3 else []
    for name in models or ["mp_rank_00_model_states.pt"]:
        torch.save({"dp_world_size": world, "ds_config": config}, folder / name)
    for r in ranks:
        torch.save(
            {"optimizer_state_dict": {}},
            folder / f"{'bf16_' if bf16 else ''}zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
        )
    (folder / "complete.json").write_text(json.dumps({p.name: p.stat().st_size for p in folder.iterdir()}))
    return folder


@pytest.mark.parametrize("stage, bf16", [(3, False), (3, True), (2, False)])
def test_a_checkpoint_missing_one_ranks_shard_is_not_complete(tmp_path, stage, bf16):
    root = tmp_path / "run" / "checkpoints"
    assert checkpoint_problem(fake_checkpoint(root / "step_2", stage, 2, [0, 1], bf16)) is None
    partial = fake_checkpoint(root / "step_4", stage, 2, [0], bf16)
    (root / "latest").write_text("step_4\n")
    problem = checkpoint_problem(partial)
    assert problem is not None and f"a 2-rank ZeRO-{stage} checkpoint needs one set of shards per" in problem
    assert "optimizer states of rank(s) 1" in problem
    assert find_resume_checkpoint(tmp_path / "run", log=lambda _: None) == root / "step_2"  # falls back
    with pytest.raises(CheckpointError, match="as rank 0 on .* sees it: a 2-rank"):
        checkpoint.own_resume_files(partial, 0)


def test_a_save_whose_shards_rank_zero_cannot_see_is_not_published(tmp_path):
    """complete.json comes from every rank's own list; rank 0 must see each listed file."""
    run = tmp_path / "run"
    (run / "base_model").mkdir(parents=True)
    folder = fake_checkpoint(run / "checkpoints" / "step_2.partial", 3, 2, [0])  # rank 1 wrote elsewhere
    (folder / "complete.json").unlink()
    own = {p.name: p.stat().st_size for p in folder.iterdir()}
    lists = [
        ("node-a", own),
        ("node-b", {"zero_pp_rank_1_mp_rank_00_model_states.pt": 9, "zero_pp_rank_1_mp_rank_00_optim_states.pt": 9}),
    ]
    with pytest.raises(CheckpointError, match=r"rank 0 on node-a does not see .* that host node-b \(rank 1\) wrote"):
        publish_checkpoint(
            run / "checkpoints", "step_2", run, {}, {"model": {}}, None, {"stage": 3, "world": 2, "ranks": lists}
        )
    with pytest.raises(
        CheckpointError, match=r"lacks the model states of rank\(s\) 1 and the optimizer states of rank\(s\) 1"
    ):
        publish_checkpoint(
            run / "checkpoints", "step_2", run, {}, {"model": {}}, None, {"stage": 3, "world": 2, "ranks": lists[:1]}
        )
    assert not (run / "checkpoints" / "step_2").exists() and not (folder / "complete.json").exists()
    lists[1] = ("node-b", {})  # a 1-rank run: published, and the inventory is the writers' lists
    shutil.rmtree(folder)
    fake_checkpoint(folder, 3, 1, [0])
    (folder / "complete.json").unlink()
    publish_checkpoint(
        run / "checkpoints",
        "step_2",
        run,
        {},
        {"model": {}},
        None,
        {"stage": 3, "world": 1, "ranks": [("node-a", own)]},
    )
    assert checkpoint_problem(run / "checkpoints" / "step_2") is None


SHAPES = {"a": (7, 3), "b": (5,), "c": (2,)}  # c: fewer elements than ranks, some partitions all padding


def fake_zero3_state(folder, world, generator):
    """A ZeRO-3 checkpoint's model and optimizer states, laid out as zero3_full_tensors reads them;
    returns the full tensors."""
    folder.mkdir(parents=True)
    full = {key: {n: torch.randn(s, generator=generator) for n, s in SHAPES.items()} for key in ("fp32", "exp_avg")}
    torch.save(
        {"dp_world_size": world, "param_shapes": [SHAPES], "ds_config": STATES},
        folder / "zero_pp_rank_0_mp_rank_00_model_states.pt",
    )
    for rank in range(world):
        flat = {}
        for key, tensors in full.items():
            parts = []
            for t in tensors.values():
                part = math.ceil(t.numel() / world)
                padded = torch.cat([t.flatten(), torch.zeros(part * world - t.numel())])
                parts.append(padded[rank * part : (rank + 1) * part])
            flat[key] = torch.cat(parts)
        state = {
            "fp32_flat_groups": [flat["fp32"]],
            "optimizer_state_dict": {"state": {0: {"exp_avg": flat["exp_avg"], "step": torch.tensor(3.0)}}},
        }
        torch.save({"optimizer_state_dict": state}, folder / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    return full


@pytest.mark.parametrize("old_world", [2, 4])
def test_a_resharded_resume_reads_only_this_ranks_part_of_the_optimizer_state(tmp_path, old_world):
    folder = tmp_path / "step"
    full = fake_zero3_state(folder, old_world, torch.Generator().manual_seed(0))
    for name, tensors in zero3_full_tensors(folder, ("fp32", "exp_avg")):  # the layout export reads
        assert all(torch.equal(tensors[key], full[key][name]) for key in tensors)
    total = sum(t.numel() for t in full["fp32"].values()) * 4 * 2  # fp32 master + one moment
    for world in (1, 2, 3, 4):
        for rank in range(world):
            reset_reads()
            for name, local in zero3_local_tensors(folder, rank, world, ("fp32", "exp_avg")):
                part = math.ceil(math.prod(SHAPES[name]) / world)
                for key in ("fp32", "exp_avg"):
                    expected = torch.cat([full[key][name].flatten(), torch.zeros(part * world)])[
                        rank * part : (rank + 1) * part
                    ]
                    assert torch.equal(local[key], expected), (name, key, world, rank)
            own = sum(
                max(0, min((rank + 1) * math.ceil(t.numel() / world), t.numel()) - rank * math.ceil(t.numel() / world))
                for t in full["fp32"].values()
            )
            assert READS["state_bytes"] == own * 4 * 2 <= total / world + 2 * 4 * len(SHAPES)
            optim = {f for f in READS["files"] if "optim" in f}
            assert len(optim) <= math.ceil(old_world / world) + 1


def test_partition_pieces_cover_the_new_partition_exactly():
    for numel in (1, 5, 17, 64):
        for old_world in (1, 2, 3, 8):
            for world in (1, 2, 4, 5):
                part = math.ceil(numel / world)
                for rank in range(world):
                    pieces = partition_pieces(numel, old_world, world, rank)
                    covered = sorted((target, target + length) for _, _, length, target in pieces)
                    real = max(0, min(part, numel - rank * part))
                    assert sum(b - a for a, b in covered) == real
                    assert all(covered[i][1] == covered[i + 1][0] for i in range(len(covered) - 1))
