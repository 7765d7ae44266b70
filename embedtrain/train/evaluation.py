"""In-training retrieval evaluation on a held-out folder (`eval.path`, every `eval.every` steps).

Every rank encodes a contiguous slice of the texts with the training engine (under ZeRO-3 all ranks
must run the same number of forwards, so slices are padded to equal length), the embeddings are
gathered, and rank 0 scores with the same exact search and metrics as `embedtrain eval`.

A multi-vector model (model.kind=multi_vector) is evaluated the same way on its token embeddings:
every rank encodes its slice as the export encodes (query expansion, document skiplist), the ragged
token embeddings are gathered, and rank 0 ranks the corpus by exact MaxSim (inference/token_index.py).

A reranker (model.kind=reranker) cannot search a corpus; its evaluation reranks a fixed first-stage
list instead: for each held-out query, its pos_doc plus its neg_doc (the dataset's mined negatives),
at most eval.rerank_candidates documents, in an order shuffled per query (seeded by the query id) so
that tied scores favour neither side. Every (query, document) pair is scored rank-sharded like the
embeddings, and the same metrics are computed over that list (Recall@100 and Recall@10 differ only
for lists longer than 10).
"""

import math
import random

import numpy as np
import torch

from embedtrain import distributed
from embedtrain.data.nemotron import read_metadata, subset_folders
from embedtrain.errors import DataError
from embedtrain.inference.multi_vector import encode_tokens
from embedtrain.inference.token_index import flatten, maxsim_search, unflatten
from embedtrain.retrieval import metrics, read_columns, read_subset, top_k, with_mean


def load_sources(eval_config, prompt_policy):
    """{subset: (query ids, query texts with prompt, doc ids, doc texts with prompt, qrels)} of
    eval.path, prompted as training prompts (embedtrain.prompts)."""
    sources = {}
    for folder in subset_folders(eval_config.path):
        queries, corpus, qrels, _ = read_subset(folder)
        query_prompt, document_prompt = prompt_policy.for_subset(read_metadata(folder))
        query_ids = list(queries)[: eval_config.max_queries or None]
        doc_ids = list(corpus)
        sources[folder.name] = (
            query_ids,
            [query_prompt + queries[q] for q in query_ids],
            doc_ids,
            [document_prompt + corpus[d] for d in doc_ids],
            {q: qrels[q] for q in query_ids},
        )
    return sources


def load_rerank_sources(eval_config, data_config, limit=100):
    """{subset: (query ids, pair texts, candidate doc ids per query, qrels)} of eval.path for a
    reranker: the pairs of each query with its `candidate_list`, query by query, rendered with
    data.pair_template from the raw question and document texts (no prompts, as in training)."""
    sources = {}
    for folder in subset_folders(eval_config.path):
        columns = ["question_id", "question", "pos_doc", "neg_doc"]
        rows = read_columns(folder / "queries.parquet", columns).to_pylist()[: eval_config.max_queries or None]
        table = read_columns(folder / "corpus.parquet", ["id", "text"])
        corpus = dict(zip(table.column("id").to_pylist(), table.column("text").to_pylist()))
        query_ids, pairs, candidates, qrels = [], [], [], {}
        for row in rows:
            positives = [d["id"] for d in row["pos_doc"] or []]
            ids = candidate_list(row["question_id"], positives, [d["id"] for d in row["neg_doc"] or []], limit)
            missing = [d for d in ids if d not in corpus]
            if missing:
                raise DataError(
                    f"{folder / 'queries.parquet'}: query {row['question_id']}: document {missing[0]!r} is not "
                    f"in {folder / 'corpus.parquet'}"
                )
            query_ids.append(row["question_id"])
            candidates.append(ids)
            pairs += [data_config.pair_template.format(query=row["question"], passage=corpus[d]) for d in ids]
            qrels[row["question_id"]] = {d: 1 for d in positives}
        sources[folder.name] = (query_ids, pairs, candidates, qrels)
    return sources


def candidate_list(query_id, positives, negatives, limit=100):
    """A query's documents to rerank: its positives, then its negatives that are not positives, at
    most `limit` in all (every positive is kept), without repeats, shuffled by a generator seeded
    with the query id (the same list at every evaluation and on every rank)."""
    positives = list(dict.fromkeys(positives))
    known = set(positives)
    negatives = [d for d in dict.fromkeys(negatives) if d not in known][: max(0, limit - len(positives))]
    ids = positives + negatives
    random.Random(str(query_id)).shuffle(ids)
    return ids


