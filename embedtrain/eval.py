"""Retrieval evaluation: `embedtrain eval MODEL DATA`.

DATA is a folder in the embed-nemotron-dataset-v1 layout (one subset, or a folder of subsets: the
relevant documents of a query are its pos_doc) or in BEIR layout (corpus.jsonl, queries.jsonl,
qrels/test.tsv). Exact search over the whole corpus through embedtrain.retrieval (corpus streamed
into an on-disk float32 matrix, or float16 with storage="float16", blocked top-100 on the model's
device, rank-sharded when launched on several processes); metrics per subset and their mean.

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
from embedtrain.data.nemotron import read_metadata, subset_folders
from embedtrain.errors import DataError, EncodeError
from embedtrain.inference import BiEncoder, Reranker
from embedtrain.inference.batching import BLOCK, score_pairs
from embedtrain.inference.loading import require_kind
from embedtrain.retrieval import (
    JsonlTexts,
    ListTexts,
    MatrixFile,
    ParquetTexts,
    encode_to_file,
    metrics,
    rank_range,
    read_columns,
    search_sharded,
    with_mean,
)

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
):
    """{"subsets": {name: metrics}, "mean": metrics} for a BEIR folder or dataset-layout folder, on
    rank 0 (None on the other ranks of a multi-process launch; every rank must call it).

    Prompts come from the model (embedtrain.prompts): each subset's pair, or the defaults for BEIR
    folders; `query_prompt` replaces the query prompt. Embeddings go to files of dtype `storage`
    in `work_dir` (default: a temporary folder, removed after), search is exact (retrieval.search,
    top 100, float32 scores): with float32 storage the ranking is a float32 brute-force search's;
    float16 storage rounds every vector first (half the disk, metrics move by ~1e-4..1e-3).

    `rerank`: an exported reranker folder. Once every subset's first stage is done the bi-encoder is
    freed, the reranker scores each query's first `rerank_top_k` candidates (raw query and document
    texts, in the reranker's pair template), and the result also holds "reranked" ({"subsets",
    "mean"} of the reranked rankings: the top k reordered by the reranker's scores, ties in
    first-stage order, then the candidates beyond the top k in their first-stage order) and "rerank"
    ({"model", "top_k"}). "subsets" and "mean" stay the first stage's.
    """
    check_models(model_dir, rerank, rerank_top_k)
    data = Path(data)
    if (data / "corpus.jsonl").is_file():
        folders, read = [data], beir_sources
    elif (data / "dataset_metadata.json").is_file():
        folders, read = [data], subset_sources
    else:
        folders, read = subset_folders(data), subset_sources
    depth = max(SEARCH_DEPTH, rerank_top_k) if rerank is not None else SEARCH_DEPTH
    encoder = BiEncoder.from_pretrained(model_dir, device=device, dtype=dtype)
    device = encoder.device
    results, first_stage = {}, {}
    with work_folder(work_dir) as work:
        for folder in folders:
            query_ids, query_texts, corpus, doc_ids, qrels, prompt = read(folder, encoder.prompt_policy, query_prompt)
            files = work / folder.name
            docs = encode_to_file(
                encoder.module,
                encoder.tokenizer,
                corpus,
                files / "corpus",
                batch_size,
                encoder.max_seq_length,
                dim,
                progress=progress,
                desc=f"{folder.name} corpus",
                storage=storage,
            )
            queries = encode_to_file(
                encoder.module,
                encoder.tokenizer,
                ListTexts(query_texts, prompt),
                files / "queries",
                batch_size,
                encoder.max_seq_length,
                dim,
                progress=progress,
                desc=f"{folder.name} queries",
                storage=storage,
            )
            _, rows = search_sharded(
                queries, docs, depth, files, query_chunk=query_chunk, corpus_chunk=corpus_chunk, device=device
            )
            rankings = None
            if distributed.rank() == 0:
                rankings = ranked_ids(rows, doc_ids, query_ids)
                results[folder.name] = metrics(rankings, qrels)
            if rerank is not None:
                first_stage[folder.name] = (query_texts, unprompted(corpus), rows, rankings, qrels)
            distributed.barrier()
            if distributed.rank() == 0:
                docs.remove()
                queries.remove()
        reranked = None
        if rerank is not None:
            del encoder  # the reranker takes its place on the device
            free_device_memory()
            reranker = Reranker.from_pretrained(rerank, device=device, dtype=dtype)
            reranked = {}
            for name, (query_texts, corpus, rows, rankings, qrels) in first_stage.items():
                scores = score_candidates_sharded(
                    reranker,
                    query_texts,
                    None if rows is None else rows[:, :rerank_top_k],
                    corpus,
                    work / name,
                    rerank_batch_size,
                    query_chunk,
                    progress=progress,
                    desc=f"{name} rerank",
                )
                if distributed.rank() == 0:
                    reranked[name] = metrics(rerank_rankings(rankings, scores), qrels)
    if distributed.rank() != 0:
        return None
    result = with_mean(results)
    if rerank is not None:
        result["reranked"] = with_mean(reranked)
        result["rerank"] = {"model": str(rerank), "top_k": rerank_top_k}
    return result


def check_models(model_dir, rerank=None, rerank_top_k=100):
    """MODEL must be an exported embedding model and --rerank an exported reranker
    (inference.loading.require_kind: a run folder is told to export first); checked before any
    output or work folder is made."""
    require_kind(model_dir, "embedding", "MODEL")
    if rerank is not None:
        require_kind(rerank, "reranker", "--rerank")
        if rerank_top_k < 1:
            raise EncodeError(f"--rerank-top-k must be at least 1, got {rerank_top_k}")


def ranked_ids(rows, doc_ids, query_ids):
    """{query id: ranked doc ids} from the (Q, K) corpus rows of a search (no -1 rows: no exclusions)."""
    ranked = doc_ids.take(pa.array(rows.reshape(-1))).to_pylist()
    width = rows.shape[1]
    return {q: ranked[i * width : (i + 1) * width] for i, q in enumerate(query_ids)}


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


def score_candidates_sharded(
    reranker, query_texts, rows, passages, work, batch_size=32, query_chunk=256, progress=False, desc="rerank"
):
    """Reranker scores (Q, K) float32 of the pairs (query_texts[q], passage at corpus row rows[q, j])
    on rank 0 (None on the other ranks), NaN where a row is -1. Every rank must call it; `rows` is
    read on rank 0 only, `passages` is the corpus as a text source (retrieval.ParquetTexts or
    JsonlTexts, without prompt).

    Queries are scored `query_chunk` at a time (one score_pairs call each), each rank a contiguous run
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
            valid = chunk >= 0
            scores = np.full(chunk.shape, np.nan, np.float32)
            owners = np.nonzero(valid)[0] + c0
            scores[valid] = score_pairs(
                reranker, [query_texts[q] for q in owners], [texts[r] for r in chunk[valid].tolist()], batch_size
            )
            score_file.write(c0, scores)
            bar.update(len(chunk))
    bar.close()
    distributed.barrier()
    if distributed.rank() != 0:
        return None
    scores = score_file.read(0, n)
    row_file.remove()
    score_file.remove()
    return scores


