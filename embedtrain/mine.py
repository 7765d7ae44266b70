"""Hard-negative mining: `embedtrain mine MODEL DATA OUT`.

For every query of every subset in DATA (the dataset's layout), score the subset's corpus with the
model and keep the top K documents that are not positives and score at most `margin` x the query's
lowest positive score (NV-Retriever's TopK-PercPos: candidates above 95 % of the positive are
likely false negatives). They are written as the ranked `neg_doc` of OUT, in the same layout.

Scoring is chunked over queries and corpus: the largest score block ever held is
query_chunk x corpus_chunk; a running top list per query is merged chunk by chunk.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from embedtrain.data.nemotron import read_metadata, subset_folders
from embedtrain.encode import encode_texts, load_encoder


def mine_rankings(query_vectors, doc_vectors, positives, top_k, margin, query_chunk=256, corpus_chunk=4096):
    """Per query: up to `top_k` doc indices, best first, excluding positives and any doc scoring
    above margin x min(positive scores). Returns (rankings, largest score block in elements)."""
    queries, docs = torch.from_numpy(query_vectors), torch.from_numpy(doc_vectors)
    rankings, largest = [], 0
    for q0 in range(0, len(queries), query_chunk):
        block_q = queries[q0: q0 + query_chunk]
        own = positives[q0: q0 + query_chunk]
        # the threshold needs only each query's positives, so it is known before any block is scored
        threshold_Q = torch.tensor([margin * min(float(q @ docs[p]) for p in ps) for q, ps in zip(block_q, own)])
        best_scores = torch.full((len(block_q), 0), float("-inf"))
        best_index = torch.zeros((len(block_q), 0), dtype=torch.long)
        for d0 in range(0, len(docs), corpus_chunk):
            scores = block_q @ docs[d0: d0 + corpus_chunk].T
            largest = max(largest, scores.numel())
            scores[scores > threshold_Q[:, None]] = float("-inf")
            for row, ps in enumerate(own):
                for p in ps:
                    if d0 <= p < d0 + scores.shape[1]:
                        scores[row, p - d0] = float("-inf")
            merged_scores = torch.cat([best_scores, scores], dim=1)
            merged_index = torch.cat([best_index, torch.arange(d0, d0 + scores.shape[1]).expand(len(block_q), -1)], 1)
            top = merged_scores.topk(min(top_k, merged_scores.shape[1]), dim=1)
            best_scores, best_index = top.values, merged_index.gather(1, top.indices)
        for scores, indices in zip(best_scores.tolist(), best_index.tolist()):
            rankings.append([i for s, i in zip(scores, indices) if s != float("-inf")])
    return rankings, largest


def mine(model_dir, data, out, top_k=20, margin=0.95, batch_size=64, query_chunk=256, corpus_chunk=4096):
    """Re-mine every subset of `data` into `out`; returns {subset: number of queries}."""
    encoder, tokenizer, prompts, max_length = load_encoder(model_dir)
    out = Path(out)
    written = {}
    for folder in tqdm(subset_folders(data), desc="subsets", unit="subset"):
        meta = read_metadata(folder)
        corpus = pq.read_table(folder / "corpus.parquet").to_pylist()
        queries = pq.read_table(folder / "queries.parquet")
        rows = queries.to_pylist()
        doc_index = {d["id"]: i for i, d in enumerate(corpus)}
        instruction = meta["query_instruction"]
        prompt = f"{instruction} " if instruction else prompts.get("query", "")
        doc_vectors = encode_texts(encoder, tokenizer, [prompts.get("document", "") + d["text"] for d in corpus],
                                   batch_size, max_length, progress=True)
        query_vectors = encode_texts(encoder, tokenizer, [prompt + q["question"] for q in rows], batch_size,
                                     max_length, progress=True)
        positives = [{doc_index[p["id"]] for p in q["pos_doc"]} for q in rows]
        rankings, _ = mine_rankings(query_vectors, doc_vectors, positives, top_k, margin, query_chunk, corpus_chunk)
        negatives = [[{"id": corpus[i]["id"]} for i in ranking] for ranking in rankings]
        target = out / folder.name
        target.mkdir(parents=True, exist_ok=True)
        for name in ("corpus.parquet", "dataset_metadata.json"):
            shutil.copy(folder / name, target / name)
        column = pa.array(negatives, queries.schema.field("neg_doc").type)
        pq.write_table(queries.set_column(queries.schema.get_field_index("neg_doc"), "neg_doc", column),
                       target / "queries.parquet")
        (target / "mining.json").write_text(json.dumps({"model": str(model_dir), "top_k": top_k, "margin": margin}))
        written[folder.name] = len(rows)
    return written
