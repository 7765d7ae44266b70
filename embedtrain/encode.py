"""Embeddings from an exported folder: `embedtrain encode MODEL --input FILE --output FILE`.

The loading and text-encoding (prompts, token-budget batches, over-long documents, Matryoshka dims)
live in embedtrain.inference; this module reads the input file and writes the embeddings.
"""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedtrain.errors import EncodeError, UsageError
from embedtrain.inference import BiEncoder, MultiVectorEncoder, SparseEncoder
from embedtrain.inference.batching import encode_texts, prompt_text
from embedtrain.inference.loading import model_kind
from embedtrain.inference.sparse_index import mean_nonzeros, write_sparse_vectors
from embedtrain.inference.token_index import write_token_embeddings


def read_texts(path):
    """One text per line of a .txt file, or the "text" field of each line of a .jsonl file. A file
    without a line is refused: 0 embeddings is never what was asked for (and an empty output would
    look like a finished job)."""
    path = Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise EncodeError(f"--input {path}: expected a .txt or .jsonl file")
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        raise EncodeError(
            f"--input {path}: the file is empty, there is nothing to embed; give one text per line "
            '(.txt) or one {"text": ...} object per line (.jsonl)'
        )
    if path.suffix == ".txt":
        return lines
    texts = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise EncodeError(f"{path} line {number}: not JSON ({err})") from err
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise EncodeError(f'{path} line {number}: expected an object with a string field "text"')
        texts.append(record["text"])
    return texts


def write_embeddings(path, embeddings, texts):
    path = Path(path)
    if path.suffix == ".npy":
        np.save(path, embeddings)
    elif path.suffix == ".parquet":
        pq.write_table(pa.table({"text": texts, "embedding": list(embeddings)}), path)
    else:
        raise EncodeError(f"--output {path}: expected a .npy or .parquet file")


def check_prompt(prompt, model_dir):
    """--prompt names one of the model's prompts (query or document) or is not given: one check for
    every kind of model encode writes."""
    if prompt is not None and prompt not in ("query", "document"):
        raise EncodeError(f"--prompt {prompt}: expected query or document (the prompts of {model_dir})")


def encode_file(
    model_dir,
    input_path,
    output_path,
    prompt=None,
    dim=None,
    batch_size=32,
    max_tokens=None,
    max_length=None,
    long_documents="truncate",
    chunk_overlap=0,
    device=None,
    dtype=None,
):
    """Embed every text of `input_path` (prompt: "query", "document" or None) into `output_path`."""
    texts = read_texts(input_path)  # before the model loads: a bad file fails in a second
    model = BiEncoder.from_pretrained(model_dir, device=device, dtype=dtype)
    check_prompt(prompt, model_dir)
    max_length = max_length or model.max_seq_length
    limit = model.module.backbone.config.max_position_embeddings
    if max_length > limit:
        raise EncodeError(f"--max-length {max_length} exceeds {model_dir}'s max_position_embeddings={limit}")
    embeddings = encode_texts(
        model.module,
        model.tokenizer,
        texts,
        batch_size,
        max_length,
        dim,
        progress=True,
        max_tokens=max_tokens,
        long_documents=long_documents,
        chunk_overlap=chunk_overlap,
        prompt=prompt_text(model.prompt_policy, prompt),
    )
    write_embeddings(output_path, embeddings, texts)
    return embeddings


# model kind: (its API class, the writer of its .npz, what the file holds)
NPZ_KINDS = {
    "multi_vector": (MultiVectorEncoder, write_token_embeddings, "token embeddings"),
    "sparse": (SparseEncoder, write_sparse_vectors, "CSR term weights"),
}


def encode_npz_file(
    model_dir,
    input_path,
    output_path,
    prompt=None,
    dim=None,
    batch_size=32,
    max_tokens=None,
    max_length=None,
    long_documents="truncate",
    chunk_overlap=0,
    device=None,
    dtype=None,
):
    """Every text of `input_path` into `output_path` with a model of NPZ_KINDS: a multi-vector
    (ColBERT) model's token embeddings (.npz: embeddings, offsets; inference/token_index) or a sparse
    (SPLADE) model's term weights (.npz in CSR form: indices, values, offsets; inference/sparse_index).
    prompt "query" encodes queries (expanded, query length), otherwise documents (skiplist dropped).
    Returns what the model's `encode` returns: per-text arrays, or SparseVectors."""
    kind = model_kind(model_dir)
    model_class, write, holds = NPZ_KINDS[kind]
    name = kind.replace("_", "-")
    if Path(output_path).suffix != ".npz":
        raise EncodeError(f"--output {output_path}: a {name} model writes {holds} to a .npz file")
    given = {"--dim": dim, "--max-tokens": max_tokens, "--chunk-overlap": chunk_overlap}
    given["--long-documents"] = None if long_documents == "truncate" else long_documents
    refused = [option for option, value in given.items() if value]
    if refused:
        raise EncodeError(f"{', '.join(refused)}: not available for a {name} model ({model_dir})")
    texts = read_texts(input_path)
    check_prompt(prompt, model_dir)
    model = model_class.from_pretrained(model_dir, device=device, dtype=dtype)
    encoded = model.encode(texts, prompt=prompt, batch_size=batch_size, max_length=max_length, progress=True)
    write(output_path, encoded)
    return encoded


def encode_command(model_dir, input_path, output_path, *args, **kwargs):
    """`embedtrain encode` without --teacher-cache: a folder as `output_path` is refused before the
    model loads; then encode_file (same arguments) and a line saying what was written; a
    multi-vector model's token embeddings and a sparse model's CSR term weights go to .npz
    (encode_npz_file)."""
    if Path(output_path).is_dir():
        raise UsageError(f"--output {output_path} is a folder; expected a .npy or .parquet file.")
    kind = model_kind(model_dir)
    if kind == "multi_vector":
        arrays = encode_npz_file(model_dir, input_path, output_path, *args, **kwargs)
        tokens = sum(len(a) for a in arrays)
        print(f"wrote {tokens} token embeddings of {len(arrays)} texts to {output_path}", flush=True)
        return
    if kind == "sparse":
        vectors = encode_npz_file(model_dir, input_path, output_path, *args, **kwargs)
        print(
            f"wrote sparse vectors of {vectors.count} texts ({mean_nonzeros(vectors):.1f} non-zero terms per text "
            f"on average) to {output_path}",
            flush=True,
        )
        return
    embeddings = encode_file(model_dir, input_path, output_path, *args, **kwargs)
    print(f"wrote {embeddings.shape[0]} x {embeddings.shape[1]} embeddings to {output_path}", flush=True)
