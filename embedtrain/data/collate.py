"""Examples -> token batches: prompt (embedtrain.prompts) + text, separate max lengths for the
query and passage sides, padding to a multiple of 8."""

import hashlib
import numbers
import sys

import torch

from embedtrain.data.nemotron import content_hash
from embedtrain.model.multi_vector import expanded_query_batch
from embedtrain.model.packing import pack_rows, padded_inputs
from embedtrain.prompts import training_policy


class Collator:
    """Tokenises a list of Examples into one encoder batch for queries and passages together.

    Returns a dict: inputs (an EncoderInputs, model/packing.py), the queries first, then each
    query's passages contiguous (positive first); num_queries; positive_hash (Q, K): the content hashes of each
    query's known positives, its target's first (K = the most in the micro-batch, a shorter row
    padded by repeating its first hash); passage_hash (Q*G,); token counts
    (tokens, real_tokens, squared_lengths: the sum of each sequence's length squared, for the
    attention FLOPs). With data.packing the sequences are packed into rows (model/packing.py: the
    layout, sequence boundaries and the index that pools each sequence travel with the ids);
    without it they are padded to the longest. With GradCache (chunk_size) the encoder
    tensors come per chunk of queries with their passages, in "chunks".
    """

    def __init__(self, tokenizer, data_config, subsets, chunk_size=0, teacher=None, one_row=False):
        """`subsets`: name -> {"query_instruction", "passage_instruction"} (the prepared manifest's).
        `teacher`: a TeacherCache (embedtrain.data.teacher) for distillation: the batch then also holds
        teacher_query (Q, T) and teacher_passage (Q*G, T), float32, looked up by each raw text.
        `one_row`: packed rows run a variable-length kernel (model.attention.packs_in_one_row), so with
        data.pack_length 0 an encoder call packs into ONE row: no slack at row ends, and no W^2 cost."""
        self.tokenizer = tokenizer
        self.config = data_config
        self.chunk_size = chunk_size
        self.teacher = teacher
        self.policy = training_policy(data_config, subsets)
        self.subset_prompts = {name: self.policy.for_subset(info) for name, info in subsets.items()}
        self.pack_length = default_pack_length(
            data_config, max(data_config.query_max_length, data_config.passage_max_length), one_row
        )

    def tokenize(self, examples):
        """(query token lists, passage token lists) with prompts, each side truncated to its max."""
        queries = [self.subset_prompts[e.subset][0] + e.query for e in examples]
        passages = [self.subset_prompts[e.subset][1] + p for e in examples for p in e.passages]
        return (
            self.tokenizer(queries, max_length=self.config.query_max_length, truncation=True)["input_ids"],
            self.tokenizer(passages, max_length=self.config.passage_max_length, truncation=True)["input_ids"],
        )

    def example_tokens(self, examples):
        """The tokens of each example as collated (prompts and truncation applied): its query's and
        its passages'. train.micro_batch_tokens cuts by these (embedtrain.data.stream)."""
        query_ids, passage_ids = self.tokenize(examples)
        lengths = [len(ids) for ids in passage_ids]
        per_query = len(passage_ids) // max(1, len(query_ids))
        return [len(ids) + sum(lengths[i * per_query : (i + 1) * per_query]) for i, ids in enumerate(query_ids)]

    def __call__(self, examples, chunks=None):
        """`chunks`: queries per encoder call (GradCache chunks sized by train.micro_batch_tokens);
        default: train.grad_cache_chunk_size (the collator's chunk_size) or one call."""
        query_ids, passage_ids = self.tokenize(examples)
        batch = self.assemble(
            query_ids,
            passage_ids,
            [known_positive_hashes(e) for e in examples],
            [content_hash(p) for e in examples for p in e.passages],
            chunks,
        )
        if self.teacher is not None:
            batch["teacher_query"] = torch.from_numpy(self.teacher.lookup([e.query for e in examples], "query"))
            passages = [p for e in examples for p in e.passages]
            batch["teacher_passage"] = torch.from_numpy(self.teacher.lookup(passages, "passage"))
        return batch

    def assemble(self, query_ids, passage_ids, positive_hash, passage_hash, chunks=None):
        """The batch dict of token lists (queries, then passages grouped by query) and hashes.
        `positive_hash`: per query, a list of its known positives' hashes (target first) or one hash.
        `chunks`: queries per encoder call, as in __call__."""
        per_query = len(passage_ids) // len(query_ids)
        parts = [
            self.encoder_inputs(query_ids[start:stop] + passage_ids[start * per_query : stop * per_query], stop - start)
            for start, stop in chunk_bounds(len(query_ids), self.chunk_size, chunks)
        ]
        batch = {
            "positive_hash": positive_hash_matrix(positive_hash),
            "passage_hash": torch.tensor(passage_hash, dtype=torch.long),
        }
        return self.with_parts(batch, parts)

    def with_parts(self, batch, parts):
        """`batch` with its encoder calls: under GradCache (chunk_size) as "chunks", else the one part's
        tensors at the top level."""
        if self.chunk_size or len(parts) > 1:
            batch["chunks"] = parts
        else:
            batch.update(parts[0])
        return batch

    def encoder_inputs(self, sequences, num_queries):
        """One encoder call for `sequences` (the first `num_queries` are queries): {"inputs": an
        EncoderInputs (model/packing.py), packed with data.packing, else padded to the longest; made
        here on the CPU so that the model reads the layout without a device sync; moved to the device
        in one call}, plus num_queries and the token counts."""
        pad_id, multiple = self.tokenizer.pad_token_id, self.config.pad_to_multiple_of
        if self.config.packing:
            inputs = pack_rows(sequences, self.pack_length, pad_id, multiple)
        else:
            padded = self.tokenizer.pad({"input_ids": sequences}, pad_to_multiple_of=multiple, return_tensors="pt")
            inputs = padded_inputs(padded["input_ids"], padded["attention_mask"])
        lengths = [len(sequence) for sequence in sequences]
        return {
            "inputs": inputs,
            "num_queries": num_queries,
            "tokens": inputs.input_ids.numel(),
            "real_tokens": sum(lengths),
            "squared_lengths": sum(n * n for n in lengths),
        }


