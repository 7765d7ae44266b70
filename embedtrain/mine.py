"""Hard-negative mining: `embedtrain mine MODEL DATA OUT`.

For every query of every subset in DATA (the dataset's layout), score the subset's corpus with the
model and keep the top K documents that are not positives and score at most `margin` x the query's
lowest positive score (NV-Retriever's TopK-PercPos: candidates above 95 % of the positive are
likely false negatives). They are written as the ranked `neg_doc` of OUT, in the same layout.

A multi-vector (ColBERT) model mines by exact MaxSim the same way (embedtrain.token_retrieval: token
embeddings in on-disk blocks, the ceiling margin x the lowest positive MaxSim score).

Host memory does not grow with the corpus (embedtrain.retrieval): the corpus is streamed from
corpus.parquet into an on-disk float16 matrix (--storage float32: exact float32 vectors, twice the
disk), positives are looked up with Arrow's hash index, and scoring runs in query_chunk x
corpus_chunk blocks with a running top list per query. Launched on several processes, ranks share
the encoding and the scoring; rank 0 writes OUT.

With --rerank, a second pass once every subset is mined: a reranker (cross-encoder) scores each
query's mined negatives and its positives, and a negative it scores above the query's lowest
positive score minus --rerank-margin is dropped as a likely false negative (the kept ones keep their
order; nothing is mined in their place). mining.json records how many were scored and dropped.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from embedtrain import distributed
from embedtrain.data import parquet
from embedtrain.data.formats import location, to_layout
from embedtrain.data.hub import resolve_dataset
from embedtrain.data.nemotron import read_metadata, subset_folders
from embedtrain.data.shards import MANIFEST
from embedtrain.errors import DataError
from embedtrain.eval import free_device_memory, pair_scorer, score_candidates_sharded
from embedtrain.inference import BiEncoder, MultiVectorEncoder, Reranker
from embedtrain.inference.loading import model_kind, require_kind
from embedtrain.retrieval import (
    ParquetTexts,
    doc_lists,
    encode_to_file,
    positive_ceilings,
    read_columns,
    search,
    search_sharded,
)
from embedtrain.token_retrieval import encode_to_blocks, maxsim_ceilings, maxsim_search_sharded

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


def mine_subset(folder, encoder, work, top_k, margin, batch_size, query_chunk, corpus_chunk, device, storage="float16"):
    """(queries table, (Q, top_k) negative rows, doc ids) of one subset on rank 0; (None, None, None)
    on the other ranks; `encoder` an embedtrain.inference.BiEncoder or MultiVectorEncoder, `storage`
    the dtype of the on-disk embeddings (retrieval.encode_to_file, token_retrieval.encode_to_blocks).
    Every rank must call it."""
    query_prompt, document_prompt = encoder.prompt_policy.for_subset(read_metadata(folder))
    corpus_file, queries_file = folder / "corpus.parquet", folder / "queries.parquet"
    doc_ids = read_columns(corpus_file, ["id"]).column("id").combine_chunks()
    queries = read_columns(queries_file, None, required=["question", "pos_doc", "neg_doc"])  # all, written back
    positives = doc_lists(
        queries.column("pos_doc"), doc_ids, lambda q: f"{folder.name}: {queries_file} row {q} pos_doc"
    )
    sources = {
        "corpus": ParquetTexts(corpus_file, "text", document_prompt),
        "queries": ParquetTexts(queries_file, "question", query_prompt),
    }
    find_negatives = maxsim_negatives if isinstance(encoder, MultiVectorEncoder) else dense_negatives
    options = {"batch_size": batch_size, "query_chunk": query_chunk, "corpus_chunk": corpus_chunk}
    rows = find_negatives(encoder, sources, work, positives, top_k, margin, device=device, storage=storage, **options)
    distributed.barrier()
    if distributed.rank() != 0:
        return None, None, None
    return queries, rows, doc_ids


def dense_negatives(
    encoder, sources, work, positives, top_k, margin, batch_size, query_chunk, corpus_chunk, device, storage
):
    """The (Q, top_k) mined rows of a dense model on rank 0 (None elsewhere): embeddings in
    MatrixFiles under `work` (removed after), exact search without positives, under the ceilings."""
    docs, query_vectors = (
        encode_to_file(
            encoder.module,
            encoder.tokenizer,
            sources[part],
            work / part,
            batch_size,
            encoder.max_seq_length,
            progress=True,
            desc=f"{work.name} {part}",
            storage=storage,
        )
        for part in ("corpus", "queries")
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
    if distributed.rank() == 0:
        docs.remove()
        query_vectors.remove()
    return rows


def maxsim_negatives(
    encoder, sources, work, positives, top_k, margin, batch_size, query_chunk, corpus_chunk, device, storage
):
    """The same for a multi-vector model: token embeddings in TokenBlocks (embedtrain.token_retrieval),
    exact MaxSim search without positives, under margin x the lowest positive MaxSim score
    (`corpus_chunk` unused: the MaxSim search holds at most losses.MAXSIM_BLOCK_ELEMENTS similarities)."""
    docs, query_tokens = (
        encode_to_blocks(
            encoder,
            sources[part],
            work / part,
            batch_size,
            is_query=part == "queries",
            storage=storage,
            progress=True,
            desc=f"{work.name} {part}",
        )
        for part in ("corpus", "queries")
    )
    ceilings = maxsim_ceilings(query_tokens, docs, positives, margin, device=device)
    _, rows = maxsim_search_sharded(
        query_tokens, docs, top_k, work, query_chunk=query_chunk, exclude=positives, ceilings=ceilings, device=device
    )
    distributed.barrier()
    if distributed.rank() == 0:
        docs.remove()
        query_tokens.remove()
    return rows


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
    rerank=None,
    rerank_margin=0.0,
    rerank_batch_size=32,
    storage="float16",
):
    """Re-mine every subset of `data` into `out`; returns {subset: number of queries} (on every rank).
    Every rank of a multi-process launch must call it; only rank 0 writes `out`.

    `rerank`: an exported reranker folder; the mined negatives are then filtered with it
    (`rerank_subset`), and each subset's mining.json also holds "rerank", "rerank_margin",
    "rerank_scored" (negatives scored) and "rerank_dropped" (negatives dropped)."""
    multi_vector = model_kind(model_dir) == "multi_vector"
    if not multi_vector:
        require_kind(model_dir, "embedding", "MODEL")
    if rerank is not None:
        require_kind(rerank, "reranker", "--rerank")
    loader = MultiVectorEncoder if multi_vector else BiEncoder
    encoder = loader.from_pretrained(model_dir, device=device, dtype=dtype)
    device = encoder.device
    out = Path(out)
    written = {}
    folders = source_subsets(data, out)
    for folder in tqdm(folders, desc="subsets", unit="subset", disable=distributed.rank() != 0):
        work = out / WORK_FOLDER / folder.name
        queries, rows, doc_ids = mine_subset(
            folder,
            encoder,
            work,
            top_k,
            margin,
            batch_size,
            query_chunk,
            corpus_chunk,
            device,
            storage,
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
    if rerank is not None:
        del encoder  # the reranker takes its place on the device
        free_device_memory()
        reranker = Reranker.from_pretrained(rerank, device=device, dtype=dtype)
        for folder in folders:
            counts = rerank_subset(
                out / folder.name,
                reranker,
                rerank_margin,
                rerank_batch_size,
                query_chunk,
                out / WORK_FOLDER / folder.name,
            )
            if distributed.rank() == 0:
                manifest = out / folder.name / "mining.json"
                settings = {"rerank": str(rerank), "rerank_margin": rerank_margin, **counts}
                manifest.write_text(json.dumps({**json.loads(manifest.read_text()), **settings}))
    if distributed.rank() == 0:
        shutil.rmtree(out / WORK_FOLDER, ignore_errors=True)
    distributed.barrier()
    return written


def source_subsets(data, out):
    """The subset folders of DATA in the dataset's layout. DATA is anything `embedtrain prepare`
    reads (a folder or file of embedtrain.data.formats, or a Hugging Face dataset id); other formats
    are converted under OUT/.embedtrain-mine/converted first, on rank 0 (removed with the work
    folder at the end). A row that cannot be converted is an error here (mining has no
    --skip-bad-rows), after which OUT is as it was. A prepared folder is refused with its source named."""
    path = Path(data)
    if (path / MANIFEST).is_file():
        source = json.loads((path / MANIFEST).read_text()).get("source", "SRC")
        raise DataError(
            f"DATA {data} is a prepared folder ({MANIFEST}); mine reads the source it was prepared from: "
            f"`embedtrain mine MODEL {source} OUT`"
        )

    def convert():
        created = not out.exists()
        try:
            folder, bad = to_layout(resolve_dataset(data)[0], "auto", out / WORK_FOLDER / "converted")
            if bad:
                first = "; ".join(f"{location(p)}: {p['reason']}" for p in bad[:3])
                raise DataError(
                    f"DATA {data}: {len(bad)} bad row(s), first: {first}; fix them first (`embedtrain prepare "
                    f"{data} OUT --skip-bad-rows` lists every one in OUT/skipped_rows.jsonl)"
                )
            return subset_folders(folder)
        except BaseException:
            shutil.rmtree(out / WORK_FOLDER, ignore_errors=True)
            if created:
                shutil.rmtree(out, ignore_errors=True)
            raise

    return distributed.run_on_main(convert)


def mine_command(model_dir, data, out, top_k=20, margin=0.95, **options):
    """`embedtrain mine`: mine on every rank of a launch (or in one process); rank 0 prints what was
    written and, with `rerank`, how many negatives the reranker dropped (summed from the subsets'
    mining.json). `options`: mine()'s batch size, chunk, device, dtype and rerank options."""

    def report(written):
        print(f"mined {sum(written.values()):,} queries in {len(written)} subset(s) into {out}", flush=True)
        if options.get("rerank"):
            manifests = [json.loads((Path(out) / name / "mining.json").read_text()) for name in written]
            print(
                f"the reranker dropped {sum(m['rerank_dropped'] for m in manifests):,} of "
                f"{sum(m['rerank_scored'] for m in manifests):,} mined negatives as likely false negatives "
                "(counts per subset in mining.json)",
                flush=True,
            )

    distributed.run_sharded(lambda: mine(model_dir, data, out, top_k, margin, **options), report)


