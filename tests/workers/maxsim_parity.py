"""MaxSim InfoNCE with the `global` pool on W ranks against one process, on random token embeddings.

    torchrun --standalone --nproc_per_node 2 tests/workers/maxsim_parity.py --out r.json --sizes 3,1
    torchrun --standalone --nproc_per_node 2 tests/workers/maxsim_parity.py --scenarios batch.json

Rank r holds sizes[r] queries (T tokens each) and their passages, whose token count differs per rank
(L_r = 5 + 2r: the gather pads them to a common count), of one global set built identically on
every rank. Every rank also computes the 1-process reference: the `local` pool over the whole set
(the passages padded to the longest count). The mean of the ranks' losses must equal the reference
loss, and each rank's gradient divided by the world size (DeepSpeed averages over ranks) the
reference gradient of its slice. The same run with the gather detached (no gradient to other ranks'
passages, which then get the gradient of this rank's queries only) is reported too: the check must be
able to fail. Rank 0 writes the relative errors.
"""

import argparse
import json
from pathlib import Path

import scenario_batch
import torch
import torch.distributed as dist
import torch.nn.functional as F

from embedtrain import distributed
from embedtrain.config import LossConfig
from embedtrain.train.multi_vector_loss import maxsim_negatives_loss

PER_QUERY, QUERY_TOKENS, DIMS = 3, 4, 8


def global_set(sizes, world):
    """(queries, query masks, per-rank passages and masks, passage hashes), the same on every rank."""
    generator = torch.Generator().manual_seed(0)
    total = sum(sizes)
    queries = F.normalize(torch.randn(total, QUERY_TOKENS, DIMS, generator=generator), dim=-1)
    query_mask = torch.rand(total, QUERY_TOKENS, generator=generator) > 0.3
    query_mask[:, 0] = True
    passages, passage_masks = [], []
    for r in range(world):
        length = 5 + 2 * r
        count = sizes[r] * PER_QUERY
        passages.append(F.normalize(torch.randn(count, length, DIMS, generator=generator), dim=-1))
        mask = torch.rand(count, length, generator=generator) > 0.3
        mask[:, 0] = True
        passage_masks.append(mask)
    passage_hash = torch.arange(total * PER_QUERY)
    passage_hash[-1] = 0  # the last passage repeats the text of query 0's positive: masked
    return queries, query_mask, passages, passage_masks, passage_hash


def padded(tensors, width):
    return torch.cat(
        [F.pad(t, (0, 0, 0, width - t.shape[1]) if t.dim() == 3 else (0, width - t.shape[1])) for t in tensors]
    )


def rank_gradients(q, qm, p, pm, positive_hash, passage_hash, config):
    q, p = q.clone().requires_grad_(), p.clone().requires_grad_()
    loss, stats = maxsim_negatives_loss(q, qm, p, pm, positive_hash, passage_hash, config)
    loss.backward()
    return loss.detach(), q.grad, p.grad, stats


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--sizes", default="3,1")
    parser.add_argument("--temperature", type=float, default=0.1)
    args = parser.parse_args(argv)
    rank, world, _ = distributed.init_distributed()
    sizes = [int(s) for s in args.sizes.split(",")]
    assert world == len(sizes), (world, sizes)
    queries, query_mask, passages, passage_masks, passage_hash = global_set(sizes, world)
    positive_hash = passage_hash[::PER_QUERY].clone()
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    passage_rows = slice(start * PER_QUERY, (start + sizes[rank]) * PER_QUERY)
    config = LossConfig(negatives="global", temperature=args.temperature)

    def run(config):
        loss, q_grad, p_grad, stats = rank_gradients(
            queries[rows], query_mask[rows], passages[rank], passage_masks[rank],
            positive_hash[rows], passage_hash[passage_rows], config,
        )  # fmt: skip
        mean_loss = loss.reshape(1).clone()
        dist.all_reduce(mean_loss)
        return mean_loss.item() / world, q_grad / world, p_grad / world, stats

    loss, q_grad, p_grad, stats = run(config)
    real_gather = distributed.gather_with_grad

    def detached_gather(tensor, group=None, uniform=False):  # other ranks' rows without gradient
        pool, offset = real_gather(tensor, group, uniform)
        pool = pool.detach()
        return torch.cat([pool[:offset], tensor, pool[offset + tensor.shape[0] :]]), offset

    distributed.gather_with_grad = detached_gather
    try:
        _, q_detached, p_detached, _ = run(config)
    finally:
        distributed.gather_with_grad = real_gather

    width = max(p.shape[1] for p in passages)
    reference = LossConfig(negatives="local", temperature=args.temperature)
    ref_loss, ref_q, ref_p, _ = rank_gradients(
        queries,
        query_mask,
        padded(passages, width),
        padded(passage_masks, width),
        positive_hash,
        passage_hash,
        reference,
    )
    ref_p_rank = ref_p[passage_rows, : passages[rank].shape[1]]
    assert not ref_p[passage_rows, passages[rank].shape[1] :].any()  # padding gets no gradient

    def relative(grad, ref):
        return float((grad - ref).abs().max() / ref.abs().max().clamp(min=1e-30))

    errors = torch.tensor([
        relative(q_grad, ref_q[rows]), relative(p_grad, ref_p_rank),
        relative(q_detached, ref_q[rows]), relative(p_detached, ref_p_rank),
    ])  # fmt: skip
    dist.all_reduce(errors, op=dist.ReduceOp.MAX)
    if rank == 0:
        result = {
            "loss": loss,
            "ref_loss": ref_loss.item(),
            "query_grad_error": errors[0].item(),
            "passage_grad_error": errors[1].item(),
            "detached_query_grad_error": errors[2].item(),
            "detached_passage_grad_error": errors[3].item(),
            "masked_fraction": float(stats["masked_fraction"]),
            "world": world,
        }
        Path(args.out).write_text(json.dumps(result))


scenario_entry = main  # what tests/workers/scenario_batch.py runs for an entry naming this worker

if __name__ == "__main__":
    scenario_batch.run(main)
    distributed.shutdown()
