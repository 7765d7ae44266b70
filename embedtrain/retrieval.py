"""Retrieval at any corpus size: texts -> on-disk embedding matrices -> exact blocked top-k, and
the retrieval metrics (nDCG@10, Recall@10, Recall@100, MRR@10).

The shared lower layer of `embedtrain eval`, `embedtrain mine` and in-training evaluation
(embedtrain.train.evaluation). Host memory does not grow with the corpus:

- texts are streamed from their file in blocks (`ParquetTexts`, `JsonlTexts`; `ListTexts` for
  what is small enough to hold, such as queries) and each block's embeddings go straight into a
  `MatrixFile` (a raw np.memmap plus a JSON sidecar for shape and dtype) of the caller's storage
  dtype: float32 keeps the vectors as computed (the search is then exactly a float32 brute-force
  search), float16 rounds them to half the disk; only the rows being written or read are mapped
  at any time;
- `search` scores query chunk x corpus chunk on the model's device and keeps a running top-k per
  query, with optional per-query exclusions (positives) and score ceilings (TopK-PercPos);
- only document ids (one Arrow string column) and the per-query results are held whole.

Launched on several processes (torchrun/deepspeed: RANK, WORLD_SIZE, LOCAL_RANK; see
distributed.init_inference), every rank encodes a contiguous run of row blocks into the same files
and scores a contiguous run of query chunks; rank 0 assembles the results. The work folder must be
shared by the ranks (one node, or a shared file system). Blocks and chunks are laid on a grid that
depends on the sizes only, never on the number of ranks, so every text is batched with the same
neighbours and every query chunk has the same shape: N ranks give exactly the result of one.
"""

import json
import math
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from tqdm import tqdm

from embedtrain import distributed
from embedtrain.data import parquet
from embedtrain.data.nemotron import read_metadata
from embedtrain.errors import DataError
from embedtrain.inference.batching import BLOCK, encode_texts, output_dim

MIN_BLOCKS = 16  # a small corpus is still cut into this many blocks, so that every rank gets some
STORAGE_DTYPES = ("float16", "float32")  # dtypes of the on-disk embedding matrices (eval/mine --storage)


# ---------------------------------------------------------------- grids and rank shares


def block_rows(n, batch_size):
    """Rows per encoding block for n texts: at most inference.BLOCK (bounds token lists), at least one
    batch, else n / MIN_BLOCKS. A function of n and batch_size only (never of the rank count)."""
    return max(1, batch_size, min(BLOCK, math.ceil(n / MIN_BLOCKS)))


def rank_range(n, unit, rank=None, world=None):
    """[start, stop) rows of this rank: a contiguous run of whole `unit`-row blocks, the blocks
    split as evenly as possible over the ranks."""
    rank = distributed.rank() if rank is None else rank
    world = distributed.world_size() if world is None else world
    blocks = math.ceil(n / unit)
    first, last = rank * blocks // world, (rank + 1) * blocks // world
    return min(n, first * unit), min(n, last * unit)


# ---------------------------------------------------------------- held-out sets in the dataset's layout


def read_columns(path, columns, required=None):
    """Those columns of a parquet file (None: all); a missing file or `required` column (default:
    `columns`) is an error naming it."""
    if not Path(path).is_file():
        raise DataError(f"missing {path}")
    names = parquet.read_schema(path).names
    absent = [c for c in (columns if required is None else required) if c not in names]
    if absent:
        raise DataError(f"{path}: no column(s) {', '.join(absent)}")
    return parquet.read_table(path, columns)


def read_subset(folder):
    """(queries {id: text}, corpus {id: text}, qrels {query: {doc: 1}}, dataset metadata) of one
    subset in the dataset's layout, in memory (in-training evaluation of small held-out sets)."""
    meta = read_metadata(folder)
    corpus_rows = read_columns(folder / "corpus.parquet", ["id", "text"]).to_pylist()
    query_rows = read_columns(folder / "queries.parquet", ["question_id", "question", "pos_doc"]).to_pylist()
    corpus = {r["id"]: r["text"] for r in corpus_rows}
    queries = {q["question_id"]: q["question"] for q in query_rows}
    qrels = {q["question_id"]: {d["id"]: 1 for d in q["pos_doc"] or []} for q in query_rows}
    return queries, corpus, qrels, meta


