"""Retrieval evaluation: `embedtrain eval MODEL DATA`.

DATA is a folder in the embed-nemotron-dataset-v1 layout (one subset, or a folder of subsets: the
relevant documents of a query are its pos_doc) or in BEIR layout (corpus.jsonl, queries.jsonl,
qrels/test.tsv). Exact search over the whole corpus through embedtrain.retrieval (corpus streamed
into an on-disk float32 matrix, or float16 with storage="float16", blocked top-100 on the model's
device, rank-sharded when launched on several processes); metrics per subset and their mean. A
multi-vector (ColBERT) MODEL is searched by exact MaxSim (embedtrain.token_retrieval), a sparse
(SPLADE) one by exact dot product through an inverted index (inference.sparse_index; the mean
non-zero terms per query and document are reported too).

With --first-stage DENSE_MODEL|bm25, MODEL searches nothing itself: it rescores each query's top
--first-stage-k candidates from the first stage (an exported dense model, or embedtrain.bm25) and
the metrics are those of the reordered lists; the first stage's own are reported beside them.

With --rerank, a second stage: each query's first `rerank_top_k` candidates from that search are
rescored by a reranker (cross-encoder, embedtrain.inference) and reordered by its scores (ties keep
their first-stage order); candidates beyond the top k keep their first-stage order below the
reranked ones. Both stages are reported side by side. The reranking is rank-sharded too, on the
same query-chunk grid, so N ranks give the result of one.

Metrics (pure functions of a ranking and the relevance judgements, as trec_eval computes them):
  nDCG@k   sum_{i<=k} rel_i / log2(i + 1), divided by the same sum for the ideal ranking
  Recall@k |relevant in the top k| / |relevant|
  MRR@k    1 / rank of the first relevant document in the top k (0 if none)
"""

import copy
import gc
import json
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from embedtrain import distributed
from embedtrain.bm25 import bm25_search
from embedtrain.data.nemotron import read_metadata, subset_folders
from embedtrain.errors import DataError, EncodeError
from embedtrain.inference import BiEncoder, MultiVectorEncoder, Reranker
from embedtrain.inference.batching import BLOCK, score_pairs
from embedtrain.inference.loading import model_kind, require_kind
from embedtrain.inference.sparse import SparseEncoder
from embedtrain.inference.sparse_index import (
    build_index,
    concatenate,
    dot_scores,
    mean_nonzeros,
    read_sparse_vectors,
    write_sparse_vectors,
)
from embedtrain.inference.sparse_index import search as sparse_search
from embedtrain.prompts import model_policy
from embedtrain.retrieval import (
    JsonlTexts,
    ListTexts,
    MatrixFile,
    ParquetTexts,
    block_rows,
    encode_to_file,
    metrics,
    rank_range,
    read_columns,
    search_sharded,
    with_mean,
)
from embedtrain.token_retrieval import encode_to_blocks, maxsim_pair_scores, maxsim_search_sharded

SEARCH_DEPTH = 100  # first-stage candidates per query (Recall@100); more when --rerank-top-k asks for more
RERANK_PASS_PAIRS = 1 << 18  # candidate texts a rank holds at a time while reranking (one corpus pass each)


