"""Which examples each rank sees at each step, streamed from a prepared (sharded) dataset.

The contract (docs/design.md, global batch order): the sequence of global batches depends only on the
data, the seed and the global batch size, never on the number of ranks. With accumulation A,
global batch t is cut into A global micro-batches of W x B queries and rank r takes slice r of
each, so the passages pooled across ranks at a micro-step (the `global` negative pool) are the
same whether W ranks hold B queries or one rank holds W x B.

Token budgets (train.micro_batch_tokens = N > 0) cut the same assignment further, in whole queries
(each with its passages) of at most N tokens: with the `group` pool (and rerankers) rank r's share
(its A slices, in order) becomes variable micro-steps; with `local`/`global` each micro-batch stays
B queries (the pool) and N sizes its GradCache chunks. Every rank runs the same number of cuts:
each rank tokenizes the whole global batch (a pure function of the step) and computes every rank's
cut (`token_budget_cuts`), without communicating.

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


def greedy_cut(tokens, budget):
    """Queries per micro-step: consecutive queries while their tokens stay within `budget` (a query
    over the budget alone gets a micro-step of its own)."""
    sizes, held = [], 0
    for count in tokens:
        if sizes and held + count <= budget:
            sizes[-1] += 1
            held += count
        else:
            sizes.append(1)
            held = count
    return sizes


def split_to(sizes, tokens, count):
    """`sizes` split further until there are `count` micro-steps: each split halves (by tokens) the
    micro-step with the most tokens among those of two queries or more (the first on a tie), so every
    part stays within the budget and none is empty."""
    sizes = list(sizes)
    while len(sizes) < count:
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        held = [sum(tokens[starts[i] : starts[i + 1]]) for i in range(len(sizes))]
        splittable = [i for i, size in enumerate(sizes) if size > 1]
        if not splittable:
            raise ValueError(f"a share of {len(tokens)} queries cannot be cut into {count} non-empty micro-steps")
        i = max(splittable, key=lambda j: (held[j], -j))
        part = tokens[starts[i] : starts[i + 1]]
        left = min(range(1, len(part)), key=lambda k: (max(sum(part[:k]), sum(part[k:])), k))
        sizes[i : i + 1] = [left, len(part) - left]
    return sizes


def token_budget_cuts(rank_tokens, budget):
    """Every rank's cut of its share into micro-steps of whole queries holding at most `budget`
    tokens (a single longer query alone), all with the same number of micro-steps.

    `rank_tokens[r]`: the tokens of each query of rank r's share, in order (a query's tokens are its
    own and its passages', as collated). Returns, per rank, the queries per micro-step (they sum to
    the share, in order). The count is the most any rank needs; a rank that needs fewer splits its
    fullest micro-steps (split_to). The training loop's shares all hold the same number of queries
    S, and no cut has more than S micro-steps, so a rank always has enough queries; shares of
    unequal sizes for which that fails raise ValueError. Pure and deterministic: every rank computes
    every rank's cut from the same global batch.
    """
    if budget <= 0:
        raise ValueError(f"train.micro_batch_tokens must be positive here, got {budget}")
    cuts = [greedy_cut(tokens, budget) for tokens in rank_tokens]
    count = max(len(sizes) for sizes in cuts)
    return [split_to(sizes, list(tokens), count) for sizes, tokens in zip(cuts, rank_tokens)]


def split_by(items, sizes):
    """`items` cut into consecutive lists of `sizes`."""
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    return [items[starts[i] : starts[i + 1]] for i in range(len(sizes))]


class StepBatches(torch.utils.data.IterableDataset):
    """Yields (step, collated micro-batches, examples) for this rank, for steps [start, stop).

    DataLoader workers split the steps round-robin (worker w takes start + w, start + w + K, ...),
    which is also the order in which the DataLoader returns them: no duplicates, no reordering.
    `positive_sampling` (data.positive_sampling): first, or cycle (a query's positive number is its
    epoch, see Sampler.global_batch_epochs), so examples stay a pure function of the step.
    `micro_batch_tokens` (train.micro_batch_tokens; 0 = off): the token budget. `budget_chunks`:
    it sizes each micro-batch's GradCache chunks (local/global pools: the collator is called with
    the chunk sizes) instead of cutting the rank's share into micro-steps (group pool, rerankers).
    The collator needs `example_tokens` (tokens per example, as it collates them) for either.
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
        micro_batch_tokens=0,
        budget_chunks=False,
    ):
        self.dataset, self.sampler, self.collator = dataset, sampler, collator
        self.micro_batch_tokens, self.budget_chunks = micro_batch_tokens, budget_chunks
        self.rank, self.world_size, self.micro_batch_size = rank, world_size, micro_batch_size
        self.hard_negatives, self.start, self.stop = hard_negatives, start, stop
        self.length_bucketing = length_bucketing
        if positive_sampling not in POSITIVE_SAMPLING:
            raise ValueError(
                f"data.positive_sampling: {positive_sampling!r} is not one of {', '.join(POSITIVE_SAMPLING)}"
            )
        self.positive_sampling = positive_sampling

    def global_draws(self, step):
        """Global batch `step` as (dataset index, positive number) pairs, in micro-batch order."""
        indices, epochs = self.sampler.global_batch_epochs(step)
        positives = epochs if self.positive_sampling == "cycle" else [0] * len(indices)
        draws = list(zip(indices, positives))
        if self.length_bucketing:
            # similar lengths share a micro-batch: less padding, same examples in the global batch
            draws = sorted(draws, key=lambda draw: self.dataset.length(draw[0]))
        return draws

    def micro_batch_draws(self, step):
        """This rank's micro-batches of global batch `step`, as (dataset index, positive number) pairs."""
        return rank_micro_batches(self.global_draws(step), self.rank, self.world_size, self.micro_batch_size)

    def _examples(self, micro):
        return [self.dataset.example(index, self.hard_negatives, positive) for index, positive in micro]

    def plan(self, step):
        """This rank's micro-steps of global batch `step`: (examples, GradCache chunk sizes or None)."""
        if not self.micro_batch_tokens:
            return [(self._examples(micro), None) for micro in self.micro_batch_draws(step)]
        draws = self.global_draws(step)
        ranks = [  # every rank's micro-batches: each rank computes every rank's cut
            [self._examples(micro) for micro in rank_micro_batches(draws, rank, self.world_size, self.micro_batch_size)]
            for rank in range(self.world_size)
        ]
        flat = [example for micros in ranks for micro in micros for example in micro]
        tokens = iter(self.collator.example_tokens(flat))
        counts = [[[next(tokens) for _ in micro] for micro in micros] for micros in ranks]
        mine = ranks[self.rank]
        if self.budget_chunks:  # the micro-batch stays (the pool); its chunks follow the budget
            return [
                (micro, token_budget_cuts([c[a] for c in counts], self.micro_batch_tokens)[self.rank])
                for a, micro in enumerate(mine)
            ]
        shares = [[count for micro in micros for count in micro] for micros in counts]
        sizes = token_budget_cuts(shares, self.micro_batch_tokens)[self.rank]
        return [(part, None) for part in split_by([e for micro in mine for e in micro], sizes)]

    def examples(self, step):
        """This rank's examples of global batch `step`, one list per micro-step."""
        return [examples for examples, _ in self.plan(step)]

    def collate(self, examples, chunks):
        return self.collator(examples) if chunks is None else self.collator(examples, chunks=chunks)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for step in range(self.start + worker, self.stop, workers):
            plan = self.plan(step)
            self.dataset.release()  # keep RSS independent of how much of the dataset was read
            yield step, [self.collate(examples, chunks) for examples, chunks in plan], [e for e, _ in plan]


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