def chunk_bounds(num_queries, chunk_size=0, chunks=None):
    """(start, stop) query ranges of the encoder calls: `chunks` (queries per call) if given, else
    calls of chunk_size queries (0: one call)."""
    if chunks is None:
        step = chunk_size or num_queries
        chunks = [min(step, num_queries - start) for start in range(0, num_queries, step)]
    if sum(chunks) != num_queries or min(chunks) <= 0:
        raise ValueError(f"chunks {chunks} do not cut {num_queries} queries into non-empty parts")
    stops = [int(stop) for stop in torch.tensor(chunks).cumsum(0)]
    return list(zip([0, *stops[:-1]], stops))


def default_pack_length(data_config, longest, one_row=False):
    """Row capacity of packed batches: data.pack_length when set; else, where rows run a block mask
    (the CPU, eager: cost grows with the row length squared), the longest sequence; where they run
    a variable-length kernel (one_row), unbounded: all of an encoder call's sequences in one row."""
    if data_config.pack_length:
        return data_config.pack_length
    return sys.maxsize if one_row else longest


def known_positive_hashes(example):
    """The content hashes of an example's known positives: its target (passages[0]) first, then the
    others the prepared data lists (Examples built elsewhere may list none)."""
    target = content_hash(example.passages[0])
    others = example.positive_hashes
    return [target] + [h for h in dict.fromkeys(others) if h != target]


def positive_hash_matrix(rows):
    """(Q, K) LongTensor of per-query hash lists (or single hashes), each row padded to the longest
    by repeating its first hash: a repeat masks nothing more, so no sentinel value is needed."""
    rows = [[row] if isinstance(row, numbers.Integral) else list(row) for row in rows]
    width = max((len(row) for row in rows), default=1)
    return torch.tensor([row + row[:1] * (width - len(row)) for row in rows], dtype=torch.long).view(len(rows), width)