# ---------------------------------------------------------------- text sources


class ListTexts:
    """Texts held in memory (queries, BEIR queries), each behind `prompt`."""

    def __init__(self, texts, prompt=""):
        self.texts, self.prompt = texts, prompt

    def __len__(self):
        return len(self.texts)

    def blocks(self, start, stop, size):
        for b0 in range(start, stop, size):
            yield [self.prompt + text for text in self.texts[b0 : min(stop, b0 + size)]]


class ParquetTexts:
    """One string column of a parquet file (corpus.parquet's "text"), read in record batches from a
    row offset on: never the whole column at once."""

    READ_BATCH = 4096

    def __init__(self, path, column, prompt=""):
        self.path, self.column, self.prompt = Path(path), column, prompt
        file = parquet.open_file(self.path)
        self.rows = file.metadata.num_rows
        if column not in file.schema_arrow.names:
            raise DataError(f"{self.path}: no column {column!r}")

    def __len__(self):
        return self.rows

    def values(self, start):
        """The column's values from row `start` to the end, lazily; nulls are an error naming the row."""
        file = parquet.open_file(self.path)
        group, skip = 0, start
        while group < file.num_row_groups and skip >= file.metadata.row_group(group).num_rows:
            skip -= file.metadata.row_group(group).num_rows
            group += 1
        if group == file.num_row_groups:
            return
        row = start
        for batch in parquet.iter_batches(
            file,
            self.path,
            batch_size=self.READ_BATCH,
            row_groups=range(group, file.num_row_groups),
            columns=[self.column],
            use_threads=False,
        ):
            values = batch.column(0).to_pylist()
            if skip:
                values, skip = values[skip:], max(0, skip - len(values))
            for value in values:
                if value is None:
                    raise DataError(f"{self.path} row {row}: {self.column} is null")
                yield value
                row += 1

    def blocks(self, start, stop, size):
        values = self.values(start)
        for b0 in range(start, stop, size):
            yield [self.prompt + text for text in islice(values, min(size, stop - b0))]


class JsonlTexts:
    """The documents of a BEIR corpus.jsonl ("title" + " " + "text", stripped), one per non-blank
    line, read line by line; `ids()` collects the "_id" column as Arrow strings in one pass."""

    def __init__(self, path, prompt=""):
        self.path, self.prompt = Path(path), prompt
        if not self.path.is_file():
            raise DataError(f"BEIR layout: missing {self.path}")
        self._ids = None

    def records(self, start=0):
        with self.path.open(encoding="utf-8") as lines:
            index = 0
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                if index >= start:
                    try:
                        record = json.loads(line)
                        yield record["_id"], (record.get("title", "") + " " + record["text"]).strip()
                    except (json.JSONDecodeError, KeyError, TypeError) as err:
                        raise DataError(
                            f'{self.path} line {number}: expected a JSON object with "_id" and "text" ({err})'
                        ) from err
                index += 1

    def ids(self):
        if self._ids is None:
            chunks, current = [], []
            for doc_id, _ in self.records():
                current.append(doc_id)
                if len(current) == BLOCK:
                    chunks.append(pa.array(current, pa.string()))
                    current = []
            chunks.append(pa.array(current, pa.string()))
            self._ids = pa.chunked_array(chunks).combine_chunks()
        return self._ids

    def __len__(self):
        return len(self.ids())

    def blocks(self, start, stop, size):
        records = self.records(start)
        for b0 in range(start, stop, size):
            yield [self.prompt + text for _, text in islice(records, min(size, stop - b0))]


# ---------------------------------------------------------------- on-disk matrices


