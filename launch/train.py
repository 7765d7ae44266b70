"""Entry point for launchers that run a script per rank:

    deepspeed --hostfile hosts launch/train.py --config llama3_2_1b --set data.path=/data/nemotron
    torchrun --nproc_per_node 8 launch/train.py --config tiny

Same options as `embedtrain train`; the launcher sets RANK / WORLD_SIZE / LOCAL_RANK. Rank 0 first
warns about the two launches that lose work on a cluster (launch/README.md): torchrun that kills the
workers 30 s after it forwards a SIGTERM, before a large checkpoint is written, and a deepspeed
launch over several hosts without a .deepspeed_env, which leaves most of the environment behind.
"""

import os
import sys
from pathlib import Path

from embedtrain import distributed
from embedtrain.cli import main


def launch_warnings(environ=os.environ, folders=None):
    """The warnings for this launch (a list of lines); `folders`: where deepspeed looks for its
    environment file (its runner: ~ and the launch folder, which pdsh makes every host's cwd)."""
    folders = folders or (Path.home(), Path.cwd())
    warnings = []
    grace = distributed.launcher_grace_seconds()
    if grace is not None and grace <= 30:
        warnings.append(
            f"warning: torchrun kills the workers {grace} s after it forwards a SIGTERM (preemption, "
            "scancel): a checkpoint that takes longer to write is lost. Set TORCH_ELASTIC_SHUTDOWN_TIMEOUT "
            "above the grace period (the Slurm templates in launch/slurm do; torch without "
            "--shutdown-timeout: signal the workers directly, launch/README.md)"
        )
    nodes = int(environ.get("CROSS_SIZE", "1"))  # set by deepspeed's per-node launcher
    name = environ.get("DS_ENV_FILE", ".deepspeed_env")
    if nodes > 1 and not any((Path(folder) / name).is_file() for folder in folders):
        warnings.append(
            f"warning: a deepspeed launch over {nodes} hosts without {name} in ~ or the launch folder: "
            "the other hosts get only the launching shell's NCCL*, PYTHON*, UCX*, MV2* and MLFLOW* "
            "variables, not TORCH_NCCL_*, OMP_NUM_THREADS or HF_*. Write one with "
            "`python launch/deepspeed_env.py` (launch/README.md)"
        )
    return warnings


if __name__ == "__main__":
    if os.environ.get("RANK", "0") == "0":
        for line in launch_warnings():
            print(line, file=sys.stderr, flush=True)
    # deepspeed's launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(["train", *args])
