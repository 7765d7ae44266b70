"""Hard-negative mining: `embedtrain mine MODEL DATA OUT`.

For every query of every subset in DATA (the dataset's layout), score the subset's corpus with the
model and keep the top K documents that are not positives and score at most `margin` x the query's
lowest positive score (NV-Retriever's TopK-PercPos: candidates above 95 % of the positive are
likely false negatives). They are written as the ranked `neg_doc` of OUT, in the same layout.

Host memory does not grow with the corpus (embedtrain.retrieval): the corpus is streamed from
corpus.parquet into an on-disk float16 matrix, positives are looked up with Arrow's hash index,
and scoring runs in query_chunk x corpus_chunk blocks with a running top list per query. Launched
on several processes, ranks share the encoding and the scoring; rank 0 writes OUT.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from embedtrain import distributed
from embedtrain.data.nemotron import read_metadata, subset_folders
from embedtrain.encode import load_encoder
from embedtrain.eval import read_columns
from embedtrain.retrieval import ParquetTexts, doc_lists, encode_to_file, positive_ceilings, search, search_sharded

WORK_FOLDER = ".embedtrain-mine"  # under OUT while mining, removed at the end


def mine_rankings(query_vectors, doc_vectors, positives, top_k, margin, query_chunk=256, corpus_chunk=4096):
    """In-memory form of the mining search: per query, up to `top_k` doc indices, best first,
    excluding its `positives` (a set of indices) and any doc scoring above margin x min(positive
    scores). Returns (rankings, largest score block in elements)."""
    counts = [len(p) for p in positives]
    offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    rows = np.fromiter((i for p in positives for i in sorted(p)), np.int64, offsets[-1])
    ceilings = positive_ceilings(query_vectors, doc_vectors, (offsets, rows), margin)
    _, ranked, largest = search(
        query_vectors,
        doc_vectors,
        top_k,
        exclude=(offsets, rows),
        ceilings=ceilings,
        query_chunk=query_chunk,
        corpus_chunk=corpus_chunk,
    )
    return [[i for i in row if i >= 0] for row in ranked.tolist()], largest


def negatives_column(rows, doc_ids, column_type):
    """The ranked neg_doc column (list<struct<id>>) from (Q, K) corpus rows, -1 = no candidate;
    built with Arrow, without a Python object per negative."""
    valid = rows >= 0
    offsets = np.concatenate([[0], np.cumsum(valid.sum(1), dtype=np.int64)]).astype(np.int32)
    ids = doc_ids.take(pa.array(rows[valid]))
    structs = pa.StructArray.from_arrays([ids], names=["id"])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), structs).cast(column_type)


def mine_subset(
    folder, encoder, tokenizer, policy, max_length, work, top_k, margin, batch_size, query_chunk, corpus_chunk, device
):
    """(queries table, (Q, top_k) negative rows, doc ids) of one subset on rank 0; (None, None, None)
    on the other ranks. Every rank must call it."""
    query_prompt, document_prompt = policy.for_subset(read_metadata(folder))
    corpus_file, queries_file = folder / "corpus.parquet", folder / "queries.parquet"
    doc_ids = read_columns(corpus_file, ["id"]).column("id").combine_chunks()
    queries = read_columns(queries_file, None, required=["question", "pos_doc", "neg_doc"])  # all, written back
    positives = doc_lists(
        queries.column("pos_doc"), doc_ids, lambda q: f"{folder.name}: {queries_file} row {q} pos_doc"
    )
    docs = encode_to_file(
        encoder,
        tokenizer,
        ParquetTexts(corpus_file, "text", document_prompt),
        work / "corpus",
        batch_size,
        max_length,
        progress=True,
        desc=f"{folder.name} corpus",
    )
    query_vectors = encode_to_file(
        encoder,
        tokenizer,
        ParquetTexts(queries_file, "question", query_prompt),
        work / "queries",
        batch_size,
        max_length,
        progress=True,
        desc=f"{folder.name} queries",
    )
    ceilings = positive_ceilings(query_vectors, docs, positives, margin, device=device)
    _, rows = search_sharded(
        query_vectors,
        docs,
        top_k,
        work,
        query_chunk=query_chunk,
        corpus_chunk=corpus_chunk,
        exclude=positives,
        ceilings=ceilings,
        device=device,
    )
    distributed.barrier()
    if distributed.rank() != 0:
        return None, None, None
    docs.remove()
    query_vectors.remove()
    return queries, rows, doc_ids


def mine(
    model_dir,
    data,
    out,
    top_k=20,
    margin=0.95,
    batch_size=64,
    query_chunk=256,
    corpus_chunk=4096,
    device=None,
    dtype=None,
):
    """Re-mine every subset of `data` into `out`; returns {subset: number of queries} (on every rank).
    Every rank of a multi-process launch must call it; only rank 0 writes `out`."""
    encoder, tokenizer, policy, max_length = load_encoder(model_dir, dtype=dtype, device=device)
    device = next(encoder.parameters()).device
    out = Path(out)
    written = {}
    for folder in tqdm(subset_folders(data), desc="subsets", unit="subset", disable=distributed.rank() != 0):
        work = out / WORK_FOLDER / folder.name
        queries, rows, doc_ids = mine_subset(
            folder,
            encoder,
            tokenizer,
            policy,
            max_length,
            work,
            top_k,
            margin,
            batch_size,
            query_chunk,
            corpus_chunk,
            device,
        )
        if distributed.rank() == 0:
            write_subset(
                folder,
                out / folder.name,
                queries,
                negatives_column(rows, doc_ids, queries.schema.field("neg_doc").type),
            )
            (out / folder.name / "mining.json").write_text(
                json.dumps({"model": str(model_dir), "top_k": top_k, "margin": margin})
            )
        written[folder.name] = distributed.broadcast_object(None if queries is None else queries.num_rows)
    if distributed.rank() == 0:
        shutil.rmtree(out / WORK_FOLDER, ignore_errors=True)
    distributed.barrier()
    return written


def write_subset(folder, target, queries, negatives):
    """OUT/<subset>: corpus.parquet and dataset_metadata.json copied, queries.parquet with neg_doc
    replaced (every other column as it was)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ("corpus.parquet", "dataset_metadata.json"):
        shutil.copy(folder / name, target / name)
    index = queries.schema.get_field_index("neg_doc")
    pq.write_table(queries.set_column(index, "neg_doc", negatives), target / "queries.parquet")