def write_subset(folder, target, queries, negatives):
    """OUT/<subset>: corpus.parquet and dataset_metadata.json copied, queries.parquet with neg_doc
    replaced (every other column as it was)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ("corpus.parquet", "dataset_metadata.json"):
        shutil.copy(folder / name, target / name)
    index = queries.schema.get_field_index("neg_doc")
    pq.write_table(queries.set_column(index, "neg_doc", negatives), target / "queries.parquet")


def rerank_subset(target, reranker, margin, batch_size, query_chunk, work):
    """Filter the mined neg_doc of OUT/<subset> (`target`) in place with a reranker: every negative and
    positive of each query is scored (raw question and corpus text, the reranker's pair template,
    rank-sharded as eval.score_candidates_sharded), and `drop_false_negatives` decides. Returns
    {"rerank_scored", "rerank_dropped"} on rank 0, None on the other ranks; every rank must call it."""
    queries_file, corpus_file = target / "queries.parquet", target / "corpus.parquet"
    doc_ids = read_columns(corpus_file, ["id"]).column("id").combine_chunks()
    table = read_columns(queries_file, ["question", "pos_doc", "neg_doc"])
    negatives, positives = (
        padded_rows(doc_lists(table.column(name), doc_ids, lambda q, name=name: f"{queries_file} row {q} {name}"))
        for name in ("neg_doc", "pos_doc")
    )
    width = negatives.shape[1]
    if width == 0:  # nothing was mined
        return {"rerank_scored": 0, "rerank_dropped": 0} if distributed.rank() == 0 else None
    scores = score_candidates_sharded(
        pair_scorer(reranker, batch_size),
        table.column("question").to_pylist(),
        np.hstack([negatives, positives]),
        ParquetTexts(corpus_file, "text"),
        work,
        query_chunk,
        progress=True,
        desc=f"{target.name} rerank",
    )
    if distributed.rank() != 0:
        return None
    kept, dropped = drop_false_negatives(negatives, scores[:, :width], scores[:, width:], margin)
    queries = parquet.read_table(queries_file)
    column = negatives_column(kept, doc_ids, queries.schema.field("neg_doc").type)
    pq.write_table(queries.set_column(queries.schema.get_field_index("neg_doc"), "neg_doc", column), queries_file)
    return {"rerank_scored": int((negatives >= 0).sum()), "rerank_dropped": dropped}


def drop_false_negatives(negatives, negative_scores, positive_scores, margin):
    """(negatives with -1 where dropped, number dropped). negatives: (Q, K) corpus rows, -1 = none;
    negative_scores (Q, K) and positive_scores (Q, P): the reranker's scores, NaN for no document.
    A negative is dropped when it scores above its query's lowest positive score minus `margin`; a
    query without positives drops nothing."""
    lowest = np.min(np.where(np.isnan(positive_scores), np.inf, positive_scores), axis=1, initial=np.inf)
    drop = (negatives >= 0) & (negative_scores > (lowest - margin)[:, None])
    return np.where(drop, -1, negatives), int(drop.sum())


def padded_rows(lists):
    """(Q, longest) int64 matrix of CSR (offsets, rows) lists, -1 after each query's rows."""
    offsets, rows = lists
    counts = np.diff(offsets)
    matrix = np.full((len(counts), int(counts.max(initial=0))), -1, np.int64)
    matrix[np.repeat(np.arange(len(counts)), counts), np.arange(len(rows)) - np.repeat(offsets[:-1], counts)] = rows
    return matrix
