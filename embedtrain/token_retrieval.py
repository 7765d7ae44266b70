"""Multi-vector (ColBERT) retrieval at any corpus size: texts -> on-disk token embeddings in blocks ->
exact MaxSim top-k, rank-sharded as embedtrain.retrieval's dense search is.

The multi-vector counterpart of embedtrain.retrieval, shared by `embedtrain eval` and `embedtrain
mine` of a multi-vector model. Host memory does not grow with the corpus:

- texts are streamed from their source in blocks (the grid of retrieval.block_rows) and each block's
  token embeddings go to two .npy files in a folder (`TokenBlocks`: the embeddings, tokens x D in
  the storage dtype, and the block's offsets; the format of inference/token_index.py, one pair of
  files per block), written by the rank that encodes the block;
- `maxsim_search` scores a chunk of queries against one corpus block at a time, each block cut
  further so that at most `max_elements` token similarities exist at once (token_index.corpus_blocks),
  and keeps a running top-k per query (retrieval.RunningTopK: the same exclusions and ceilings as
  the dense search, for mining);
- the block files are memory-mapped: only the documents being scored are read.

Under several processes every rank encodes a contiguous run of blocks and searches a contiguous run
of query chunks, on grids that depend on the sizes only (retrieval.rank_range), so N ranks give the
result of one.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from embedtrain import distributed
from embedtrain.inference.multi_vector import encode_tokens, maxsim_matrix
from embedtrain.inference.token_index import corpus_blocks, flatten, padded_block
from embedtrain.losses import MAXSIM_BLOCK_ELEMENTS, maxsim_scores
from embedtrain.retrieval import STORAGE_DTYPES, RunningTopK, block_rows, chunk_exclusions, rank_range, sharded_results

INDEX = "index.json"  # a TokenBlocks folder's sidecar: n, dim, block rows, dtype


class TokenBlocks:
    """The token embeddings of n texts in `path`: per block of `block` texts starting at row s,
    `s.embeddings.npy` (tokens x dim, `dtype`) and `s.offsets.npy` (texts + 1, int64, from 0). Read
    memory-mapped: `read_block(s)`, `texts(start, stop)` and `take(rows)` copy only what they return."""

    def __init__(self, path, n, dim, block, dtype):
        self.path, self.n, self.dim, self.block, self.dtype = Path(path), n, dim, block, np.dtype(dtype)

    @classmethod
    def create(cls, path, n, dim, block, dtype="float32"):
        path = Path(path)
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        index = {"n": n, "dim": dim, "block": block, "dtype": np.dtype(dtype).name}
        (path / INDEX).write_text(json.dumps(index) + "\n")
        return cls(path, n, dim, block, dtype)

    @classmethod
    def open(cls, path):
        index = json.loads((Path(path) / INDEX).read_text())
        return cls(path, index["n"], index["dim"], index["block"], index["dtype"])

    def __len__(self):
        return self.n

    def starts(self):
        return range(0, self.n, self.block)

    def write(self, start, arrays):
        """Block `start`'s per-text (n_i, dim) arrays."""
        embeddings, offsets = flatten(arrays, self.dim)
        np.save(self.path / f"{start}.embeddings.npy", embeddings.astype(self.dtype))
        np.save(self.path / f"{start}.offsets.npy", offsets)

    def read_block(self, start):
        """(embeddings (memory-mapped), offsets) of the block starting at row `start`."""
        embeddings = np.load(self.path / f"{start}.embeddings.npy", mmap_mode="r")
        return embeddings, np.load(self.path / f"{start}.offsets.npy")

    def texts(self, start, stop):
        """The float32 (n_i, dim) arrays of texts start..stop, in order."""
        out = []
        for b0 in range(start - start % self.block, stop, self.block):
            embeddings, offsets = self.read_block(b0)
            for row in range(max(start, b0), min(stop, b0 + self.block)):
                out.append(np.array(embeddings[offsets[row - b0] : offsets[row - b0 + 1]], np.float32))
        return out

    def take(self, rows):
        """The float32 arrays of the texts at `rows` (any order, repeats allowed)."""
        rows = np.asarray(rows, np.int64)
        out = [None] * len(rows)
        for b0 in np.unique(rows - rows % self.block).tolist():
            embeddings, offsets = self.read_block(b0)
            for i in np.flatnonzero((rows >= b0) & (rows < b0 + self.block)).tolist():
                local = int(rows[i]) - b0
                out[i] = np.array(embeddings[offsets[local] : offsets[local + 1]], np.float32)
        return out

    def remove(self):
        shutil.rmtree(self.path, ignore_errors=True)


def encode_to_blocks(
    encoder, source, path, batch_size=64, is_query=False, storage="float32", progress=False, desc="encode"
):
    """Every text of `source` (a retrieval text source, prompts included) encoded by `encoder` (an
    embedtrain.MultiVectorEncoder, as queries or documents) into TokenBlocks at `path`, rank-sharded
    on retrieval.block_rows' grid. Every rank must call it; all return the blocks once written."""
    if storage not in STORAGE_DTYPES:
        raise ValueError(f"storage {storage!r}: expected one of {', '.join(STORAGE_DTYPES)}")
    n, size = len(source), block_rows(len(source), batch_size)
    if distributed.rank() == 0:
        TokenBlocks.create(path, n, encoder.width, size, storage)
    distributed.barrier()
    blocks = TokenBlocks.open(path)
    start, stop = rank_range(n, size)
    bar = tqdm(total=stop - start, desc=desc, unit="text", disable=not progress or distributed.rank() != 0)
    for offset, texts in zip(range(start, stop, size), source.blocks(start, stop, size)):
        blocks.write(offset, encode_tokens(encoder, texts, "", is_query, batch_size))
        bar.update(len(texts))
    bar.close()
    distributed.barrier()
    return blocks


