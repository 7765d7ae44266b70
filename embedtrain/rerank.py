"""Reranking a file of (query, passage) pairs with an exported reranker: `embedtrain rerank`.

    embedtrain rerank exported/tiny_reranker --input pairs.jsonl --output scores.jsonl

Loading the reranker and scoring pairs (the template the model was trained with, its pair max
length, token-budget batches) live in embedtrain.inference, behind
`Reranker.from_pretrained(...).score(...)`, `eval --rerank` and `mine --rerank` too.
"""

import json
from pathlib import Path

from embedtrain.errors import EncodeError
from embedtrain.inference import Reranker
from embedtrain.inference.batching import score_pairs
from embedtrain.inference.loading import require_kind

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
    require_kind(model_dir, "reranker", "MODEL")
    records = read_pairs(input_path)  # bad input fails before the model loads
    model = Reranker.from_pretrained(model_dir, device=device, dtype=dtype)
    max_length = max_length or model.max_length
    limit = model.module.backbone.config.max_position_embeddings
    if max_length > limit:
        raise EncodeError(f"--max-length {max_length} exceeds {model_dir}'s max_position_embeddings={limit}")
    queries = [query for query, passages, _ in records for _ in passages]
    passages = [passage for _, record_passages, _ in records for passage in record_passages]
    scores = score_pairs(model, queries, passages, batch_size, max_length, max_tokens, progress=True).tolist()
    lines, start = [], 0
    for _, record_passages, single in records:
        record_scores = scores[start : start + len(record_passages)]
        start += len(record_passages)
        lines.append(json.dumps({"score": record_scores[0]} if single else {"scores": record_scores}) + "\n")
    write_atomically(output_path, "".join(lines))
    return len(records), len(passages)


def write_atomically(path, text):
    """`text` into `path` through a temporary file next to it, renamed in place: an interrupted
    write never leaves a half-written output."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)


def rerank_command(model_dir, input_path, output_path, *args, **kwargs):
    """`embedtrain rerank`: rerank_file (same arguments) and a line saying what was written."""
    lines, pairs = rerank_file(model_dir, input_path, output_path, *args, **kwargs)
    print(f"wrote the scores of {pairs} pairs ({lines} lines) to {output_path}", flush=True)