class PairCollator(Collator):
    """Tokenises Examples for a reranker (model.kind=reranker): every (query, passage) pair is one
    sequence, `data.pair_template` truncated to `data.pair_max_length` tokens, ordered query by
    query (positive first, then its hard negatives, then its in-batch negatives). Returns the
    encoder tensors (packed or padded, as Collator's), group_size (pairs per query),
    inbatch_negatives (the last columns of each group that pair the query with another query's
    positive), positive_hash and passage_hash (as Collator's, one hash per pair: the loss masks
    negatives that are a known positive) and, with chunk_size, "chunks" of whole queries' pairs.

    `inbatch_negatives` (loss.inbatch_negatives under loss.negatives=local): each query is also
    paired with that many other queries' positives (targets) of the micro-batch, at most Q - 1,
    drawn by inbatch_negative_donors from a seed that is a function of the micro-batch's examples
    (micro_batch_seed): the collator consumes no random state, and a resumed run or another GradCache
    chunking of the same micro-batch scores the same pairs. A cross-encoder must score every such
    pair in its own sequence, so they cost as much as hard negatives; a few are drawn, not all Q - 1
    (sentence-transformers' CrossEncoder MultipleNegativesRankingLoss draws num_negatives=4 by default)."""

    def __init__(self, tokenizer, data_config, subsets, chunk_size=0, one_row=False, inbatch_negatives=0):
        super().__init__(tokenizer, data_config, subsets, chunk_size)
        self.pack_length = default_pack_length(data_config, data_config.pair_max_length, one_row)
        self.inbatch_negatives = inbatch_negatives

    def pairs(self, query, passages):
        return [self.config.pair_template.format(query=query, passage=passage) for passage in passages]

    def pair_ids(self, examples, passages=None):
        """Token ids of every pair, query by query; `passages`: per example, the passages to pair it
        with (default: its own)."""
        passages = passages or [e.passages for e in examples]
        texts = [text for e, texts in zip(examples, passages) for text in self.pairs(e.query, texts)]
        return self.tokenizer(texts, max_length=self.config.pair_max_length, truncation=True)["input_ids"]

    def example_tokens(self, examples):
        """The tokens of each example's pairs as collated (train.micro_batch_tokens cuts by these).
        Which other positives a query is paired with depends on the cut, so each in-batch pair is
        counted at the length of the query's own positive pair (an estimate: the budget is a bound on
        memory, the pairs of one micro-batch differ in length by their passages only)."""
        lengths = [len(ids) for ids in self.pair_ids(examples)]
        group = len(lengths) // max(1, len(examples))
        own = [lengths[q * group : (q + 1) * group] for q in range(len(examples))]
        return [sum(pairs) + self.inbatch_negatives * pairs[0] for pairs in own]

    def __call__(self, examples, chunks=None):
        known = [known_positive_hashes(e) for e in examples]
        positive_hash_QK = positive_hash_matrix(known)
        donors_QN = inbatch_negative_donors(positive_hash_QK, self.inbatch_negatives, micro_batch_seed(examples))
        passages = [e.passages + [examples[j].passages[0] for j in row] for e, row in zip(examples, donors_QN.tolist())]
        group = len(passages[0])
        ids = self.pair_ids(examples, passages)
        parts = []
        for start, stop in chunk_bounds(len(examples), self.chunk_size, chunks):
            sequences = ids[start * group : stop * group]
            parts.append({**self.encoder_inputs(sequences, 0), "num_pairs": len(sequences)})
        batch = {
            "group_size": group,
            "inbatch_negatives": donors_QN.shape[1],
            "positive_hash": positive_hash_QK,
            "passage_hash": torch.tensor([content_hash(p) for row in passages for p in row], dtype=torch.long),
        }
        return self.with_parts(batch, parts)


def micro_batch_seed(examples):
    """A 63-bit seed that is a function of a micro-batch's examples (subset, question id and query
    text of each, in order): the same micro-batch draws the same in-batch negatives wherever it is
    collated (a resumed run, a DataLoader worker, any GradCache chunking), and no RNG state is read."""
    digest = hashlib.blake2b(digest_size=8)
    for e in examples:
        digest.update(f"{e.subset}\0{e.question_id}\0{e.query}\0".encode("utf-8"))
    return int.from_bytes(digest.digest(), "little") >> 1


