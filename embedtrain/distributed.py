"""All distributed code lives here: process-group start-up, rank helpers and the cross-rank
gathers used by the `global` negative pool.

Gradient semantics of `gather_with_grad`: every rank's loss is the mean over its own queries and
DeepSpeed averages gradients over ranks, so the optimised objective is the mean over all queries of
the global batch. A passage on rank r is scored by the queries of every rank, so its gradient is
the SUM over ranks of d(loss_rank)/d(passage): the backward all-reduces (sums) the gradient of the
gathered pool and hands each rank its own slice. That equals the 1-rank gradient exactly.
"""

import datetime
import os
import socket
import sys
import warnings

import torch
import torch.distributed as dist

from embedtrain.errors import ConfigError


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(timeout_minutes=30):
    """Join the process group the launcher described (deepspeed, torchrun, srun), or make a
    1-process group when started as a plain command. Returns (rank, world_size, local_rank)."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(process_group_backend(), timeout=datetime.timedelta(minutes=timeout_minutes))
    _disable_deepspeed_shm_build()
    # DeepSpeed 0.19 calls a torch API that torch 2.13 deprecates, once per step: noise, not news.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\..* is deprecated.*", category=FutureWarning)
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank


def process_group_backend():
    """gloo on CPU. With CUDA, NCCL for CUDA tensors and gloo for CPU ones: NCCL alone fails on any
    CPU tensor ("No backend type associated with device type cpu"), and a CPU tensor that slips past
    `comm_device` should cost a copy, not the run."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def comm_device():
    """The device every tensor handed to a collective lives on: the current CUDA device when the
    process group runs NCCL, else the CPU. All collectives below put their tensors there."""
    if dist.is_initialized() and "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def on_comm_device(tensor):
    """`tensor` on the communication device (no copy when it is already there). Every tensor that
    a collective in this module sends or receives is made by this function or derived from one
    that was (tests/workers/collective_devices.py checks that on every call path)."""
    return tensor.to(comm_device())


def _disable_deepspeed_shm_build():
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (~35 s, needs gcc) the first
    time it wraps the process group. On CPU we run on gloo and do not need it; on GPU it is unused."""
    import importlib

    # importlib: `import deepspeed.comm.torch as m` binds the real torch (deepspeed.comm re-exports it)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def rank(group=None):
    return dist.get_rank(group) if dist.is_initialized() else 0


def world_size(group=None):
    return dist.get_world_size(group) if dist.is_initialized() else 1


def negatives_group(group_size):
    """The process group whose passages form the `global` pool: the whole world (size 0), or
    consecutive blocks of `group_size` ranks (e.g. the GPUs of one node). Every rank must call it."""
    world = world_size()
    if group_size in (0, world):
        return None
    if group_size < 0 or world % group_size:
        raise ConfigError(f"loss.gather_group_size={group_size} must divide the world size {world}")
    group, _ = dist.new_subgroups(group_size=group_size, backend=process_group_backend())
    return group


def is_main_process():
    return rank() == 0


def run_on_main(function):
    """Run `function` on rank 0 only; every rank then returns its result or raises its error (so a
    failure on rank 0 stops all ranks instead of leaving them waiting in a collective)."""
    outcome = (None, None)
    if rank() == 0:
        try:
            outcome = (function(), None)
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            outcome = (None, err)
    outcome = broadcast_object(outcome)
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


def shutdown(exit_code=0, wait_for_peers=True):
    """End the process (after every rank got here, with `wait_for_peers`). `os._exit` skips
    interpreter and C++ teardown: destroying gloo's process group while a peer is already gone
    sometimes aborts the process ('terminate called without an active exception'), which would turn
    a finished run into a crash and an error's exit code into a signal. Errors leave without the
    barrier: a peer may never reach it (the launcher stops the others)."""
    if wait_for_peers and dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def gather_sizes(length, group=None):
    """Every rank's first-dimension size (ranks may hold uneven batches)."""
    size = on_comm_device(torch.tensor([length], dtype=torch.long))
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    return [int(s.item()) for s in sizes]


def _gather_uneven(tensor, sizes, group):
    """all_gather of tensors whose first dimensions differ: pad to the largest, gather, trim.
    The result is on `tensor`'s device."""
    longest = max(sizes)
    padded = on_comm_device(tensor).new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded, group=group)
    return torch.cat([piece[:size] for piece, size in zip(pieces, sizes)]).to(tensor.device)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        ctx.rank = dist.get_rank(group)
        return _gather_uneven(tensor, sizes, group)

    @staticmethod
    def backward(ctx, grad_pool):
        summed = on_comm_device(grad_pool).contiguous()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return summed[start : start + ctx.sizes[ctx.rank]].to(grad_pool.device), None, None


