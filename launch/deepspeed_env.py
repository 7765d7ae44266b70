"""Write .deepspeed_env: the environment every host of a multi-host deepspeed launch needs.

    python launch/deepspeed_env.py              # writes ./.deepspeed_env, prints what it wrote
    python launch/deepspeed_env.py --out ~/.deepspeed_env

A multi-host `deepspeed --hostfile` launch starts the other hosts' processes over pdsh/ssh, not
from this shell. Its runner (deepspeed/launcher/runner.py) exports to them the variables of this
shell whose names start with NCCL (only when this host has CUDA), PYTHON, UCX, MV2 or MLFLOW, then
every KEY=VALUE line of ~/.deepspeed_env and ./.deepspeed_env (DS_ENV_FILE names another file).
Nothing else arrives: TORCH_NCCL_ASYNC_ERROR_HANDLING, OMP_NUM_THREADS, HF_HOME stay here.

Written: the settings of launch/slurm/train_multinode.sbatch, replaced by this shell's value of any
of them, plus every variable set here whose name starts with one of CARRIED. One KEY=VALUE a line
and nothing else: the runner splits each line at its first '=', and a line without one (blank, a
comment) makes it fail.
"""

import argparse
import os
from pathlib import Path

DEFAULTS = {  # as launch/slurm/train_multinode.sbatch sets them
    "NCCL_ASYNC_ERROR_HANDLING": "1",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "TORCH_NCCL_BLOCKING_WAIT": "0",
    "NCCL_DEBUG": "WARN",
    "NCCL_SOCKET_IFNAME": "^lo,docker0",
    "NCCL_IB_DISABLE": "0",
    "OMP_NUM_THREADS": "8",
    "TOKENIZERS_PARALLELISM": "false",
}
CARRIED = ("NCCL_", "TORCH_NCCL_", "TORCH_DISTRIBUTED_", "HF_", "TRANSFORMERS_", "DS_ACCELERATOR", "CUDA_")


def environment(environ=os.environ):
    """{name: value} to write: DEFAULTS overridden by this shell, and the CARRIED variables set here.
    CUDA_VISIBLE_DEVICES is left out: the launcher sets it per host from the hostfile."""
    chosen = {key: environ.get(key, value) for key, value in DEFAULTS.items()}
    for key, value in sorted(environ.items()):
        if key.startswith(CARRIED) and key != "CUDA_VISIBLE_DEVICES" and "\n" not in value:
            chosen[key] = value
    return chosen


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=".deepspeed_env", help="the file to write (default ./.deepspeed_env)")
    args = parser.parse_args()
    text = "".join(f"{key}={value}\n" for key, value in environment().items())
    Path(args.out).expanduser().write_text(text)
    print(f"wrote {args.out} (deepspeed exports these on every host):\n{text}", end="")


if __name__ == "__main__":
    main()
