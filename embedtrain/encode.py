"""Embeddings from an exported folder: `embedtrain encode MODEL --input FILE --output FILE`.

Loads with embedtrain's own classes (no trust_remote_code), applies the folder's prompts
(config_sentence_transformers.json), batches texts sorted by length (less padding) and returns
vectors in input order, L2-normalised, optionally truncated to the first K dims (Matryoshka).
"""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from embedtrain.data.collate import load_tokenizer
from embedtrain.model import BiEncoder, load_backbone
from embedtrain.model.pooling import truncate


class EncodeError(ValueError):
    """Bad encode input; the message names the file and line."""


def load_encoder(model_dir, dtype=torch.float32):
    """(encoder in eval mode, tokenizer, prompts, max_seq_length) of an exported folder."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    encoder = BiEncoder(load_backbone(model_dir, dtype=dtype), pooling=config.get("pooling", "avg")).eval()
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    tokenizer = load_tokenizer(model_dir, tokenizer_config.get("padding_side", "right"))
    st_config = model_dir / "config_sentence_transformers.json"
    prompts = json.loads(st_config.read_text()).get("prompts", {}) if st_config.is_file() else {}
    bert_config = model_dir / "sentence_bert_config.json"
    max_length = json.loads(bert_config.read_text())["max_seq_length"] if bert_config.is_file() else 512
    return encoder, tokenizer, prompts, max_length


@torch.no_grad()
def encode_texts(encoder, tokenizer, texts, batch_size=32, max_length=512, dim=None, progress=False):
    """(N, D) float32 numpy array in the order of `texts`."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
    out = [None] * len(texts)
    device = next(encoder.parameters()).device
    for start in tqdm(range(0, len(order), batch_size), desc="encode", unit="batch", disable=not progress):
        chunk = order[start: start + batch_size]
        batch = tokenizer([texts[i] for i in chunk], max_length=max_length, truncation=True, padding=True,
                          return_tensors="pt")
        vectors = truncate(encoder(batch["input_ids"].to(device), batch["attention_mask"].to(device)), dim)
        for i, vector in zip(chunk, vectors.float().cpu().numpy()):
            out[i] = vector
    return np.stack(out) if out else np.zeros((0, dim or 0), np.float32)


def read_texts(path):
    """One text per line of a .txt file, or the "text" field of each line of a .jsonl file."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".txt":
        return lines
    if path.suffix != ".jsonl":
        raise EncodeError(f"--input {path}: expected a .txt or .jsonl file")
    texts = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise EncodeError(f"{path} line {number}: not JSON ({err})") from err
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise EncodeError(f"{path} line {number}: expected an object with a string field \"text\"")
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


def encode_file(model_dir, input_path, output_path, prompt=None, dim=None, batch_size=32):
    encoder, tokenizer, prompts, max_length = load_encoder(model_dir)
    texts = read_texts(input_path)
    if prompt is not None:
        if prompt not in prompts:
            raise EncodeError(f"--prompt {prompt}: {model_dir} defines prompts {', '.join(prompts) or 'none'}")
        texts_in = [prompts[prompt] + t for t in texts]
    else:
        texts_in = texts
    embeddings = encode_texts(encoder, tokenizer, texts_in, batch_size, max_length, dim, progress=True)
    write_embeddings(output_path, embeddings, texts)
    return embeddings
