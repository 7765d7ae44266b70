"""In-training retrieval evaluation on a held-out folder (`eval.path`, every `eval.every` steps).

Every rank encodes a contiguous slice of the texts with the training engine (under ZeRO-3 all ranks
must run the same number of forwards, so slices are padded to equal length), the embeddings are
gathered, and rank 0 scores with the same exact search and metrics as `embedtrain eval`.
"""

import math

import numpy as np
import torch

from embedtrain import distributed
from embedtrain.data.nemotron import read_metadata, subset_folders
from embedtrain.eval import metrics, read_subset, top_k


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


@torch.no_grad()
def encode_sharded(engine, tokenizer, texts, batch_size, max_length):
    """Embeddings of `texts` (in order) computed rank-sharded, gathered on every rank."""
    rank, world = distributed.rank(), distributed.world_size()
    share = math.ceil(len(texts) / world)
    mine = texts[rank * share : (rank + 1) * share]
    mine = mine + ["."] * (share - len(mine))  # equal forwards on every rank; padding dropped below
    vectors = []
    for start in range(0, share, batch_size):
        batch = tokenizer(
            mine[start : start + batch_size], max_length=max_length, truncation=True, padding=True, return_tensors="pt"
        )
        vectors.append(engine(batch["input_ids"].to(engine.device), batch["attention_mask"].to(engine.device)).float())
    local = torch.cat(vectors) if vectors else torch.zeros(0, 1)
    gathered = distributed.gather_no_grad(local[: max(0, min(share, len(texts) - rank * share))].contiguous())
    return gathered.cpu().numpy()


def evaluate_in_training(engine, tokenizer, sources, batch_size, max_length):
    """{subset: metrics} on rank 0 (None elsewhere); the engine is back in training mode after."""
    engine.eval()
    results = {}
    for name, (query_ids, query_texts, doc_ids, doc_texts, qrels) in sources.items():
        docs = encode_sharded(engine, tokenizer, doc_texts, batch_size, max_length)
        queries = encode_sharded(engine, tokenizer, query_texts, batch_size, max_length)
        if distributed.rank() == 0:
            results[name] = metrics(dict(zip(query_ids, top_k(queries, docs, doc_ids))), qrels)
    engine.train()
    if distributed.rank() != 0:
        return None
    results["mean"] = {
        k: float(np.mean([r[k] for r in results.values()])) for k in ("ndcg@10", "recall@10", "recall@100", "mrr@10")
    }
    return results