def inbatch_negative_donors(positive_hash_QK, count, seed):
    """(Q, n) LongTensor, n = min(count, Q - 1): for each query of a micro-batch, the queries whose
    target (positive_hash_QK[:, 0], the passage its group leads with) it is also scored against.

    positive_hash_QK: (Q, K) content hashes of each query's known positives, target first
    (positive_hash_matrix). A donor's target is never one of the query's known positives (so never
    its own target, a copy of it, or a sibling positive), and a text that leads several groups is
    offered once. The donors are drawn without replacement, uniformly, with a private generator
    seeded by `seed` (micro_batch_seed). A query with fewer than n allowed donors is filled with
    itself: the pair repeats its positive, which the loss masks as a known positive
    (losses.group_positive_mask), so it adds no term."""
    num_queries = positive_hash_QK.shape[0]
    n = max(0, min(count, num_queries - 1))
    if n == 0:
        return torch.zeros(num_queries, 0, dtype=torch.long)
    target_Q = positive_hash_QK[:, 0]
    # [i, j]: query j's target is one of query i's known positives (j == i included)
    known_QQ = (positive_hash_QK[:, :, None] == target_Q[None, None, :]).any(dim=1)
    earlier_QQ = torch.ones(num_queries, num_queries, dtype=torch.bool).tril(-1)  # [j, j']: j' before j
    repeat_Q = ((target_Q[:, None] == target_Q[None, :]) & earlier_QQ).any(dim=1)  # an earlier group leads with it
    allowed_QQ = ~known_QQ & ~repeat_Q[None, :]
    generator = torch.Generator().manual_seed(seed)
    keys_QQ = torch.rand(num_queries, num_queries, generator=generator).masked_fill(~allowed_QQ, 2.0)
    order_QN = keys_QQ.argsort(dim=1)[:, :n]
    own_QN = torch.arange(num_queries)[:, None].expand(-1, n)
    return torch.where(allowed_QQ.gather(1, order_QN), order_QN, own_QN)


class MultiVectorCollator(Collator):
    """Collator's batches for a multi-vector (ColBERT) model (model.kind=multi_vector), plus:

    - skip_ids: the token ids the loss does not score in passages (the document skiplist,
      model/multi_vector.skiplist_ids; empty for none), applied to the passages' token embeddings;
    - with query expansion (`expansion`: {"length", "attend", "token_id"}), every query cut and
      filled to exactly `length` tokens with the expansion token on the tokenizer's padding side
      (model/multi_vector.expanded_query_batch, as the export's sentence-transformers model and
      embedtrain.MultiVectorEncoder encode queries). With attend=True the expanded queries are
      ordinary sequences (packed or padded like the passages); with attend=False (padded batches
      only: config.validate_multi_vector refuses data.packing) each encoder call also carries
      score_mask (S, L): the expansion positions are scored but not attended to.
    """

    def __init__(self, tokenizer, data_config, subsets, chunk_size=0, one_row=False, expansion=None, skip_ids=()):
        super().__init__(tokenizer, data_config, subsets, chunk_size, None, one_row)
        self.expansion = expansion
        self.skip_ids = torch.tensor(list(skip_ids), dtype=torch.long)

    def expanded(self, query_ids):
        """(the queries' token lists expanded to the expansion length, their real token counts)."""
        length = self.expansion["length"]
        ids, _, _ = expanded_query_batch(
            query_ids, length, self.expansion["token_id"], True, self.tokenizer.padding_side
        )
        return ids.tolist(), [min(len(ids_), length) for ids_ in query_ids]

    def example_tokens(self, examples):
        counts = super().example_tokens(examples)
        if self.expansion is None:
            return counts
        query_ids, _ = self.tokenize(examples)
        return [count - len(ids) + self.expansion["length"] for count, ids in zip(counts, query_ids)]

    def __call__(self, examples, chunks=None):
        batch = super().__call__(examples, chunks)
        batch["skip_ids"] = self.skip_ids
        return batch

    def encoder_inputs(self, sequences, num_queries):
        if self.expansion is None:
            return super().encoder_inputs(sequences, num_queries)
        queries, real = self.expanded(sequences[:num_queries])
        part = super().encoder_inputs(queries + list(sequences[num_queries:]), num_queries)
        if self.expansion["attend"]:
            return part
        # padded (the config refuses packing here): every expanded position is scored, and the
        # expansion positions, the first (left padding) or last (right) of a query row's scored
        # positions, are not attended to
        inputs = part["inputs"]
        scored_SL = inputs.attention_mask.bool()
        order_SL = scored_SL.long().cumsum(-1) - 1  # index among the row's scored positions
        expansion_S = torch.tensor([self.expansion["length"] - n for n in real] + [0] * (len(sequences) - num_queries))
        if self.tokenizer.padding_side == "left":
            attended_SL = scored_SL & (order_SL >= expansion_S[:, None])
        else:
            attended_SL = scored_SL & (order_SL < (scored_SL.sum(-1) - expansion_S)[:, None])
        part["inputs"] = padded_inputs(inputs.input_ids, attended_SL.to(inputs.attention_mask.dtype))
        part["score_mask"] = scored_SL
        return part


def encoder_parts(batch):
    """The encoder calls of a micro-batch: its chunks under GradCache, else the batch itself."""
    return batch.get("chunks", [batch])