def gather_with_grad(tensor, group=None, uniform=False):
    """Concatenate every rank's `tensor` (first dims may differ) in rank order, keeping gradient.
    `uniform`: every rank holds as many rows as this one, so the size exchange (a collective and a
    host sync) is skipped.

    Returns (pool, offset): `pool` is the concatenation, `offset` where this rank's rows start.
    With one process it is the identity.
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return tensor, 0
    sizes = [tensor.shape[0]] * dist.get_world_size(group) if uniform else gather_sizes(tensor.shape[0], group)
    offset = sum(sizes[: dist.get_rank(group)])
    return _GatherWithGrad.apply(tensor, sizes, group), offset


def gather_no_grad(tensor, group=None, uniform=False):
    """Concatenate every rank's `tensor` in rank order, without gradient (ids, hashes)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return tensor
    sizes = [tensor.shape[0]] * dist.get_world_size(group) if uniform else gather_sizes(tensor.shape[0], group)
    return _gather_uneven(tensor, sizes, group)


def gather_tokens_with_grad(embeddings_PLD, mask_PL, group=None, uniform=False):
    """Every rank's token embeddings (P_r, L_r, D) with their masks (P_r, L_r), concatenated in rank
    order: each rank's rows padded with zeros (masked out) to the longest L_r of the group (one
    exchange of the token counts), then gathered as gather_with_grad (embeddings, with gradient:
    each rank gets the sum over ranks of the gradient of its own rows) and gather_no_grad (masks).
    `uniform`: every rank holds as many rows as this one (token counts may still differ).
    Returns (pool_NLD, pool_mask_NL, offset); the identity with one process."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return embeddings_PLD, mask_PL, 0
    width = max(gather_sizes(embeddings_PLD.shape[1], group))
    missing = width - embeddings_PLD.shape[1]
    padded_PLD = torch.nn.functional.pad(embeddings_PLD, (0, 0, 0, missing))  # differentiable
    padded_mask_PL = torch.nn.functional.pad(mask_PL.to(torch.uint8), (0, missing))  # bool: not every backend
    pool_NLD, offset = gather_with_grad(padded_PLD, group, uniform)
    return pool_NLD, gather_no_grad(padded_mask_PL, group, uniform).bool(), offset


def all_reduce_mean(value):
    """Mean of a python float over ranks (for logging)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return float(value)
    tensor = on_comm_device(torch.tensor([float(value)], dtype=torch.float64))
    dist.all_reduce(tensor)
    return float(tensor.item()) / dist.get_world_size()


