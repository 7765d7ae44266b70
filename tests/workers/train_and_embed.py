"""Train the tiny recipe on W ranks, then embed fixed texts with the in-process (ZeRO-3) encoder.

    torchrun --standalone --nproc_per_node 2 tests/workers/train_and_embed.py --out r.json --run-dir RUN

Rank 0 writes: the per-step losses, whether every parameter was partitioned across the ranks,
and the embeddings of TEXTS (as queries of the FEVER subset and as raw documents).
"""

import argparse
import json
import math

import torch
import torch.distributed as dist

from embedtrain import distributed
from embedtrain.config import load_config
from embedtrain.model.encoder import load_tokenizer
from embedtrain.train.loop import train

TEXTS = [
    "Shilin Linlofo is a chemist.",
    "A short one.",
    "Dorbra Ostmorven (born 1948 in Bergen) is an architect best known for works made of copper.",
]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    config = load_config(
        "tiny",
        [f"train.max_steps={args.steps}", "train.save_every=2", "logging.every=1", *args.overrides],
        output_dir=args.run_dir,
    )
    losses, batches = [], []

    def record(step, stats, micro_batches):
        losses.append(stats["loss"])
        every_rank = [None] * dist.get_world_size()
        dist.all_gather_object(every_rank, [[e.query for e in micro] for micro in micro_batches])
        # global order: micro-batch m of rank 0, of rank 1, ...; then micro-batch m + 1
        batches.append([q for m in range(len(every_rank[0])) for ranks in every_rank for q in ranks[m]])

    engine = train(config, on_step=record)
    world = engine.world_size
    partitioned = all(p.ds_tensor.numel() <= math.ceil(p.ds_numel / world) for p in engine.module.parameters())
    tokenizer = load_tokenizer(config.model.path, config.model.padding_side)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    engine.eval()
    with torch.no_grad():
        embeddings = engine(batch["input_ids"], batch["attention_mask"])
    if engine.global_rank == 0:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "losses": losses,
                    "batches": batches,
                    "world": world,
                    "partitioned": partitioned,
                    "texts": TEXTS,
                    "embeddings": embeddings.tolist(),
                },
                f,
            )


if __name__ == "__main__":
    main()
    distributed.shutdown()
