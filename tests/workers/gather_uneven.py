"""Global negative pool with different numbers of queries per rank, on raw embeddings.

    torchrun --standalone --nproc_per_node 3 tests/workers/gather_uneven.py --out r.json --sizes 3,1,2

Rank r holds sizes[r] queries (and their passages) of one global set. The mean of the ranks'
losses must equal the 1-process loss over the whole set, and each rank's gradient divided by the
world size (DeepSpeed averages over ranks) must equal the 1-process gradient of its slice.
"""

import argparse
import json

import torch
import torch.distributed as dist
import torch.nn.functional as F

from embedtrain import distributed
from embedtrain.config import LossConfig
from embedtrain.train.step import negatives_loss


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--sizes", required=True)
    parser.add_argument("--query-negatives", action="store_true")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rank, world, _ = distributed.init_distributed(timeout_minutes=2)
    assert world == len(sizes)
    per_query, dims = 3, 16
    total = sum(sizes)
    generator = torch.Generator().manual_seed(0)
    queries = F.normalize(torch.randn(total, dims, generator=generator), dim=-1)
    passages = F.normalize(torch.randn(total * per_query, dims, generator=generator), dim=-1)
    passage_hash = torch.arange(total * per_query)
    passage_hash[-1] = 0  # the last passage repeats the text of query 0's positive: must be masked
    positive_hash = passage_hash[::per_query].clone()
    config = LossConfig(negatives="global", temperature=0.05, query_negatives=args.query_negatives)

    start = sum(sizes[:rank])
    rows, passage_rows = slice(start, start + sizes[rank]), slice(start * per_query, (start + sizes[rank]) * per_query)
    q = queries[rows].clone().requires_grad_()
    p = passages[passage_rows].clone().requires_grad_()
    loss, stats = negatives_loss(q, p, positive_hash[rows], passage_hash[passage_rows], config)
    loss.backward()
    mean_loss = torch.tensor([loss.item()])
    dist.all_reduce(mean_loss)
    mean_loss = mean_loss.item() / world

    q_ref, p_ref = queries.clone().requires_grad_(), passages.clone().requires_grad_()
    config.negatives = "local"  # one process holding everything
    ref_loss, _ = negatives_loss(q_ref, p_ref, positive_hash, passage_hash, config)
    ref_loss.backward()
    errors = [
        float((q.grad / world - q_ref.grad[rows]).abs().max()),
        float((p.grad / world - p_ref.grad[passage_rows]).abs().max()),
    ]
    worst = torch.tensor([max(errors)])
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "loss": mean_loss,
                    "ref_loss": ref_loss.item(),
                    "max_grad_error": worst.item(),
                    "masked_fraction": float(stats["masked_fraction"]),
                },
                f,
            )


if __name__ == "__main__":
    main()
    distributed.shutdown()