def format_table(result):
    """The first stage and the reranked metrics side by side, per subset and their mean, as text."""
    columns = (("ndcg@10", "nDCG@10"), ("recall@10", "Recall@10"), ("mrr@10", "MRR@10"))
    names = [*result["subsets"], "mean"]
    width = max(len(name) for name in [*names, "subset"])
    lines = [
        " " * width + "".join(f"  {label:^16}" for _, label in columns),
        "subset".ljust(width) + "     first  rerank" * len(columns),
    ]
    for name in names:
        first = result["mean"] if name == "mean" else result["subsets"][name]
        second = result["reranked"]["mean"] if name == "mean" else result["reranked"]["subsets"][name]
        lines.append(name.ljust(width) + "".join(f"    {first[key]:.4f}  {second[key]:.4f}" for key, _ in columns))
    return "\n".join(lines)


def eval_command(model_dir, data, output=None, batch_size=64, query_prompt=None, dim=None, work_dir=None, **options):
    """`embedtrain eval`: evaluate on every rank of a launch (or in one process); rank 0 prints the
    metrics JSON and writes it to `output` too, and with `rerank` the side-by-side table to stderr.
    `options`: evaluate()'s device, dtype, query_chunk, corpus_chunk, storage and rerank options.
    Bad models are refused before anything is made; the output file is written whole or not at all."""
    check_models(model_dir, options.get("rerank"), options.get("rerank_top_k", 100))
    if output:  # checked before the encoding: a result is never computed to be lost
        Path(output).parent.mkdir(parents=True, exist_ok=True)

    def report(result):
        text = json.dumps(result, indent=2)
        if output:
            partial = Path(output).with_name(f".{Path(output).name}.partial")
            partial.write_text(text + "\n")
            partial.replace(output)
        if options.get("rerank"):
            print(format_table(result), file=sys.stderr, flush=True)
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
