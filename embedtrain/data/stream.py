"""Which examples each rank sees at each step, streamed from a prepared (sharded) dataset.

The contract (docs/design.md, global batch order): the sequence of global batches depends only on the
data, the seed and the global batch size, never on the number of ranks. With accumulation A,
global batch t is cut into A global micro-batches of W x B queries and rank r takes slice r of
each, so the passages pooled across ranks at a micro-step (the `global` negative pool) are the
same whether W ranks hold B queries or one rank holds W x B.

Mixing of subsets (`data.mixing`):
  proportional   one shuffled pass over the union of all queries per epoch (every query once);
  temperature    each draw picks subset s with probability ~ n_s^(1/T) (T = data.mixing_temperature,
                 or explicit data.subset_weights); each subset cycles through its own permutations;
  single_subset  like temperature, but the whole global batch comes from one subset.
Shuffles are keyed permutations (a Feistel network with cycle walking): O(1) memory in the
dataset size, and the example at any position is computed without touching earlier ones. The
resume state is the step number; subset cursors of the weighted modes are recomputed from it by
integer arithmetic (no data is read or replayed). The sampler also says how often each drawn query
was drawn before (its epoch), from which `data.positive_sampling=cycle` picks the query's positive.
"""

import math

import numpy as np
import torch

MIXING_MODES = ("proportional", "temperature", "single_subset")
POSITIVE_SAMPLING = ("first", "cycle")


def _keys(*seed):
    return np.random.SeedSequence([int(s) for s in seed]).generate_state(4, dtype=np.uint64)