class MatrixFile:
    """An (N, D) matrix in a raw file (`path`), its shape and dtype in `path`.json. Reads and writes
    map only the rows they touch (np.memmap at an offset), so resident memory stays at one block."""

    def __init__(self, path, shape, dtype):
        self.path, self.shape, self.dtype = Path(path), tuple(shape), np.dtype(dtype)

    @classmethod
    def create(cls, path, shape, dtype="float16"):
        """A zero-filled (sparse) file of the given shape; the sidecar is written last."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        matrix = cls(path, shape, dtype)
        with path.open("wb") as f:
            f.truncate(matrix.shape[0] * matrix.row_bytes)
        sidecar = {"shape": list(matrix.shape), "dtype": matrix.dtype.name}
        Path(f"{path}.json").write_text(json.dumps(sidecar) + "\n")
        return matrix

    @classmethod
    def open(cls, path):
        sidecar = Path(f"{path}.json")
        if not sidecar.is_file():
            raise FileNotFoundError(f"{sidecar}: no such matrix sidecar (was {path} written by embedtrain?)")
        meta = json.loads(sidecar.read_text())
        return cls(path, meta["shape"], meta["dtype"])

    @property
    def row_bytes(self):
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def __len__(self):
        return self.shape[0]

    def _map(self, start, stop, mode):
        shape = (stop - start, *self.shape[1:])
        return np.memmap(self.path, self.dtype, mode, offset=start * self.row_bytes, shape=shape)

    def write(self, start, array):
        if len(array):
            rows = self._map(start, start + len(array), "r+")
            rows[:] = array
            rows.flush()
            del rows

    def read(self, start, stop, dtype=np.float32):
        """Rows [start, stop) as an in-memory array of `dtype`."""
        stop = min(stop, self.shape[0])
        if stop <= start:
            return np.zeros((0, *self.shape[1:]), dtype)
        rows = self._map(start, stop, "r")
        out = np.array(rows, dtype=dtype)
        del rows
        return out

    def take(self, indices, dtype=np.float32):
        """Rows at `indices` (any order, repeats allowed), mapping only the span they cover."""
        indices = np.asarray(indices, dtype=np.int64)
        if not len(indices):
            return np.zeros((0, *self.shape[1:]), dtype)
        low, high = int(indices.min()), int(indices.max()) + 1
        rows = self._map(low, high, "r")
        out = np.array(rows[indices - low], dtype=dtype)
        del rows
        return out

    def remove(self):
        self.path.unlink(missing_ok=True)
        Path(f"{self.path}.json").unlink(missing_ok=True)


class ArrayMatrix:
    """An in-memory array behind MatrixFile's read interface (tests, small inputs)."""

    def __init__(self, array):
        self.array = np.asarray(array)
        self.shape = self.array.shape

    def __len__(self):
        return self.shape[0]

    def read(self, start, stop, dtype=np.float32):
        return np.asarray(self.array[start:stop], dtype=dtype)

    def take(self, indices, dtype=np.float32):
        return np.asarray(self.array[np.asarray(indices, dtype=np.int64)], dtype=dtype)


def as_matrix(matrix):
    return matrix if isinstance(matrix, (MatrixFile, ArrayMatrix)) else ArrayMatrix(matrix)


# ---------------------------------------------------------------- encoding


def encode_to_file(
    encoder,
    tokenizer,
    source,
    path,
    batch_size=64,
    max_length=512,
    dim=None,
    progress=False,
    desc="encode",
    storage="float16",
    **options,
):
    """Embed every text of `source` into the MatrixFile `path` (N x D, `storage`: "float16" or
    "float32"; the vectors are rounded to it, the search reads them back as float32), rank-sharded:
    each rank encodes its contiguous run of blocks (`block_rows`) with inference.encode_texts (options:
    max_tokens, long_documents, chunk_overlap) and writes it in place. Every rank must call it; all
    return the file once every rank has written."""
    if storage not in STORAGE_DTYPES:
        raise ValueError(f"storage {storage!r}: expected one of {', '.join(STORAGE_DTYPES)}")
    n, d = len(source), output_dim(encoder, dim)
    if distributed.rank() == 0:
        MatrixFile.create(path, (n, d), storage)
    distributed.barrier()
    matrix = MatrixFile.open(path)
    size = block_rows(n, batch_size)
    start, stop = rank_range(n, size)
    bar = tqdm(total=stop - start, desc=desc, unit="text", disable=not progress or distributed.rank() != 0)
    for offset, texts in zip(range(start, stop, size), source.blocks(start, stop, size)):
        vectors = encode_texts(encoder, tokenizer, texts, batch_size, max_length, dim, **options)
        matrix.write(offset, vectors.astype(matrix.dtype))
        bar.update(len(texts))
    bar.close()
    distributed.barrier()
    return matrix