def read_beir(folder):
    """(query ids, query texts, corpus JsonlTexts, qrels {query: {doc: rel}}) of a BEIR folder; the
    corpus is streamed, queries and qrels (small) are held."""
    queries_file, qrels_file = folder / "queries.jsonl", folder / "qrels" / "test.tsv"
    for path in (queries_file, qrels_file):
        if not path.is_file():
            raise DataError(f"BEIR layout: missing {path}")
    queries = {}
    for number, line in enumerate(queries_file.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
                queries[record["_id"]] = record["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DataError(
                    f'{queries_file} line {number}: expected a JSON object with "_id" and "text" ({err})'
                ) from err
    qrels = {}
    for number, line in enumerate(qrels_file.read_text().splitlines()[1:], 2):
        parts = line.split("\t")
        if len(parts) != 3:
            raise DataError(f"{qrels_file} line {number}: expected query-id, corpus-id, score")
        qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    query_ids = [q for q in qrels if q in queries]
    return query_ids, [queries[q] for q in query_ids], JsonlTexts(folder / "corpus.jsonl"), qrels


def subset_sources(folder, policy, query_prompt=None):
    """(query ids, query texts, prompted corpus source, doc ids, qrels, query prompt) of one subset in
    the dataset's layout: documents streamed from corpus.parquet, ids as one Arrow column."""
    query_default, document_prompt = policy.for_subset(read_metadata(folder))
    table = read_columns(folder / "queries.parquet", ["question_id", "question", "pos_doc"])
    queries = dict(zip(table.column("question_id").to_pylist(), table.column("question").to_pylist()))
    qrels = {
        q: {d["id"]: 1 for d in pos or []}
        for q, pos in zip(table.column("question_id").to_pylist(), table.column("pos_doc").to_pylist())
    }
    doc_ids = read_columns(folder / "corpus.parquet", ["id"]).column("id").combine_chunks()
    corpus = ParquetTexts(folder / "corpus.parquet", "text", document_prompt)
    prompt = query_default if query_prompt is None else query_prompt
    return list(queries), list(queries.values()), corpus, doc_ids, qrels, prompt


def beir_sources(folder, policy, query_prompt=None):
    """The same for a BEIR folder, prompted as text without a subset (policy.for_subset(None))."""
    query_default, document_prompt = policy.for_subset(None)
    query_ids, texts, corpus, qrels = read_beir(folder)
    corpus.prompt = document_prompt
    prompt = query_default if query_prompt is None else query_prompt
    return query_ids, texts, corpus, corpus.ids(), qrels, prompt


def evaluate(
    model_dir,
    data,
    batch_size=64,
    query_prompt=None,
    progress=False,
    dim=None,
    device=None,
    dtype=None,
    work_dir=None,
    query_chunk=256,
    corpus_chunk=4096,
    rerank=None,
    rerank_top_k=100,
    rerank_batch_size=32,
    storage="float32",
    first_stage=None,
    first_stage_k=100,
):
    """{"subsets": {name: metrics}, "mean": metrics} for a BEIR folder or dataset-layout folder, on
    rank 0 (None on the other ranks of a multi-process launch; every rank must call it).

    MODEL is an exported embedding model (dense search below), a multi-vector one (exact MaxSim
    over the whole corpus: embedtrain.token_retrieval, token embeddings in on-disk blocks of dtype
    `storage`, scored query chunk x corpus block within a similarity budget) or a sparse one (exact
    dot product: sparse_rows; each subset's metrics also hold "query_nonzeros" and
    "document_nonzeros", and "mean" their mean). `dim` is for dense models only.

    Prompts come from the model (embedtrain.prompts): each subset's pair, or the defaults for BEIR
    folders; `query_prompt` replaces the query prompt. Embeddings go to files of dtype `storage`
    in `work_dir` (default: a temporary folder, removed after), search is exact (retrieval.search,
    top 100, float32 scores): with float32 storage the ranking is a float32 brute-force search's;
    float16 storage rounds every vector first (half the disk, metrics move by ~1e-4..1e-3).

    `first_stage`: "bm25" (embedtrain.bm25 over lowercase words, raw texts, on rank 0) or an
    exported dense model folder (its own prompts, the dense search below): each query's first
    `first_stage_k` candidates from it are rescored by MODEL (MaxSim for a multi-vector model, the
    dot product for a sparse or dense one) and reordered by those scores (ties in first-stage order); "subsets"
    and "mean" are then the metrics of those reordered lists, and "first_stage" ({"model", "top_k",
    "subsets", "mean"}) the first stage's own.

    `rerank`: an exported reranker folder. Once every subset's first stage is done the bi-encoder is
    freed, the reranker scores each query's first `rerank_top_k` candidates (raw query and document
    texts, in the reranker's pair template), and the result also holds "reranked" ({"subsets",
    "mean"} of the reranked rankings: the top k reordered by the reranker's scores, ties in
    first-stage order, then the candidates beyond the top k in their first-stage order) and "rerank"
    ({"model", "top_k"}). "subsets" and "mean" stay the first stage's.
    """
    kind = check_models(model_dir, rerank, rerank_top_k, first_stage, first_stage_k, dim)
    folders, read = data_folders(data)
    depth = max(SEARCH_DEPTH, rerank_top_k) if rerank is not None else SEARCH_DEPTH
    search = {"batch_size": batch_size, "dim": dim, "storage": storage, "query_chunk": query_chunk}
    search.update(corpus_chunk=corpus_chunk, progress=progress)
    results, first_stage_results, stage_inputs = {}, {}, {}
    with work_folder(work_dir) as work:
        candidates = {}
        if first_stage is not None:
            candidates, first_stage_results = first_stage_candidates(
                first_stage, first_stage_k, folders, read, model_policy(model_dir), work, device, dtype, search
            )
        model = load_model(kind, model_dir, device, dtype)
        device = model.device
        for folder in folders:
            query_ids, query_texts, corpus, doc_ids, qrels, prompt = read(folder, model.prompt_policy, query_prompt)
            files = work / folder.name
            extra = {}
            if first_stage is None:
                queries = ListTexts(query_texts, prompt)
                rows, extra = SEARCHES[kind](model, corpus, queries, files, depth, device, search)
            else:
                scores = score_candidates_sharded(
                    candidate_scorer(CANDIDATE_SCORES[kind](model, batch_size)),
                    [prompt + text for text in query_texts],
                    candidates.get(folder.name),
                    corpus,
                    files,
                    query_chunk,
                    progress=progress,
                    desc=f"{folder.name} rescore",
                )
                rows = None if scores is None else reordered_rows(candidates[folder.name], scores)
            rankings = None
            if distributed.rank() == 0:
                rankings = ranked_ids(rows, doc_ids, query_ids)
                results[folder.name] = {**metrics(rankings, qrels), **extra}
            if rerank is not None:
                stage_inputs[folder.name] = (query_texts, unprompted(corpus), rows, rankings, qrels)
            distributed.barrier()
        reranked = None
        if rerank is not None:
            del model  # the reranker takes its place on the device
            free_device_memory()
            reranker = Reranker.from_pretrained(rerank, device=device, dtype=dtype)
            reranked = {}
            for name, (query_texts, corpus, rows, rankings, qrels) in stage_inputs.items():
                scores = score_candidates_sharded(
                    pair_scorer(reranker, rerank_batch_size),
                    query_texts,
                    None if rows is None else rows[:, :rerank_top_k],
                    corpus,
                    work / name,
                    query_chunk,
                    progress=progress,
                    desc=f"{name} rerank",
                )
                if distributed.rank() == 0:
                    reranked[name] = metrics(rerank_rankings(rankings, scores), qrels)
    if distributed.rank() != 0:
        return None
    result = with_mean(results)
    for key in NONZERO_KEYS:  # a sparse model's searched vectors: the mean over the subsets too
        if results and all(key in found for found in results.values()):
            result["mean"][key] = float(np.mean([found[key] for found in results.values()]))
    if first_stage is not None:
        result["first_stage"] = {"model": str(first_stage), "top_k": first_stage_k, **with_mean(first_stage_results)}
    if rerank is not None:
        result["reranked"] = with_mean(reranked)
        result["rerank"] = {"model": str(rerank), "top_k": rerank_top_k}
    return result


def data_folders(data):
    """(subset folders, their reader: beir_sources or subset_sources) of DATA."""
    data = Path(data)
    if (data / "corpus.jsonl").is_file():
        return [data], beir_sources
    if (data / "dataset_metadata.json").is_file():
        return [data], subset_sources
    return subset_folders(data), subset_sources


def load_model(kind, model_dir, device=None, dtype=None):
    """The inference object of MODEL's kind (BiEncoder, MultiVectorEncoder, SparseEncoder) on `device`."""
    loader = {"embedding": BiEncoder, "multi_vector": MultiVectorEncoder, "sparse": SparseEncoder}[kind]
    return loader.from_pretrained(model_dir, device=device, dtype=dtype)


def dense_rows(encoder, corpus, queries, files, depth, device, search):
    """(Q, depth) corpus rows of an exact dense search (rank 0; None elsewhere): corpus and queries
    (text sources, prompted) encoded into MatrixFiles under `files`, removed after."""
    name = files.name
    docs, query_vectors = (
        encode_to_file(
            encoder.module,
            encoder.tokenizer,
            source,
            files / part,
            search["batch_size"],
            encoder.max_seq_length,
            search["dim"],
            progress=search["progress"],
            desc=f"{name} {part}",
            storage=search["storage"],
        )
        for source, part in ((corpus, "corpus"), (queries, "queries"))
    )
    _, rows = search_sharded(
        query_vectors,
        docs,
        depth,
        files,
        query_chunk=search["query_chunk"],
        corpus_chunk=search["corpus_chunk"],
        device=device,
    )
    distributed.barrier()
    if distributed.rank() == 0:
        docs.remove()
        query_vectors.remove()
    return rows, {}


def maxsim_rows(encoder, corpus, queries, files, depth, device, search):
    """(Q, depth) corpus rows of an exact MaxSim search (rank 0; None elsewhere): token embeddings
    in TokenBlocks under `files` (embedtrain.token_retrieval), removed after."""
    name = files.name
    docs, query_tokens = (
        encode_to_blocks(
            encoder,
            source,
            files / part,
            search["batch_size"],
            is_query=part == "queries",
            storage=search["storage"],
            progress=search["progress"],
            desc=f"{name} {part}",
        )
        for source, part in ((corpus, "corpus"), (queries, "queries"))
    )
    _, rows = maxsim_search_sharded(query_tokens, docs, depth, files, query_chunk=search["query_chunk"], device=device)
    distributed.barrier()
    if distributed.rank() == 0:
        docs.remove()
        query_tokens.remove()
    return rows, {}


NONZERO_KEYS = ("query_nonzeros", "document_nonzeros")  # a sparse model's mean non-zero terms per text


def sparse_rows(encoder, corpus, queries, files, depth, device, search):
    """((Q, depth) corpus rows of an exact sparse dot-product search, {"query_nonzeros",
    "document_nonzeros": the mean non-zero terms per text}) on rank 0 ((None, {}) elsewhere). The
    texts are encoded rank-sharded (encode_sparse_sharded); rank 0 builds the inverted index of the
    corpus (inference.sparse_index.build_index, in blocks; the index holds the corpus' non-zeros)
    and searches every query."""
    docs, query_vectors = (
        encode_sparse_sharded(
            encoder,
            source,
            files / part,
            search["batch_size"],
            part == "queries",
            progress=search["progress"],
            desc=f"{files.name} {part}",
        )
        for source, part in ((corpus, "corpus"), (queries, "queries"))
    )
    if distributed.rank() != 0:
        return None, {}
    nonzeros = {"query_nonzeros": mean_nonzeros(query_vectors), "document_nonzeros": mean_nonzeros(docs)}
    index = build_index(docs, encoder.width)
    del docs  # the index holds the corpus from here on
    _, rows = sparse_search(index, query_vectors, depth)
    shutil.rmtree(files / "corpus", ignore_errors=True)
    shutil.rmtree(files / "queries", ignore_errors=True)
    return rows, nonzeros


def encode_sparse_sharded(encoder, source, path, batch_size=64, is_query=False, progress=False, desc="encode"):
    """SparseVectors of every text of `source` (prompted) on rank 0 (None elsewhere): each rank encodes
    its contiguous run of blocks (retrieval.block_rows' grid) into `path`/<first row>.npz
    (inference.sparse_index.write_sparse_vectors); rank 0 reads them back in order. Every rank calls it."""
    n = len(source)
    size = block_rows(n, batch_size)
    if distributed.rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
        Path(path).mkdir(parents=True)
    distributed.barrier()
    start, stop = rank_range(n, size)
    bar = tqdm(total=stop - start, desc=desc, unit="text", disable=not progress or distributed.rank() != 0)
    for offset, texts in zip(range(start, stop, size), source.blocks(start, stop, size)):
        vectors = encoder.encode(texts, prompt=None, is_query=is_query, batch_size=batch_size)
        write_sparse_vectors(Path(path) / f"{offset}.npz", vectors)
        bar.update(len(texts))
    bar.close()
    distributed.barrier()
    if distributed.rank() != 0:
        return None
    return concatenate(read_sparse_vectors(Path(path) / f"{offset}.npz") for offset in range(0, n, size))


SEARCHES = {"embedding": dense_rows, "multi_vector": maxsim_rows, "sparse": sparse_rows}  # MODEL's kind -> search


def distinct_spans(rows, limit):
    """[start, stop) spans of consecutive queries (rows: (c, K) candidate rows, -1 = none) whose
    candidates hold at most `limit` distinct rows together (a query with more: a span of its own)."""
    spans, start, seen = [], 0, set()
    for i, row in enumerate(rows):
        mine = set(row[row >= 0].tolist())
        if i > start and len(seen | mine) > limit:
            spans.append((start, i))
            start, seen = i, set()
        seen |= mine
    return [*spans, (start, len(rows))] if len(rows) else spans


def candidate_scorer(pair_scores, max_candidates=1024):
    """A chunk scorer (score_candidates_sharded) of an embedding model of any kind: (query texts (c),
    candidate rows (c, K), -1 = none, {row: passage text}) -> (c, K) float32 scores, NaN at -1.

    Runs of queries sharing at most `max_candidates` distinct candidates (distinct_spans) are scored
    together: each distinct passage is encoded once per run, which bounds what the model holds while
    queries with overlapping candidates (the usual case on a held-out set) share the encoding.
    `pair_scores(query texts, passage texts, index)` -> (q, K) scores of query i against passage
    index[i, j] (-1: none, NaN). Texts come prompted."""

    def score(queries, rows, texts):
        out = np.full(rows.shape, np.nan, np.float32)
        for start, stop in distinct_spans(rows, max_candidates):
            part = rows[start:stop]
            unique = np.unique(part[part >= 0])
            if len(unique):
                index = np.where(part >= 0, np.searchsorted(unique, part), -1)
                out[start:stop] = pair_scores(list(queries[start:stop]), [texts[r] for r in unique.tolist()], index)
        return out

    return score


def taken(table, index):
    """(q, K) float32 of a (q, p) score table at `index` (-1: NaN)."""
    out = np.take_along_axis(np.asarray(table, np.float32), np.maximum(index, 0), axis=1)
    return np.where(index >= 0, out, np.float32(np.nan))


def dense_pair_scores(encoder, batch_size=32):
    """pair_scores of a dense model: dot products of the query's and each candidate's embedding."""

    def pair_scores(queries, passages, index):
        q = encoder.encode(queries, batch_size=batch_size)
        d = encoder.encode(passages, batch_size=batch_size)
        scores = (np.asarray(q, np.float32)[:, None, :] * np.asarray(d, np.float32)[np.maximum(index, 0)]).sum(-1)
        return np.where(index >= 0, scores, np.float32(np.nan))

    return pair_scores


def sparse_pair_scores(encoder, batch_size=32):
    """pair_scores of a sparse model: dot products of the term weights (an inverted index of the run's passages)."""

    def pair_scores(queries, passages, index):
        documents = build_index(encoder.encode(passages, batch_size=batch_size), encoder.width)
        return taken(dot_scores(documents, encoder.encode(queries, is_query=True, batch_size=batch_size)), index)

    return pair_scores


CANDIDATE_SCORES = {  # MODEL's kind -> its pair_scores
    "embedding": dense_pair_scores,
    "multi_vector": maxsim_pair_scores,
    "sparse": sparse_pair_scores,
}


def first_stage_candidates(first_stage, k, folders, read, policy, work, device, dtype, search):
    """({subset: (Q, k) candidate rows}, {subset: the first stage's metrics}) on rank 0 (empty dicts
    elsewhere) of every subset: BM25 on rank 0, or an exported dense model's search on every rank
    (freed after)."""
    candidates, results = {}, {}
    encoder = None if first_stage == "bm25" else BiEncoder.from_pretrained(first_stage, device=device, dtype=dtype)
    for folder in folders:
        query_ids, query_texts, corpus, doc_ids, qrels, prompt = read(
            folder, policy if encoder is None else encoder.prompt_policy
        )
        if encoder is None:
            rows = None
            if distributed.rank() == 0:
                _, rows = bm25_search(query_texts, unprompted(corpus), k)
        else:
            files = work / f"{folder.name} first stage"
            rows, _ = dense_rows(encoder, corpus, ListTexts(query_texts, prompt), files, k, encoder.device, search)
        if distributed.rank() == 0:
            candidates[folder.name] = rows
            results[folder.name] = metrics(ranked_ids(rows, doc_ids, query_ids), qrels)
        distributed.barrier()
    del encoder
    free_device_memory()
    return candidates, results


def reordered_rows(rows, scores):
    """(Q, K) candidate rows reordered by their (Q, K) scores, higher first; equal scores keep their
    first-stage order and rows without a score (NaN, -1 rows) go last."""
    keys = np.where(np.isnan(scores), np.inf, -scores.astype(np.float64))
    return np.take_along_axis(rows, np.argsort(keys, axis=1, kind="stable"), axis=1)


def check_models(model_dir, rerank=None, rerank_top_k=100, first_stage=None, first_stage_k=100, dim=None):
    """MODEL's kind ("embedding", "multi_vector" or "sparse"); --rerank must be an exported reranker and
    --first-stage "bm25" or an exported embedding model (inference.loading.require_kind: a run folder
    is told to export first); checked before any output or work folder is made."""
    kind = model_kind(model_dir)
    if kind not in SEARCHES:
        require_kind(model_dir, "embedding", "MODEL")
    if dim is not None and kind != "embedding":
        raise EncodeError(f"--dim: only for a dense embedding model; {model_dir} is a {kind} model")
    if rerank is not None:
        require_kind(rerank, "reranker", "--rerank")
        if rerank_top_k < 1:
            raise EncodeError(f"--rerank-top-k must be at least 1, got {rerank_top_k}")
    if first_stage is not None:
        if str(first_stage) != "bm25":
            require_kind(first_stage, "embedding", "--first-stage")
        if first_stage_k < 1:
            raise EncodeError(f"--first-stage-k must be at least 1, got {first_stage_k}")
    return kind


def ranked_ids(rows, doc_ids, query_ids):
    """{query id: ranked doc ids} from the (Q, K) corpus rows of a search (rows -1 = none, dropped)."""
    valid = rows >= 0
    ranked = doc_ids.take(pa.array(rows[valid])).to_pylist()
    ends = np.cumsum(valid.sum(1))
    return {q: ranked[end - count : end] for q, end, count in zip(query_ids, ends.tolist(), valid.sum(1).tolist())}


def free_device_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- the reranking stage


def rerank_ranking(ranking, scores):
    """`ranking` (doc ids, best first) with its first len(scores) entries reordered by `scores`
    (higher first; equal scores keep their first-stage order) and the rest after them, in their
    first-stage order."""
    head = min(len(scores), len(ranking))
    order = np.argsort(-np.asarray(scores[:head], np.float64), kind="stable")
    return [ranking[i] for i in order] + list(ranking[head:])


def rerank_rankings(rankings, scores):
    """{query: reranked ids} of the first-stage {query: ids} (insertion order = the rows of
    `scores`, (Q, K) reranker scores of each query's first K candidates)."""
    return {q: rerank_ranking(ranking, row) for (q, ranking), row in zip(rankings.items(), scores)}


def unprompted(source):
    """The same text source without the bi-encoder's prompt: a reranker reads raw texts."""
    source = copy.copy(source)
    source.prompt = ""
    return source


def texts_at(source, rows):
    """{row: text} of a text source at the sorted, unique int64 `rows`, in one streaming pass from
    the first of them to the last."""
    found = {}
    if not len(rows):
        return found
    wanted = iter(rows.tolist())
    row = next(wanted)
    start, stop = int(rows[0]), int(rows[-1]) + 1
    for offset, texts in zip(range(start, stop, BLOCK), source.blocks(start, stop, BLOCK)):
        while row is not None and row < offset + len(texts):
            found[row] = texts[row - offset]
            row = next(wanted, None)
    return found


def pair_scorer(reranker, batch_size=32):
    """A chunk scorer (score_candidates_sharded) of a reranker: every (query, candidate) pair scored
    with inference.batching.score_pairs in one call per chunk."""

    def score(queries, rows, texts):
        scores = np.full(rows.shape, np.nan, np.float32)
        valid = rows >= 0
        owners = np.nonzero(valid)[0]
        scores[valid] = score_pairs(
            reranker, [queries[q] for q in owners], [texts[r] for r in rows[valid].tolist()], batch_size
        )
        return scores

    return score


def score_candidates_sharded(scorer, query_texts, rows, passages, work, query_chunk=256, progress=False, desc="rerank"):
    """Scores (Q, K) float32 of the pairs (query_texts[q], passage at corpus row rows[q, j]) on rank 0
    (None on the other ranks), NaN where a row is -1. Every rank must call it; `rows` is read on
    rank 0 only, `passages` is the corpus as a text source (retrieval.ParquetTexts or JsonlTexts).
    `scorer(chunk query texts, chunk rows, {row: passage text})` -> the chunk's scores: a reranker's
    (pair_scorer) or an embedding model's of any kind (candidate_scorer).

    Queries are scored `query_chunk` at a time (one scorer call each), each rank a contiguous run
    of chunks on a grid that does not depend on the rank count, so N ranks give the scores of one.
    Rows and scores go through two MatrixFiles in `work` (shared by the ranks); a rank holds the
    texts of at most about RERANK_PASS_PAIRS candidates, fetched in one pass over the corpus each.
    """
    work = Path(work)
    if distributed.rank() == 0:
        MatrixFile.create(work / "rerank-rows", rows.shape, "int64").write(0, rows)
        MatrixFile.create(work / "rerank-scores", rows.shape, "float32")
    distributed.barrier()
    row_file, score_file = MatrixFile.open(work / "rerank-rows"), MatrixFile.open(work / "rerank-scores")
    n, width = row_file.shape
    start, stop = rank_range(n, query_chunk)
    per_pass = query_chunk * max(1, RERANK_PASS_PAIRS // max(1, width * query_chunk))
    bar = tqdm(total=stop - start, desc=desc, unit="query", disable=not progress or distributed.rank() != 0)
    for p0 in range(start, stop, per_pass):
        block = row_file.read(p0, min(stop, p0 + per_pass), dtype=np.int64)
        texts = texts_at(passages, np.unique(block[block >= 0]))
        for c0 in range(p0, p0 + len(block), query_chunk):
            chunk = block[c0 - p0 : c0 - p0 + query_chunk]
            score_file.write(c0, scorer(query_texts[c0 : c0 + len(chunk)], chunk, texts))
            bar.update(len(chunk))
    bar.close()
    distributed.barrier()
    if distributed.rank() != 0:
        return None
    scores = score_file.read(0, n)
    row_file.remove()
    score_file.remove()
    return scores


def format_table(first, second, labels=("first", "rerank")):
    """Two results' metrics ({"subsets", "mean"}) side by side, per subset and their mean, as text:
    the first stage and the reranked ones (--rerank), or the first stage and MODEL (--first-stage)."""
    columns = (("ndcg@10", "nDCG@10"), ("recall@10", "Recall@10"), ("mrr@10", "MRR@10"))
    names = [*first["subsets"], "mean"]
    width = max(len(name) for name in [*names, "subset"])
    lines = [
        " " * width + "".join(f"  {label:^16}" for _, label in columns),
        "subset".ljust(width) + f"  {labels[0]:>8}{labels[1]:>8}" * len(columns),
    ]
    for name in names:
        a = first["mean"] if name == "mean" else first["subsets"][name]
        b = second["mean"] if name == "mean" else second["subsets"][name]
        lines.append(name.ljust(width) + "".join(f"    {a[key]:.4f}  {b[key]:.4f}" for key, _ in columns))
    return "\n".join(lines)


def eval_command(model_dir, data, output=None, batch_size=64, query_prompt=None, dim=None, work_dir=None, **options):
    """`embedtrain eval`: evaluate on every rank of a launch (or in one process); rank 0 prints the
    metrics JSON and writes it to `output` too, and with `rerank` or `first_stage` a side-by-side
    table to stderr. `options`: evaluate()'s device, dtype, query_chunk, corpus_chunk, storage,
    rerank and first-stage options. Bad models are refused before anything is made; the output
    file is written whole or not at all."""
    check_models(
        model_dir,
        options.get("rerank"),
        options.get("rerank_top_k", 100),
        options.get("first_stage"),
        options.get("first_stage_k", 100),
        dim,
    )
    if output:  # checked before the encoding: a result is never computed to be lost
        Path(output).parent.mkdir(parents=True, exist_ok=True)

    def report(result):
        text = json.dumps(result, indent=2)
        if output:
            partial = Path(output).with_name(f".{Path(output).name}.partial")
            partial.write_text(text + "\n")
            partial.replace(output)
        if "query_nonzeros" in result["mean"]:
            print(
                f"sparse vectors: {result['mean']['query_nonzeros']:.1f} non-zero terms per query, "
                f"{result['mean']['document_nonzeros']:.1f} per document (mean over the subsets)",
                file=sys.stderr,
                flush=True,
            )
        if options.get("first_stage"):
            print(format_table(result["first_stage"], result, ("first", "model")), file=sys.stderr, flush=True)
        if options.get("rerank"):
            print(format_table(result, result["reranked"]), file=sys.stderr, flush=True)
        print(text, flush=True)

    distributed.run_sharded(
        lambda: evaluate(
            model_dir, data, batch_size, query_prompt, progress=True, dim=dim, work_dir=work_dir, **options
        ),
        report,
    )


@contextmanager
def work_folder(work_dir=None):
    """The folder the ranks share for embedding files: `work_dir` (kept), or a temporary folder
    made by rank 0 and removed at the end (one node)."""
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        yield Path(work_dir)
        return
    made = tempfile.mkdtemp(prefix="embedtrain-eval-") if distributed.rank() == 0 else None
    path = distributed.broadcast_object(made)
    try:
        yield Path(path)
    finally:
        distributed.barrier()
        if distributed.rank() == 0:
            shutil.rmtree(path, ignore_errors=True)
