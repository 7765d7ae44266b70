"""Retrieval evaluation: `embedtrain eval MODEL DATA`.

DATA is a folder in the embed-nemotron-dataset-v1 layout (one subset, or a folder of subsets: the
relevant documents of a query are its pos_doc) or in BEIR layout (corpus.jsonl, queries.jsonl,
qrels/test.tsv). Exact search over the whole corpus, batched; metrics per subset and their mean.

Metrics (pure functions of a ranking and the relevance judgements, as trec_eval computes them):
  nDCG@k   sum_{i<=k} rel_i / log2(i + 1), divided by the same sum for the ideal ranking
  Recall@k |relevant in the top k| / |relevant|
  MRR@k    1 / rank of the first relevant document in the top k (0 if none)
"""

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from embedtrain.data.nemotron import DataError, read_metadata, subset_folders
from embedtrain.encode import encode_texts, load_encoder


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
    return {"ndcg@10": mean(ndcg_at_k, 10), "recall@10": mean(recall_at_k, 10),
            "recall@100": mean(recall_at_k, 100), "mrr@10": mean(mrr_at_k, 10), "queries": len(queries)}


def top_k(query_vectors, doc_vectors, doc_ids, k=100, chunk=1024):
    """Exact inner-product search; returns ranked doc ids per query (queries in chunks)."""
    docs = torch.from_numpy(doc_vectors)
    k = min(k, len(doc_ids))
    rankings = []
    for start in range(0, len(query_vectors), chunk):
        scores = torch.from_numpy(query_vectors[start: start + chunk]) @ docs.T
        for row in scores.topk(k, dim=1).indices.tolist():
            rankings.append([doc_ids[i] for i in row])
    return rankings


def read_beir(folder):
    """(queries {id: text}, corpus {id: text}, qrels {query: {doc: rel}}) of a BEIR folder."""
    def jsonl(path):
        if not path.is_file():
            raise DataError(f"BEIR layout: missing {path}")
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    corpus = {d["_id"]: (d.get("title", "") + " " + d["text"]).strip() for d in jsonl(folder / "corpus.jsonl")}
    queries = {q["_id"]: q["text"] for q in jsonl(folder / "queries.jsonl")}
    qrels = {}
    qrels_file = folder / "qrels" / "test.tsv"
    if not qrels_file.is_file():
        raise DataError(f"BEIR layout: missing {qrels_file}")
    for number, line in enumerate(qrels_file.read_text().splitlines()[1:], 2):
        parts = line.split("\t")
        if len(parts) != 3:
            raise DataError(f"{qrels_file} line {number}: expected query-id, corpus-id, score")
        qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    return {q: queries[q] for q in qrels if q in queries}, corpus, qrels, ""


def read_subset(folder):
    """The same triple (plus the query instruction) from one subset in the dataset's layout."""
    meta = read_metadata(folder)
    corpus_rows = pq.read_table(folder / "corpus.parquet", columns=["id", "text"]).to_pylist()
    query_rows = pq.read_table(folder / "queries.parquet", columns=["question_id", "question", "pos_doc"]).to_pylist()
    corpus = {r["id"]: r["text"] for r in corpus_rows}
    queries = {q["question_id"]: q["question"] for q in query_rows}
    qrels = {q["question_id"]: {d["id"]: 1 for d in q["pos_doc"]} for q in query_rows}
    instruction = meta["query_instruction"]
    return queries, corpus, qrels, f"{instruction} " if instruction else ""


def evaluate(model_dir, data, batch_size=64, query_prompt=None, progress=False, dim=None):
    """{"subsets": {name: metrics}, "mean": metrics} for a BEIR folder or dataset-layout folder."""
    data = Path(data)
    if (data / "corpus.jsonl").is_file():
        sources = {data.name: read_beir(data)}
    elif (data / "dataset_metadata.json").is_file():
        sources = {data.name: read_subset(data)}
    else:
        sources = {f.name: read_subset(f) for f in subset_folders(data)}
    encoder, tokenizer, prompts, max_length = load_encoder(model_dir)
    # a model trained with one fixed prefix keeps it; one trained with per-task instructions gets
    # each subset's own instruction (BEIR folders have none: the model's query prompt)
    meta_file = Path(model_dir) / "embedtrain.json"
    prefix_model = meta_file.is_file() and json.loads(meta_file.read_text()).get("prompt_source") == "prefix"
    results = {}
    for name, (queries, corpus, qrels, instruction) in sources.items():
        if query_prompt is not None:
            prompt = query_prompt
        else:
            prompt = prompts.get("query", "") if prefix_model or not instruction else instruction
        document_prompt = prompts.get("document", "")
        doc_ids, query_ids = list(corpus), list(queries)
        doc_vectors = encode_texts(encoder, tokenizer, [document_prompt + corpus[d] for d in doc_ids], batch_size,
                                   max_length, dim, progress=progress)
        query_vectors = encode_texts(encoder, tokenizer, [prompt + queries[q] for q in query_ids], batch_size,
                                     max_length, dim, progress=progress)
        rankings = dict(zip(query_ids, top_k(query_vectors, doc_vectors, doc_ids)))
        results[name] = metrics(rankings, qrels)
    keys = ("ndcg@10", "recall@10", "recall@100", "mrr@10")
    mean = {k: float(np.mean([r[k] for r in results.values()])) for k in keys}
    return {"subsets": results, "mean": mean}