@torch.no_grad()
def encode_sharded(engine, tokenizer, texts, batch_size, max_length):
    """The engine's outputs for `texts` (in order: embeddings, or a reranker's logits) computed
    rank-sharded, gathered on every rank."""
    rank, world = distributed.rank(), distributed.world_size()
    per_rank = math.ceil(len(texts) / world)
    mine = texts[rank * per_rank : (rank + 1) * per_rank]
    mine = mine + ["."] * (per_rank - len(mine))  # equal forwards on every rank; padding dropped below
    vectors = []
    for start in range(0, per_rank, batch_size):
        batch = tokenizer(
            mine[start : start + batch_size], max_length=max_length, truncation=True, padding=True, return_tensors="pt"
        )
        vectors.append(engine(batch["input_ids"].to(engine.device), batch["attention_mask"].to(engine.device)).float())
    local = torch.cat(vectors) if vectors else torch.zeros(0, 1)
    gathered = distributed.gather_no_grad(local[: max(0, min(per_rank, len(texts) - rank * per_rank))].contiguous())
    return gathered.cpu().numpy()


def evaluate_in_training(engine, tokenizer, sources, batch_size, max_length, query_side=None):
    """{subset: metrics} on rank 0 (None elsewhere); the engine is back in training mode after.
    `query_side`: the (engine, tokenizer) that encode the queries when not these (a sparse model's
    inference-free query table, embedtrain/kinds/sparse.py)."""
    engine.eval()
    results = {}
    query_engine, query_tokenizer = query_side or (engine, tokenizer)
    for name, (query_ids, query_texts, doc_ids, doc_texts, qrels) in sources.items():
        docs = encode_sharded(engine, tokenizer, doc_texts, batch_size, max_length)
        queries = encode_sharded(query_engine, query_tokenizer, query_texts, batch_size, max_length)
        if distributed.rank() == 0:
            results[name] = metrics(dict(zip(query_ids, top_k(queries, docs, doc_ids))), qrels)
    engine.train()
    if distributed.rank() != 0:
        return None
    results["mean"] = with_mean(results)["mean"]
    return results


def rerank_in_training(engine, tokenizer, sources, batch_size, max_length):
    """{subset: metrics, "mean": metrics} of a reranker engine over `load_rerank_sources`' lists, on
    rank 0 (None elsewhere): each query's candidates ranked by the engine's scores (ties: list
    order). Every rank must call it; the engine is back in training mode after."""
    engine.eval()
    results = {}
    for name, (query_ids, pairs, candidates, qrels) in sources.items():
        scores = encode_sharded(engine, tokenizer, pairs, batch_size, max_length).reshape(-1)
        if distributed.rank() == 0:
            offsets = np.cumsum([0] + [len(ids) for ids in candidates])
            rankings = {
                q: [ids[i] for i in np.argsort(-scores[start:stop], kind="stable")]
                for q, ids, start, stop in zip(query_ids, candidates, offsets[:-1], offsets[1:])
            }
            results[name] = metrics(rankings, qrels)
    engine.train()
    if distributed.rank() != 0:
        return None
    summary = with_mean(results)
    return {**summary["subsets"], "mean": summary["mean"]}


@torch.no_grad()
def encode_tokens_sharded(encoder, texts, is_query, batch_size):
    """A multi-vector engine's token embeddings of `texts` (inference/multi_vector.encode_tokens:
    lengths, query expansion, document skiplist as the export encodes them), computed rank-sharded
    (every rank as many forwards) and gathered on every rank: (flat (tokens, D) float32, offsets)."""
    rank, world = distributed.rank(), distributed.world_size()
    per_rank = math.ceil(len(texts) / world)
    mine = texts[rank * per_rank : (rank + 1) * per_rank]
    real = len(mine)
    arrays = encode_tokens(encoder, mine + ["."] * (per_rank - real), "", is_query, batch_size)[:real]
    flat, offsets = flatten(arrays, encoder.settings.dim)
    device = encoder.module.device
    flat = distributed.gather_no_grad(torch.from_numpy(flat).to(device)).cpu().numpy()
    lengths = distributed.gather_no_grad(torch.from_numpy(np.diff(offsets)).to(device)).cpu().numpy()
    return flat, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def maxsim_in_training(encoder, sources, batch_size, k=100):
    """{subset: metrics, "mean": metrics} of a multi-vector engine on rank 0 (None elsewhere): every
    held-out query against the subset's whole corpus by exact MaxSim (inference/token_index.py's
    block search), the metrics of `evaluate_in_training`. `encoder`: the engine with the tokenizer,
    settings and expansion token (as inference.MultiVectorEncoder holds them). Every rank must call
    it; the engine is back in training mode after."""
    engine = encoder.module
    engine.eval()
    results = {}
    for name, (query_ids, query_texts, doc_ids, doc_texts, qrels) in sources.items():
        docs, doc_offsets = encode_tokens_sharded(encoder, doc_texts, False, batch_size)
        queries, query_offsets = encode_tokens_sharded(encoder, query_texts, True, batch_size)
        if distributed.rank() == 0:
            _, rows = maxsim_search(unflatten(queries, query_offsets), docs, doc_offsets, k)
            rankings = {q: [doc_ids[i] for i in row if i >= 0] for q, row in zip(query_ids, rows.tolist())}
            results[name] = metrics(rankings, qrels)
    engine.train()
    if distributed.rank() != 0:
        return None
    results["mean"] = with_mean(results)["mean"]
    return results