def any_rank(flag):
    """True on every rank when `flag` is true on at least one (e.g. a stop request)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return bool(flag)
    tensor = on_comm_device(torch.tensor([1.0 if flag else 0.0]))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def init_inference(timeout_minutes=30):
    """Join the process group of a torchrun/deepspeed launch for inference (eval, mine): gloo on
    CPU; with CUDA "cpu:gloo,cuda:nccl" (host tensors and objects over gloo, GPU tensors over NCCL)
    and this rank's GPU made current. A no-op for one process (no group is made). Returns
    (rank, world_size, local_rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world <= 1 and not dist.is_initialized():
        return 0, 1, local_rank
    if not dist.is_initialized():
        backend = "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            backend = "cpu:gloo,cuda:nccl"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return dist.get_rank(), dist.get_world_size(), local_rank


def run_sharded(run, report):
    """`run()` on every rank of a torchrun/deepspeed launch (or in one process), then
    `report(result)` on rank 0; a launch's process group then ends the process (shutdown). An
    error of `run()` reaches the caller, who reports it (the command line: without the barrier)."""
    rank, world, _ = init_inference()
    result = run()
    if rank == 0:
        report(result)
    if world > 1:
        shutdown()


def broadcast_object(value, src=0):
    """`value` of rank `src` on every rank (a path, a small dict); the identity for one process."""
    if world_size() == 1:
        return value
    objects = [value]  # broadcast_object_list fills the list in place
    dist.broadcast_object_list(objects, src=src)
    return objects[0]


def all_gather_object(value):
    """Every rank's `value` (small and picklable: a flag, a host name), in rank order; [value] for
    one process."""
    if world_size() == 1:
        return [value]
    every = [None] * world_size()
    dist.all_gather_object(every, value)
    return every


def gather_object(value, dst=0):
    """Every rank's `value` (small and picklable) in rank order on rank `dst`, None on the others;
    [value] for one process. Unlike all_gather_object, only `dst` receives W values."""
    if world_size() == 1:
        return [value]
    every = [None] * world_size() if rank() == dst else None
    dist.gather_object(value, every, dst=dst)
    return every


def hosts_of(ranks, hosts):
    """'host node-b (ranks 2, 3), host node-c (rank 4)': `ranks` grouped by their host (`hosts[r]`)."""
    by_host = {}
    for index in ranks:
        by_host.setdefault(hosts[index], []).append(index)
    return ", ".join(
        f"host {host} (rank{'s' if len(members) > 1 else ''} {', '.join(map(str, members))})"
        for host, members in by_host.items()
    )


SHARED_CHECK_DELAYS = (0.2, 0.5, 1.0, 2.0, 4.0)  # seconds between a rank's re-reads (NFS attribute caches)


def check_shared_folder(folder, setting="train.output_dir"):
    """Every rank: prove that `folder` is one folder shared by all ranks, before anything is written
    into it that another rank must read (checkpoint shards, prepared data). Rank 0 writes a fresh
    token into a file there; after a barrier every rank reads it, re-reading a few times (7.7 s at
    most, only on a rank that does not see it yet: a network file system's client may cache the
    folder's listing for a few seconds). A rank that still does not see it has the folder on a
    disk of its own (e.g. a node-local --output-dir in a hostfile launch): every rank raises the
    same ConfigError, naming the hosts. Returns the token (unique to this start of the run).
    One process: nothing to check."""
    import time
    import uuid
    from pathlib import Path

    if world_size() == 1:
        return uuid.uuid4().hex
    token = broadcast_object(uuid.uuid4().hex if rank() == 0 else None)
    probe = Path(folder) / f".embedtrain-shared-{token}"
    if rank() == 0:
        with open(probe, "w") as f:
            f.write(token)
            f.flush()
            os.fsync(f.fileno())
    barrier()
    sees = _reads_token(probe, token)
    for delay in SHARED_CHECK_DELAYS:
        if sees:
            break
        time.sleep(delay)
        sees = _reads_token(probe, token)
    every = all_gather_object((socket.gethostname(), sees, str(folder)))
    if rank() == 0:
        probe.unlink(missing_ok=True)
    hosts = [host for host, _, _ in every]
    blind = [index for index, (_, seen, _) in enumerate(every) if not seen]
    if blind:
        other = [index for index, (_, _, path) in enumerate(every) if path != every[0][2]]
        raise ConfigError(
            f"{setting}: {every[0][2]} is not one folder shared by every rank: rank 0 on {hosts[0]} wrote "
            f"{probe.name} there, and {hosts_of(blind, hosts)} cannot see it"
            + "".join(f"; rank {index} was given {every[index][2]}" for index in other[:3])
            + ". Each rank writes its own "
            "checkpoint shards there and resume reads every rank's: give --output-dir a path on storage "
            "that every node mounts at the same place (a network file system), not a node-local disk"
        )
    return token


def _reads_token(probe, token):
    try:
        os.listdir(probe.parent)  # a fresh listing: NFS clients then revalidate the folder
        return probe.read_text() == token
    except OSError:
        return False


def on_host_comm(tensor):
    """`tensor` for a collective that must not wait on the GPU (the stop and save flags): a host
    tensor, which the process group carries over gloo on a gloo thread ("cpu:gloo,cuda:nccl",
    process_group_backend), so neither starting nor reading it synchronises a CUDA stream. A group
    without gloo (NCCL alone, made by someone else) gets it on the communication device."""
    if dist.is_initialized() and "gloo" not in str(dist.get_backend()):
        return on_comm_device(tensor)
    return tensor.cpu()


class DeferredMax:
    """Small integer flags agreed on by every rank one exchange late, without a blocking host sync:
    `exchange(values)` starts a non-blocking MAX all-reduce of this rank's `values` and returns the
    result of the one started at the previous call (None at the first). Every rank must call it at
    the same points, in the same order (it is a collective). By the next call every rank has
    started the previous reduction (ranks step in lockstep), so reading it rarely waits."""

    def __init__(self):
        self.pending = None

    def exchange(self, values):
        agreed = self.finish()
        tensor = on_host_comm(torch.tensor(values, dtype=torch.int32))
        work = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            work = dist.all_reduce(tensor, op=dist.ReduceOp.MAX, async_op=True)
        self.pending = (tensor, work)
        return agreed

    def finish(self):
        """The pending reduction's result (None when nothing is pending); nothing stays in flight."""
        if self.pending is None:
            return None
        tensor, work = self.pending
        self.pending = None
        if work is not None:
            work.wait()
        return [int(v) for v in tensor.tolist()]


def launcher_grace_seconds():
    """Seconds this worker's launcher waits after forwarding SIGTERM/SIGINT before it SIGKILLs the
    workers; None when it is not torchrun. torchrun's elastic agent waits `--shutdown-timeout` /
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (torch/distributed/launcher/api.py, pytorch/pytorch#172596);
    a torch whose LaunchConfig has no shutdown_timeout waits a fixed 30 s
    (torch/distributed/elastic/multiprocessing/api.py, PContext.close). The worker inherits the
    agent's environment, so the variable is visible here; the command-line option is not."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    from torch.distributed.launcher.api import LaunchConfig

    if "shutdown_timeout" not in getattr(LaunchConfig, "__dataclass_fields__", {}):
        return 30
    # torchrun's own option (--shutdown-timeout, or PET_SHUTDOWN_TIMEOUT) wins over the variable
    return int(os.environ.get("PET_SHUTDOWN_TIMEOUT") or os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30"))
