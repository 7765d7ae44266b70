"""Train on W ranks with every embedtrain collective checked for device placement.

    torchrun --standalone --nproc_per_node 2 tests/workers/collective_devices.py --out r.json --run-dir RUN

Under NCCL a collective on a CPU tensor fails, and on CPU (gloo) every tensor is a CPU tensor, so a
plain CPU run cannot see the mistake. This worker makes it visible: `distributed.on_comm_device`,
the one way embedtrain puts a tensor on the communication device, is patched to mark its result
(a tensor subclass, which torch carries through new_zeros, empty_like, slicing and cat), and the
torch.distributed collectives refuse, when called from an embedtrain module, any tensor without
the mark: one made on the default device, as `torch.tensor([...])` would be under NCCL.

The run covers every collective path of training: the global pool (sizes, gathers with gradient,
query negatives), logging reductions, the stop and save flags (non-blocking), in-training evaluation, checkpoints,
and run_on_main. Rank 0 writes the calls seen and the violations found.
"""

import argparse
import json
import sys

import torch
import torch.distributed as dist

from embedtrain import distributed
from embedtrain.config import load_config

TENSOR_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "broadcast",
    "reduce_scatter_tensor",
    "reduce",
    "all_to_all_single",
    "gather",
    "scatter",
)


class CommTensor(torch.Tensor):
    """A CPU tensor standing for one on the communication device."""


def unmarked(value):
    """The tensors in a collective's argument that do not carry the communication-device mark."""
    if isinstance(value, torch.Tensor):
        return [] if isinstance(value, CommTensor) else [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in unmarked(item)]
    return []


def install_checks(calls, violations):
    distributed.on_comm_device = lambda tensor: tensor.to(distributed.comm_device()).as_subclass(CommTensor)
    # the stop and save flags travel on the host on purpose (gloo's CPU backend carries them under
    # "cpu:gloo,cuda:nccl" without a CUDA sync); under NCCL alone on_host_comm hands them to on_comm_device
    real_host = distributed.on_host_comm
    distributed.on_host_comm = lambda tensor: real_host(tensor).as_subclass(CommTensor)
    for name in TENSOR_COLLECTIVES:
        real = getattr(dist, name)

        def checked(*args, _real=real, _name=name, **kwargs):
            caller = sys._getframe(1)
            module = caller.f_globals.get("__name__", "")
            if module.startswith("embedtrain"):  # DeepSpeed's own collectives are not ours to check
                where = f"{module}.{caller.f_code.co_name}"
                calls.add(f"{_name} from {where}")
                bad = unmarked(list(args) + list(kwargs.values()))
                if bad:
                    violations.append(f"{_name} from {where}: {len(bad)} tensor(s) not on the communication device")
            return _real(*args, **kwargs)

        setattr(dist, name, checked)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--eval-path", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    calls, violations = set(), []
    install_checks(calls, violations)
    config = load_config(
        "tiny",
        [
            "train.max_steps=4",
            "train.save_every=2",
            "logging.every=1",
            "train.stop_check_every=1",
            "loss.negatives=global",
            "loss.query_negatives=true",
            f"eval.path={args.eval_path}",
            "eval.every=2",
            "eval.max_queries=8",
            *args.overrides,
        ],
        output_dir=args.run_dir,
    )
    from embedtrain.train.loop import train

    train(config)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, {"calls": sorted(calls), "violations": violations})
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            # the checker must be able to fail: a tensor made on the default device is refused
            json.dump({"ranks": every, "checker_refuses_plain_tensor": unmarked([torch.zeros(1)]) != []}, f, indent=2)


if __name__ == "__main__":
    main()
    distributed.shutdown()
