"""Entry point for launchers that run a script per rank:

    deepspeed --hostfile hosts launch/train.py --config llama3_2_1b --set data.path=/data/nemotron
    torchrun --nproc_per_node 8 launch/train.py --config tiny

Same options as `embedtrain train`; the launcher sets RANK / WORLD_SIZE / LOCAL_RANK.
"""

import sys

from embedtrain.cli import main

if __name__ == "__main__":
    # deepspeed's launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(["train", *args])