class ListBlocks:
    """Per-text (n_i, dim) arrays held in memory behind TokenBlocks' reading interface (tests, small
    inputs), cut into blocks of `block` texts."""

    def __init__(self, arrays, block=1024):
        self.arrays, self.block, self.n = list(arrays), block, len(arrays)
        self.dim = arrays[0].shape[1] if arrays else 0

    def __len__(self):
        return self.n

    def starts(self):
        return range(0, self.n, self.block)

    def read_block(self, start):
        return flatten(self.arrays[start : start + self.block], self.dim)

    def texts(self, start, stop):
        return [np.asarray(a, np.float32) for a in self.arrays[start:stop]]

    def take(self, rows):
        return [np.asarray(self.arrays[int(r)], np.float32) for r in rows]


@torch.no_grad()
def maxsim_search(
    queries,
    docs,
    k,
    exclude=None,
    ceilings=None,
    query_range=None,
    query_chunk=64,
    device="cpu",
    max_elements=MAXSIM_BLOCK_ELEMENTS,
    progress=False,
):
    """Exact MaxSim top-k: for each query of `query_range` (default all) of `queries` (TokenBlocks or
    ListBlocks), the k best texts of `docs`, best first, among those not in its `exclude` list (CSR
    (offsets, rows) over all queries) and scoring at most its `ceilings` value. Scores are float32
    on `device` (embedtrain.losses.maxsim_scores); at most `max_elements` token similarities are held.
    Returns (scores (q, k) float32, rows (q, k) int64), rows -1 (score -inf) where nothing is left."""
    q_start, q_stop = query_range or (0, len(queries))
    k = min(k, len(docs))
    all_scores = np.full((q_stop - q_start, k), -np.inf, np.float32)
    all_rows = np.full((q_stop - q_start, k), -1, np.int64)
    for q0 in tqdm(range(q_start, q_stop, query_chunk), desc="search", unit="chunk", disable=not progress):
        q1 = min(q_stop, q0 + query_chunk)
        q_flat, q_offsets = flatten(queries.texts(q0, q1), docs.dim)
        q, q_mask = padded_block(q_flat, q_offsets, 0, q1 - q0, device)
        top = RunningTopK(
            q1 - q0,
            k,
            device,
            None if ceilings is None else ceilings[q0:q1],
            chunk_exclusions(exclude, q0, q1, device),
        )
        for b0 in docs.starts():
            embeddings, offsets = docs.read_block(b0)
            for start, stop in corpus_blocks(offsets, q.shape[0] * q.shape[1], max_elements):
                d, d_mask = padded_block(embeddings, offsets, start, stop, device)
                top.add(maxsim_scores(q, q_mask, d, d_mask, max_elements), b0 + start)
        all_scores[q0 - q_start : q1 - q_start], all_rows[q0 - q_start : q1 - q_start] = top.result()
    return all_scores, all_rows


def maxsim_search_sharded(queries, docs, k, work_dir, query_chunk=64, progress=False, **options):
    """`maxsim_search` over all queries, each rank a contiguous run of query chunks
    (retrieval.sharded_results). (scores, rows) on rank 0, (None, None) elsewhere; every rank calls it."""

    def search_range(query_range):
        return maxsim_search(
            queries,
            docs,
            k,
            query_range=query_range,
            query_chunk=query_chunk,
            progress=progress and distributed.rank() == 0,
            **options,
        )

    return sharded_results(search_range, len(queries), min(k, len(docs)), work_dir, query_chunk)


@torch.no_grad()
def maxsim_ceilings(queries, docs, positives, margin, device="cpu", chunk=64):
    """margin x each query's lowest MaxSim score over its positives (CSR (offsets, rows)), float32;
    +inf for a query without positives. The MaxSim form of retrieval.positive_ceilings (mining)."""
    offsets, rows = positives
    ceilings = np.full(len(queries), np.inf, np.float32)
    for q0 in range(0, len(queries), chunk):
        q1 = min(len(queries), q0 + chunk)
        for q, array in zip(range(q0, q1), queries.texts(q0, q1)):
            own = rows[offsets[q] : offsets[q + 1]]
            if not len(own):
                continue
            q_block, q_mask = padded_block(*flatten([array]), 0, 1, device)
            d_block, d_mask = padded_block(*flatten(docs.take(own), docs.dim), 0, len(own), device)
            ceilings[q] = margin * float(maxsim_scores(q_block, q_mask, d_block, d_mask).min())
    return ceilings


def maxsim_pair_scores(encoder, batch_size=32):
    """eval.candidate_scorer's pair_scores of a multi-vector model: (q, K) MaxSim of each query text
    (encoded as a query) against its candidates index[i] among the passage texts (-1: none, NaN);
    only the candidate pairs are scored. Texts come prompted."""

    def pair_scores(queries, passages, index):
        query_arrays = encode_tokens(encoder, queries, "", True, batch_size)
        doc_arrays = encode_tokens(encoder, passages, "", False, batch_size)
        out = np.full(index.shape, np.nan, np.float32)
        for i, (array, row) in enumerate(zip(query_arrays, index)):
            valid = row >= 0
            if valid.any():
                out[i, valid] = maxsim_matrix([array], [doc_arrays[j] for j in row[valid].tolist()])[0]
        return out

    return pair_scores
