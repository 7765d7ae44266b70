"""Which examples each rank sees at each step.

The contract (DESIGN.md, global batch order): the sequence of global batches depends only on the
data, the seed and the global batch size, never on the number of ranks. Global batch t is positions
[t*G, (t+1)*G) of the endless sequence epoch 0, epoch 1, ..., each epoch a permutation drawn from
(seed, epoch). Rank r of W takes slice r of it; micro-batch m is slice m of the rank's share.
Everything is a pure function of the step, so resuming at step t replays nothing.

With gradient accumulation A, global batch t is cut into A global micro-batches of W x B queries,
and rank r takes slice r of each. So the passages pooled across ranks at micro-step m (the
`global` negative pool) are the same whether W ranks hold B queries each or one rank holds W x B.
"""

import numpy as np


def epoch_order(num_examples, seed, epoch):
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def global_batch(num_examples, global_batch_size, seed, step):
    """Example indices of global batch `step` (crossing an epoch boundary when needed)."""
    start = step * global_batch_size
    indices = []
    while len(indices) < global_batch_size:
        epoch, offset = divmod(start + len(indices), num_examples)
        order = epoch_order(num_examples, seed, epoch)
        indices.extend(order[offset: offset + global_batch_size - len(indices)].tolist())
    return indices


def rank_micro_batches(indices, rank, world_size, micro_batch_size):
    """Rank r's micro-batches of one global batch: slice r of each global micro-batch."""
    stride = world_size * micro_batch_size
    return [indices[start + rank * micro_batch_size: start + (rank + 1) * micro_batch_size]
            for start in range(0, len(indices), stride)]


class StepStream:
    """In-memory examples served by (step, rank): the minimal stream; Arrow shards plug in here."""

    def __init__(self, examples, global_batch_size, micro_batch_size, seed, rank, world_size):
        if len(examples) < global_batch_size:
            raise ValueError(f"train.global_batch_size={global_batch_size} exceeds the {len(examples)} examples loaded")
        self.examples = examples
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size

    def micro_batches(self, step):
        indices = global_batch(len(self.examples), self.global_batch_size, self.seed, step)
        return [[self.examples[i] for i in micro]
                for micro in rank_micro_batches(indices, self.rank, self.world_size, self.micro_batch_size)]

    def state(self, step):
        return {"next_step": step, "seed": self.seed, "global_batch_size": self.global_batch_size,
                "num_examples": len(self.examples)}