# ---------------------------------------------------------------- exclusions and ceilings


def rows_of_ids(ids, doc_ids, where):
    """Corpus rows (int64 numpy) of the string array `ids` in `doc_ids` (pyarrow hash lookup, no
    Python dict of the corpus). An id not in the corpus is an error naming `where(position)`."""
    if isinstance(doc_ids, pa.ChunkedArray):
        doc_ids = doc_ids.combine_chunks()
    rows = pc.index_in(ids, value_set=doc_ids)
    if rows.null_count:
        missing = int(np.flatnonzero(rows.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{where(missing)}: id {ids[missing].as_py()!r} is not in the corpus")
    return rows.to_numpy(zero_copy_only=False).astype(np.int64)


def doc_lists(list_array, doc_ids, where):
    """CSR (offsets, rows) of a list<struct<id>> column (pos_doc): query q's corpus rows are
    rows[offsets[q]:offsets[q+1]]. `where(q)` names query q in errors."""
    if isinstance(list_array, pa.ChunkedArray):
        list_array = list_array.combine_chunks() if list_array.num_chunks else pa.array([], list_array.type)
    counts = pc.fill_null(pc.list_value_length(list_array), 0).to_numpy(zero_copy_only=False)
    offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    flat = list_array.flatten()  # the values of the non-null lists, in order (slicing handled)
    ids = flat.field("id") if pa.types.is_struct(flat.type) else flat
    query_of = np.repeat(np.arange(len(list_array)), np.diff(offsets))
    rows = rows_of_ids(ids, doc_ids, lambda i: where(int(query_of[i])))
    return offsets, rows


@torch.no_grad()
def positive_ceilings(queries, docs, positives, margin, device="cpu", chunk=4096):
    """margin x each query's lowest positive score (float32); +inf for a query without positives
    (nothing is dropped for it). positives: CSR (offsets, rows)."""
    queries, docs = as_matrix(queries), as_matrix(docs)
    offsets, rows = positives
    ceilings = np.full(len(queries), np.inf, np.float32)
    for q0 in range(0, len(queries), chunk):
        q1 = min(len(queries), q0 + chunk)
        lo, hi = offsets[q0], offsets[q1]
        if hi == lo:
            continue
        owner = torch.from_numpy(np.repeat(np.arange(q1 - q0), np.diff(offsets[q0 : q1 + 1]))).to(device)
        q = torch.from_numpy(queries.read(q0, q1)).to(device)
        d = torch.from_numpy(docs.take(rows[lo:hi])).to(device)
        scores = (q[owner] * d).sum(-1)
        lowest = torch.full((q1 - q0,), float("inf"), device=device).scatter_reduce(0, owner, scores, "amin")
        ceilings[q0:q1] = (margin * lowest).cpu().numpy()
    return ceilings


# ---------------------------------------------------------------- search


class RunningTopK:
    """The k best (score, corpus row) of each of n queries, over corpus blocks scored one after
    another (`add`): the block's scores above a query's ceiling or at its excluded rows become -inf,
    then merge with the best so far (torch.topk). Shared by the dense search here and the MaxSim
    search (embedtrain.token_retrieval), so both exclude and cut the same way."""

    def __init__(self, n, k, device="cpu", ceilings=None, excluded=None):
        self.k, self.device = k, torch.device(device)
        self.ceilings = None if ceilings is None else torch.as_tensor(np.asarray(ceilings, np.float32)).to(device)
        self.excluded = excluded  # (query index, corpus row) int64 tensors on `device`, or None
        self.scores = torch.full((n, 0), float("-inf"), device=device)
        self.rows = torch.zeros((n, 0), dtype=torch.long, device=device)

    def add(self, scores, d0):
        """Merge the (n, B) float32 scores of corpus rows d0..d0+B (changed in place by the masks)."""
        if self.ceilings is not None:
            scores.masked_fill_(scores > self.ceilings[:, None], float("-inf"))
        if self.excluded is not None:
            excluded_q, excluded_d = self.excluded
            inside = (excluded_d >= d0) & (excluded_d < d0 + scores.shape[1])
            scores[excluded_q[inside], excluded_d[inside] - d0] = float("-inf")
        merged_scores = torch.cat([self.scores, scores], dim=1)
        merged_rows = torch.cat(
            [self.rows, torch.arange(d0, d0 + scores.shape[1], device=self.device).expand(len(scores), -1)], dim=1
        )
        top = merged_scores.topk(min(self.k, merged_scores.shape[1]), dim=1)
        self.scores, self.rows = top.values, merged_rows.gather(1, top.indices)

    def result(self):
        """(scores (n, k) float32, rows (n, k) int64) numpy, best first; rows -1 where nothing scored."""
        rows = self.rows.masked_fill(self.scores == float("-inf"), -1)
        return self.scores.cpu().numpy(), rows.cpu().numpy()


def chunk_exclusions(exclude, q0, q1, device="cpu"):
    """(query index within the chunk, corpus row) tensors of queries q0..q1 of a CSR (offsets, rows)
    exclusion list, or None without one."""
    if exclude is None:
        return None
    offsets, rows = exclude
    excluded_q = torch.from_numpy(np.repeat(np.arange(q1 - q0), np.diff(offsets[q0 : q1 + 1]))).to(device)
    return excluded_q, torch.from_numpy(rows[offsets[q0] : offsets[q1]]).to(device)


@torch.no_grad()
def search(
    queries,
    docs,
    k,
    exclude=None,
    ceilings=None,
    query_range=None,
    query_chunk=256,
    corpus_chunk=4096,
    device="cpu",
    progress=False,
):
    """Exact top-k inner-product search in blocks.

    queries, docs: MatrixFile or (N, D) arrays. For each query of `query_range` (default all), the k
    best corpus rows, best first, among those not in its `exclude` list (CSR (offsets, rows) over
    all queries) and scoring at most its `ceilings` value. Scores are float32 on `device`; the
    largest score block held is query_chunk x corpus_chunk, with a running top-k merged per chunk.
    Returns (scores (q, k) float32, rows (q, k) int64, largest block in elements); a query with
    fewer than k candidates has rows -1 (score -inf) at the end.
    """
    queries, docs = as_matrix(queries), as_matrix(docs)
    q_start, q_stop = query_range or (0, len(queries))
    k = min(k, len(docs))
    device = torch.device(device)
    all_scores = np.full((q_stop - q_start, k), -np.inf, np.float32)
    all_rows = np.full((q_stop - q_start, k), -1, np.int64)
    largest = 0
    chunks = range(q_start, q_stop, query_chunk)
    for q0 in tqdm(chunks, desc="search", unit="chunk", disable=not progress):
        q1 = min(q_stop, q0 + query_chunk)
        block_q = torch.from_numpy(queries.read(q0, q1)).to(device)
        top = RunningTopK(
            q1 - q0,
            k,
            device,
            None if ceilings is None else ceilings[q0:q1],
            chunk_exclusions(exclude, q0, q1, device),
        )
        for d0 in range(0, len(docs), corpus_chunk):
            scores = block_q @ torch.from_numpy(docs.read(d0, d0 + corpus_chunk)).to(device).T
            largest = max(largest, scores.numel())
            top.add(scores, d0)
        all_scores[q0 - q_start : q1 - q_start], all_rows[q0 - q_start : q1 - q_start] = top.result()
    return all_scores, all_rows, largest


def sharded_results(search_range, n, k, work_dir, query_chunk=256):
    """Run `search_range((start, stop))` -> (scores (q, k) float32, rows (q, k) int64) on each rank's
    contiguous run of `query_chunk`-query chunks of n queries; the results go through two
    MatrixFiles in `work_dir` (shared by the ranks). Returns (scores, rows) for every query on rank
    0, (None, None) elsewhere. Every rank must call it; `k` is the width the search returns."""
    if distributed.world_size() == 1:
        return search_range((0, n))
    work_dir = Path(work_dir)
    if distributed.rank() == 0:
        MatrixFile.create(work_dir / "topk-scores", (n, k), "float32")
        MatrixFile.create(work_dir / "topk-rows", (n, k), "int64")
    distributed.barrier()
    start, stop = rank_range(n, query_chunk)
    scores, rows = search_range((start, stop))
    score_file, row_file = MatrixFile.open(work_dir / "topk-scores"), MatrixFile.open(work_dir / "topk-rows")
    score_file.write(start, scores)
    row_file.write(start, rows)
    distributed.barrier()
    if distributed.rank() != 0:
        return None, None
    result = score_file.read(0, n), row_file.read(0, n, dtype=np.int64)
    score_file.remove()
    row_file.remove()
    return result


def search_sharded(queries, docs, k, work_dir, query_chunk=256, progress=False, **options):
    """`search` over all queries, each rank taking a contiguous run of query chunks (sharded_results).
    Returns (scores, rows) for every query on rank 0, (None, None) elsewhere. Every rank must call it."""

    def search_range(query_range):
        scores, rows, _ = search(
            queries,
            docs,
            k,
            query_range=query_range,
            query_chunk=query_chunk,
            progress=progress and distributed.rank() == 0,
            **options,
        )
        return scores, rows

    return sharded_results(search_range, len(queries), min(k, len(docs)), work_dir, query_chunk)


# ---------------------------------------------------------------- metrics
# Pure functions of a ranking and the relevance judgements, as trec_eval computes them:
#   nDCG@k   sum_{i<=k} rel_i / log2(i + 1), divided by the same sum for the ideal ranking
#   Recall@k |relevant in the top k| / |relevant|
#   MRR@k    1 / rank of the first relevant document in the top k (0 if none)

METRIC_KEYS = ("ndcg@10", "recall@10", "recall@100", "mrr@10")


def ndcg_at_k(ranking, relevance, k):
    dcg = sum(relevance.get(doc, 0) / math.log2(i + 2) for i, doc in enumerate(ranking[:k]))
    ideal = sorted((r for r in relevance.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranking, relevance, k):
    relevant = {d for d, r in relevance.items() if r > 0}
    return len(relevant & set(ranking[:k])) / len(relevant) if relevant else 0.0


def mrr_at_k(ranking, relevance, k):
    for i, doc in enumerate(ranking[:k]):
        if relevance.get(doc, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def metrics(rankings, qrels):
    """Mean nDCG@10, Recall@10, Recall@100, MRR@10 over the queries that have judgements."""
    queries = [q for q in qrels if any(r > 0 for r in qrels[q].values())]
    if not queries:
        return {"ndcg@10": 0.0, "recall@10": 0.0, "recall@100": 0.0, "mrr@10": 0.0, "queries": 0}
    mean = lambda f, k: sum(f(rankings.get(q, []), qrels[q], k) for q in queries) / len(queries)  # noqa: E731
    return {
        "ndcg@10": mean(ndcg_at_k, 10),
        "recall@10": mean(recall_at_k, 10),
        "recall@100": mean(recall_at_k, 100),
        "mrr@10": mean(mrr_at_k, 10),
        "queries": len(queries),
    }


def with_mean(results):
    """{"subsets": results, "mean": the mean of each metric over the subsets}."""
    return {"subsets": results, "mean": {k: float(np.mean([r[k] for r in results.values()])) for k in METRIC_KEYS}}


def top_k(query_vectors, doc_vectors, doc_ids, k=100, chunk=1024):
    """Exact inner-product search over in-memory vectors; ranked doc ids per query (in-training
    evaluation's path; `embedtrain eval` searches on-disk matrices with search_sharded)."""
    _, rows, _ = search(query_vectors, doc_vectors, k, query_chunk=chunk, corpus_chunk=max(1, len(doc_ids)))
    return [[doc_ids[i] for i in row if i >= 0] for row in rows.tolist()]