def _mix64(x):
    """splitmix64's finaliser: a well-mixed 64-bit hash of each element (uint64 arithmetic wraps)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(positions, n, keys):
    """A keyed pseudo-random permutation of range(n), applied to `positions` (numpy int array).

    Balanced 4-round Feistel network on 2h bits (4^h >= n), cycle-walked back into range(n).
    """
    half = max(1, math.ceil(math.log2(max(n, 2)) / 2))
    mask = np.uint64((1 << half) - 1)
    values = np.asarray(positions, dtype=np.uint64).copy()
    pending = np.ones(values.shape, dtype=bool)
    with np.errstate(over="ignore"):
        while pending.any():
            x = values[pending]
            left, right = x >> np.uint64(half), x & mask
            for key in keys:
                left, right = right, left ^ (_mix64(right ^ key) & mask)
            values[pending] = (left << np.uint64(half)) | right
            pending = values >= np.uint64(n)
    return values.astype(np.int64)


class Sampler:
    """Global batch t -> dataset indices; a pure function of (subset sizes, seed, batch size, t)."""

    def __init__(self, subset_sizes, global_batch_size, seed, mode="proportional", temperature=1.0, weights=None):
        if mode not in MIXING_MODES:
            raise ValueError(f"data.mixing: {mode!r} is not one of {', '.join(MIXING_MODES)}")
        self.sizes = list(subset_sizes)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.total = int(self.starts[-1])
        if self.total < global_batch_size:
            raise ValueError(f"train.global_batch_size={global_batch_size} exceeds the {self.total} queries")
        self.global_batch_size, self.seed, self.mode = global_batch_size, seed, mode
        raw = np.asarray(weights if weights is not None else [n ** (1.0 / temperature) for n in self.sizes], float)
        raw[np.asarray(self.sizes) == 0] = 0.0
        self.probabilities = raw / raw.sum()
        self._cursor_step, self._cursors = 0, np.zeros(len(self.sizes), dtype=np.int64)

    def _counts(self, step):
        rng = np.random.default_rng([self.seed, step, 7])
        if self.mode == "single_subset":
            counts = np.zeros(len(self.sizes), dtype=np.int64)
            counts[rng.choice(len(self.sizes), p=self.probabilities)] = self.global_batch_size
            return counts
        return rng.multinomial(self.global_batch_size, self.probabilities).astype(np.int64)

    def cursors(self, step):
        """Per-subset draws made before `step` (weighted modes); cached for forward access."""
        if step < self._cursor_step:
            self._cursor_step, self._cursors = 0, np.zeros_like(self._cursors)
        while self._cursor_step < step:
            self._cursors = self._cursors + self._counts(self._cursor_step)
            self._cursor_step += 1
        return self._cursors

    def global_batch(self, step):
        """The dataset indices of global batch `step`."""
        return self.global_batch_epochs(step)[0]

    def global_batch_epochs(self, step):
        """(indices, epochs) of global batch `step`: epochs[i] is how many times indices[i] was drawn
        before (proportional: its pass over the union; weighted modes: its subset's pass), in the
        sampler's order. data.positive_sampling=cycle picks the positive from it."""
        if self.mode == "proportional":
            positions = np.arange(step * self.global_batch_size, (step + 1) * self.global_batch_size)
            epochs, offsets = np.divmod(positions, self.total)
            out = np.empty_like(positions)
            for epoch in np.unique(epochs):
                sel = epochs == epoch
                out[sel] = permute(offsets[sel], self.total, _keys(self.seed, epoch))
            return out.tolist(), epochs.tolist()
        counts, start = self._counts(step), self.cursors(step)
        indices, draw_epochs = [], []
        for subset in np.flatnonzero(counts):
            draws = np.arange(start[subset], start[subset] + counts[subset])
            epochs, offsets = np.divmod(draws, self.sizes[subset])
            for epoch in np.unique(epochs):
                sel = epochs == epoch
                rows = permute(offsets[sel], self.sizes[subset], _keys(self.seed, epoch, subset + 1))
                indices.extend((rows + self.starts[subset]).tolist())
                draw_epochs.extend([int(epoch)] * len(rows))
        # subsets were drawn in blocks; interleave them so micro-batches mix subsets
        order = permute(np.arange(len(indices)), len(indices), _keys(self.seed, step, 0))
        return [indices[i] for i in order], [draw_epochs[i] for i in order]


def rank_micro_batches(indices, rank, world_size, micro_batch_size):
    """Rank r's micro-batches of one global batch: slice r of each global micro-batch."""
    stride = world_size * micro_batch_size
    return [
        indices[start + rank * micro_batch_size : start + (rank + 1) * micro_batch_size]
        for start in range(0, len(indices), stride)
    ]


class StepBatches(torch.utils.data.IterableDataset):
    """Yields (step, collated micro-batches, examples) for this rank, for steps [start, stop).

    DataLoader workers split the steps round-robin (worker w takes start + w, start + w + K, ...),
    which is also the order in which the DataLoader returns them: no duplicates, no reordering.
    `positive_sampling` (data.positive_sampling): first, or cycle (a query's positive number is its
    epoch, see Sampler.global_batch_epochs), so examples stay a pure function of the step.
    """

    def __init__(
        self,
        dataset,
        sampler,
        collator,
        rank,
        world_size,
        micro_batch_size,
        hard_negatives,
        start,
        stop,
        length_bucketing=False,
        positive_sampling="first",
    ):
        self.dataset, self.sampler, self.collator = dataset, sampler, collator
        self.rank, self.world_size, self.micro_batch_size = rank, world_size, micro_batch_size
        self.hard_negatives, self.start, self.stop = hard_negatives, start, stop
        self.length_bucketing = length_bucketing
        if positive_sampling not in POSITIVE_SAMPLING:
            raise ValueError(
                f"data.positive_sampling: {positive_sampling!r} is not one of {', '.join(POSITIVE_SAMPLING)}"
            )
        self.positive_sampling = positive_sampling

    def micro_batch_draws(self, step):
        """This rank's micro-batches of global batch `step`, as (dataset index, positive number) pairs."""
        indices, epochs = self.sampler.global_batch_epochs(step)
        positives = epochs if self.positive_sampling == "cycle" else [0] * len(indices)
        draws = list(zip(indices, positives))
        if self.length_bucketing:
            # similar lengths share a micro-batch: less padding, same examples in the global batch
            draws = sorted(draws, key=lambda draw: self.dataset.length(draw[0]))
        return rank_micro_batches(draws, self.rank, self.world_size, self.micro_batch_size)

    def examples(self, step):
        """This rank's examples of global batch `step`, one list per micro-batch."""
        return [
            [self.dataset.example(index, self.hard_negatives, positive) for index, positive in micro]
            for micro in self.micro_batch_draws(step)
        ]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for step in range(self.start + worker, self.stop, workers):
            examples = self.examples(step)
            self.dataset.release()  # keep RSS independent of how much of the dataset was read
            yield step, [self.collator(micro) for micro in examples], examples


def stream_state(step, sampler, dataset, positive_sampling="first"):
    """What a checkpoint records about the data position (the step is the whole position)."""
    return {
        "next_step": step,
        "seed": sampler.seed,
        "global_batch_size": sampler.global_batch_size,
        "mixing": sampler.mode,
        "positive_sampling": positive_sampling,
        "subsets": dataset.names,
        "num_queries": len(dataset),
    }
