"""Reranker inference: loading an exported reranker and scoring (query, passage) pairs, behind
`Reranker.from_pretrained(...).score(...)` / `.rank(...)`, `embedtrain rerank`, `eval --rerank` and
`mine --rerank`.

Pairs are rendered with the template the model was trained with (recorded in the export), truncated
to its pair max length, sorted by token count and batched; scores are the model's logits (divided by
its temperature), float32, in input order.
"""

import json
from pathlib import Path

import numpy as np
import torch

from embedtrain.data.collate import load_tokenizer
from embedtrain.encode import EncodeError, resolve_device, resolve_dtype, token_budget_batches
from embedtrain.model import load_backbone
from embedtrain.model.reranker import Reranker, is_reranker_folder, saved_head
from embedtrain.prompts import MODEL_METADATA


def model_kind(path):
    """ "reranker" or "embedding" for an exported model folder."""
    return "reranker" if is_reranker_folder(path) else "embedding"


def require_kind(path, kind, option):
    """Refuse a model of the other kind with a message saying which kind it is."""
    found = model_kind(path)
    if found != kind:
        other = "an embedding model (bi-encoder)" if found == "embedding" else "a reranker (cross-encoder)"
        use = "embedtrain encode / eval / mine" if found == "embedding" else "embedtrain rerank or eval/mine --rerank"
        raise EncodeError(f"{option} {path} is {other}: use it with {use}")


def load_reranker(model_dir, dtype=None, device=None):
    """An exported reranker in eval mode on `device` in `dtype`, carrying its tokenizer, pair template
    and pair max length (`tokenizer`, `pair_template`, `max_length`)."""
    model_dir = Path(model_dir)
    require_kind(model_dir, "reranker", "model")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    config = json.loads((model_dir / "config.json").read_text())
    metadata = json.loads((model_dir / MODEL_METADATA).read_text()) if (model_dir / MODEL_METADATA).is_file() else {}
    backbone = load_backbone(model_dir, dtype=dtype)
    head = torch.nn.Linear(config["hidden_size"], 1, bias=False, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(saved_head(model_dir).to(dtype))
    model = Reranker(backbone, config.get("pooling", "avg"), config.get("temperature", 1.0), head).eval().to(device)
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    model.tokenizer = load_tokenizer(model_dir, tokenizer_config.get("padding_side", "right"))
    model.pair_template = metadata.get("pair_template", "question:{query} \n \n passage:{passage}")
    model.max_length = metadata.get("pair_max_length", 512)
    model.name_or_path = str(model_dir)
    return model


@torch.no_grad()
def score_pairs(model, queries, passages, batch_size=32, max_length=None, max_tokens=None):
    """Scores of the pairs (queries[i], passages[i]) as a float32 numpy array, in input order."""
    if len(queries) != len(passages):
        raise ValueError(f"{len(queries)} queries but {len(passages)} passages: one query per passage")
    texts = [model.pair_template.format(query=q, passage=p) for q, p in zip(queries, passages)]
    ids = model.tokenizer(texts, max_length=max_length or model.max_length, truncation=True)["input_ids"]
    device = next(model.parameters()).device
    scores = np.zeros(len(ids), np.float32)
    for batch_indices in token_budget_batches([len(x) for x in ids], batch_size, max_tokens):
        batch = model.tokenizer.pad({"input_ids": [ids[i] for i in batch_indices]}, return_tensors="pt")
        logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        scores[batch_indices] = logits.float().cpu().numpy()
    return scores
