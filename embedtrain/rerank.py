"""Reranker inference: loading an exported reranker and scoring (query, passage) pairs, behind
`Reranker.from_pretrained(...).score(...)` / `.rank(...)`, `embedtrain rerank`, `eval --rerank` and
`mine --rerank`.

Pairs are rendered with the template the model was trained with (recorded in the export), truncated
to its pair max length, sorted by token count and batched; scores are the model's logits (divided by
its temperature), float32, in input order.

    embedtrain rerank exported/tiny_reranker --input pairs.jsonl --output scores.jsonl
"""

import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from embedtrain.data.collate import load_tokenizer
from embedtrain.encode import BLOCK, EncodeError, resolve_device, resolve_dtype, token_budget_batches
from embedtrain.model import check_bidirectional, load_backbone
from embedtrain.model.reranker import Reranker, is_reranker_folder, saved_head
from embedtrain.prompts import MODEL_METADATA


def model_kind(path):
    """ "reranker", "adapter" (a LoRA adapter exported alone) or "embedding" for an exported folder."""
    if is_reranker_folder(path):
        return "reranker"
    if (Path(path) / "adapter_config.json").is_file() and not (Path(path) / "config.json").is_file():
        return "adapter"
    return "embedding"


KIND_USES = {
    "embedding": "an embedding model (bi-encoder): it embeds texts and does not score pairs; use it with "
    "embedtrain encode / eval / mine or embedtrain.BiEncoder.from_pretrained",
    "reranker": "a reranker (cross-encoder): it scores (query, passage) pairs and does not embed texts; use it "
    "with embedtrain rerank, eval/mine --rerank or embedtrain.Reranker.from_pretrained",
    "adapter": "a LoRA adapter without its base (embedtrain export --adapter-only): export the run merged "
    "(embedtrain export RUN OUT) to encode with it, or load it with peft on the base",
}


def require_kind(path, kind, option):
    """Refuse a model of the other kind with a message saying which kind it is and what takes it."""
    found = model_kind(path)
    if found != kind:
        raise EncodeError(f"{option} {path} is {KIND_USES[found]}")


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
    head = saved_head(model_dir, config["hidden_size"], dtype)
    model = Reranker(backbone, config.get("pooling", "avg"), config.get("temperature", 1.0), head).eval().to(device)
    check_bidirectional(model.backbone)
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    model.tokenizer = load_tokenizer(model_dir, tokenizer_config.get("padding_side", "right"))
    model.pair_template = metadata.get("pair_template", "question:{query} \n \n passage:{passage}")
    model.max_length = metadata.get("pair_max_length", 512)
    model.name_or_path = str(model_dir)
    return model


@torch.no_grad()
def score_pairs(model, queries, passages, batch_size=32, max_length=None, max_tokens=None, progress=False):
    """Scores of the pairs (queries[i], passages[i]) as a float32 numpy array, in input order.

    Pairs are tokenized BLOCK at a time (bounded host memory on long inputs) and, within a block,
    batched longest first under `batch_size` sequences and `max_tokens` padded tokens."""
    if len(queries) != len(passages):
        raise ValueError(f"{len(queries)} queries but {len(passages)} passages: one query per passage")
    device = next(model.parameters()).device
    scores = np.zeros(len(queries), np.float32)
    bar = tqdm(total=len(queries), desc="rerank", unit="pair", disable=not progress)
    for start in range(0, len(queries), BLOCK):
        texts = [
            model.pair_template.format(query=q, passage=p)
            for q, p in zip(queries[start : start + BLOCK], passages[start : start + BLOCK])
        ]
        ids = model.tokenizer(texts, max_length=max_length or model.max_length, truncation=True)["input_ids"]
        for batch_indices in token_budget_batches([len(x) for x in ids], batch_size, max_tokens):
            batch = model.tokenizer.pad({"input_ids": [ids[i] for i in batch_indices]}, return_tensors="pt")
            logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            scores[[start + i for i in batch_indices]] = logits.float().cpu().numpy()
            bar.update(len(batch_indices))
    bar.close()
    return scores


PAIR_RECORD = 'an object with a string "query" and a string "passage" or a list of strings "passages"'


def pair_record(record):
    """(query, passages, single) of one input line, or the reason it is not a pair record."""
    if not isinstance(record, dict) or not isinstance(record.get("query"), str):
        return f"expected {PAIR_RECORD}"
    if ("passage" in record) == ("passages" in record):
        return f"expected {PAIR_RECORD}; it has {'both' if 'passage' in record else 'neither'}"
    if "passage" in record:
        if not isinstance(record["passage"], str):
            return f'"passage" is {type(record["passage"]).__name__}, expected a string'
        return record["query"], [record["passage"]], True
    passages = record["passages"]
    if not isinstance(passages, list):
        return f'"passages" is {type(passages).__name__}, expected a list of strings'
    for index, passage in enumerate(passages):
        if not isinstance(passage, str):
            return f'"passages"[{index}] is {type(passage).__name__}, expected a string'
    return record["query"], passages, False


def read_pairs(path):
    """[(query, passages, single)] of a JSON-lines file, one per line: {"query", "passage"} (single)
    or {"query", "passages": [...]}; errors name the file and line."""
    path = Path(path)
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            try:
                parsed = pair_record(json.loads(line))
            except json.JSONDecodeError as err:
                raise EncodeError(f"{path} line {number}: not JSON ({err})") from err
            if isinstance(parsed, str):
                raise EncodeError(f"{path} line {number}: {parsed}")
            records.append(parsed)
    return records


def rerank_file(
    model_dir, input_path, output_path, batch_size=32, max_length=None, max_tokens=None, device=None, dtype=None
):
    """Score every pair of `input_path` (read_pairs) into `output_path`, one JSON line per input line in
    order: {"score": s} for a "passage" line, {"scores": [s, ...]} for a "passages" line. Returns
    (lines, pairs)."""
    require_kind(model_dir, "reranker", "model")
    records = read_pairs(input_path)  # bad input fails before the model loads
    model = load_reranker(model_dir, dtype=dtype, device=device)
    max_length = max_length or model.max_length
    limit = model.backbone.config.max_position_embeddings
    if max_length > limit:
        raise EncodeError(f"--max-length {max_length} exceeds {model_dir}'s max_position_embeddings={limit}")
    queries = [query for query, passages, _ in records for _ in passages]
    passages = [passage for _, record_passages, _ in records for passage in record_passages]
    scores = score_pairs(model, queries, passages, batch_size, max_length, max_tokens, progress=True).tolist()
    with open(output_path, "w", encoding="utf-8") as out:
        start = 0
        for _, record_passages, single in records:
            record_scores = scores[start : start + len(record_passages)]
            start += len(record_passages)
            out.write(json.dumps({"score": record_scores[0]} if single else {"scores": record_scores}) + "\n")
    return len(records), len(passages)
