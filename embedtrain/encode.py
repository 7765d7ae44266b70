"""Embeddings from an exported folder: `embedtrain encode MODEL --input FILE --output FILE`, and the
loading / text-encoding helpers behind `BiEncoder.from_pretrained(...).encode(...)`, eval and mine.

Loads with embedtrain's own classes (no trust_remote_code) onto the chosen device and dtype, applies
the model's prompts (embedtrain.prompts), batches sequences sorted by token count under a sequence
and token budget, truncates or chunks over-long documents, and returns float32 vectors on the host
in input order, L2-normalised, optionally truncated to the first K dims (Matryoshka).
"""

import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from embedtrain.data.collate import load_tokenizer
from embedtrain.model import BiEncoder, check_bidirectional, load_backbone
from embedtrain.model.distill import TeacherSpaceEncoder
from embedtrain.model.pooling import truncate
from embedtrain.prompts import MODEL_METADATA, model_policy


class EncodeError(ValueError):
    """Bad encode input; the message names the file and line (or the option)."""


DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device=None):
    """A torch.device for "auto"/None (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".
    "auto" and "cuda" pick the GPU of this process's LOCAL_RANK, so that each rank of a
    torchrun/deepspeed launch uses its own GPU."""
    if isinstance(device, torch.device):
        return device
    name = "auto" if device is None else str(device)
    if not DEVICE_PATTERN.fullmatch(name):
        raise EncodeError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EncodeError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__})")
    if name == "cuda":
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return torch.device(name)


def resolve_dtype(dtype=None, device="cpu"):
    """A torch dtype for "auto"/None (bfloat16 on CUDA, float32 on CPU) or a dtype name."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise EncodeError(f"--dtype {dtype}: expected auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_encoder(model_dir, dtype=None, device=None):
    """(encoder in eval mode on `device` in `dtype`, tokenizer, prompt policy, max_seq_length) of an
    exported folder. The encoder also carries them (`tokenizer`, `prompt_policy`, `max_seq_length`)
    so that `encoder.encode(...)` works on its own. A reranker folder is refused: its backbone would
    load and embed, silently, without its head."""
    from embedtrain.rerank import require_kind  # embedtrain.rerank imports this module

    model_dir = Path(model_dir)
    require_kind(model_dir, "embedding", "model")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    config = json.loads((model_dir / "config.json").read_text())
    backbone, pooling = load_backbone(model_dir, dtype=dtype), config.get("pooling", "avg")
    projection = kept_projection(model_dir)
    if projection is None:
        encoder = BiEncoder(backbone, pooling=pooling).eval()
    else:
        encoder = TeacherSpaceEncoder(backbone, pooling=pooling, projection=projection).eval()
    encoder.to(device)
    check_bidirectional(encoder.backbone)  # a causal path would encode silently wrong vectors
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    tokenizer = load_tokenizer(model_dir, tokenizer_config.get("padding_side", "right"))
    bert_config = model_dir / "sentence_bert_config.json"
    max_length = json.loads(bert_config.read_text())["max_seq_length"] if bert_config.is_file() else 512
    policy = model_policy(model_dir)
    encoder.tokenizer, encoder.prompt_policy, encoder.max_seq_length = tokenizer, policy, max_length
    encoder.name_or_path = str(model_dir)
    return encoder, tokenizer, policy, max_length


def kept_projection(model_dir):
    """A distilled student's projection kept at export (`export --keep-projection`: embedtrain.json
    "projection" and its sentence-transformers Dense folder) as an fp32 Linear, else None."""
    metadata_file = Path(model_dir) / MODEL_METADATA
    entry = json.loads(metadata_file.read_text()).get("projection") if metadata_file.is_file() else None
    if entry is None:
        return None
    weights_file = Path(model_dir) / entry["path"] / "model.safetensors"
    if not weights_file.is_file():
        raise EncodeError(f"{model_dir}: {MODEL_METADATA} names a projection, but {weights_file} is missing")
    tensors = load_file(str(weights_file))
    projection = torch.nn.Linear(entry["in_features"], entry["out_features"], bias=True)
    projection.load_state_dict({"weight": tensors["linear.weight"], "bias": tensors["linear.bias"]})
    return projection


def prompt_text(policy, prompt):
    """The text put in front of every input: "query"/"document" name the model's prompts, None is
    no prompt, any other string is used literally."""
    if prompt is None:
        return ""
    if prompt in ("query", "document"):
        return policy.named(prompt)
    return prompt


def output_dim(encoder, dim=None):
    """Width of the vectors encode_texts returns: the hidden size, or `dim` (checked)."""
    hidden = encoder.width
    if dim is not None and not 0 < dim <= hidden:
        raise EncodeError(f"--dim {dim} is outside 1..{hidden} (the model's embedding width)")
    return dim or hidden


LONG_DOCUMENT_MODES = ("truncate", "chunk")
BLOCK = 8192  # texts tokenized at a time: bounds the memory of token lists on large corpora


@torch.no_grad()
def encode_texts(
    encoder,
    tokenizer,
    texts,
    batch_size=32,
    max_length=512,
    dim=None,
    progress=False,
    max_tokens=None,
    long_documents="truncate",
    chunk_overlap=0,
    prompt="",
    normalize=True,
):
    """(N, D) float32 numpy array on the host in the order of `texts`, each text prefixed with `prompt`.

    Sequences are sorted by token count (longest first) and batched up to `batch_size` sequences
    and, with `max_tokens`, up to that many padded tokens per batch (a longer sequence goes alone),
    so short texts run in large batches and long ones in small. Texts longer than `max_length`
    tokens are truncated, or with long_documents="chunk" split into windows of `max_length` tokens
    (each with the special tokens and the prompt, consecutive windows sharing `chunk_overlap`
    tokens) whose normalised embeddings are averaged and re-normalised. With normalize=False the
    pooled vectors are returned as they are (windows averaged, dims cut, no re-normalisation).
    """
    if long_documents not in LONG_DOCUMENT_MODES:
        raise ValueError(f"long_documents={long_documents!r}: expected one of {', '.join(LONG_DOCUMENT_MODES)}")
    device = next(encoder.parameters()).device
    with normalizing(encoder, normalize):
        out = []
        bar = tqdm(total=len(texts), desc="encode", unit="text", disable=not progress)
        for start in range(0, len(texts), BLOCK):  # token lists for one block at a time
            block = texts[start : start + BLOCK]
            sequences, owner = [], []
            for index, ids in enumerate(
                tokenize_all(tokenizer, prompt, block, max_length, long_documents, chunk_overlap)
            ):
                sequences += ids
                owner += [index] * len(ids)
            vectors = [None] * len(sequences)
            for batch_indices in token_budget_batches([len(ids) for ids in sequences], batch_size, max_tokens):
                batch = tokenizer.pad({"input_ids": [sequences[i] for i in batch_indices]}, return_tensors="pt")
                embeddings = encoder(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu()
                for i, vector in zip(batch_indices, embeddings):
                    vectors[i] = vector
                bar.update(len({owner[i] for i in batch_indices}))
            # a text of several windows: the mean of their unit vectors, back to unit length
            summed = torch.zeros(len(block), vectors[0].shape[-1]).index_add_(
                0, torch.tensor(owner), torch.stack(vectors)
            )
            if not encoder.normalize:  # raw vectors: the mean of the windows, not their sum
                summed /= torch.bincount(torch.tensor(owner), minlength=len(block)).clamp(min=1)[:, None]
            out.append(truncate(summed, dim, normalize=encoder.normalize).numpy())
        bar.close()
        return np.concatenate(out) if out else np.zeros((0, output_dim(encoder, dim)), np.float32)


@contextmanager
def normalizing(encoder, normalize):
    """The encoder with `normalize` set for one call, then as it was."""
    was_normalizing, encoder.normalize = encoder.normalize, normalize
    try:
        yield encoder
    finally:
        encoder.normalize = was_normalizing


def tokenize_all(tokenizer, prompt, texts, max_length, long_documents="truncate", chunk_overlap=0):
    """Per text, its token-id lists: [tokenizer(prompt + text)] when it fits in max_length (all in
    one fast call), else `split_long`'s."""
    full = tokenizer([prompt + text for text in texts])["input_ids"]
    return [
        [ids]
        if len(ids) <= max_length
        else split_long(tokenizer, prompt, text, ids, max_length, long_documents, chunk_overlap)
        for ids, text in zip(full, texts)
    ]


def split_long(tokenizer, prompt, text, full, max_length, long_documents="truncate", chunk_overlap=0):
    """Token-id lists for a text whose tokens `full` exceed max_length: one, exactly as
    tokenizer(prompt + text, truncation=True, max_length=max_length) gives; or, in "chunk" mode,
    one per window."""
    if long_documents == "truncate":
        return [tokenizer(prompt + text, truncation=True, max_length=max_length)["input_ids"]]
    content = tokenizer(prompt + text, add_special_tokens=False)["input_ids"]
    start = next(k for k in range(len(full) - len(content) + 1) if full[k : k + len(content)] == content)
    prefix, suffix = full[:start], full[start + len(content) :]
    head = tokenizer(prompt.rstrip(), add_special_tokens=False)["input_ids"] if prompt.strip() else []
    if content[: len(head)] != head:
        head = []  # the prompt merged with the text's first token: it stays in the first window only
    body = content[len(head) :]
    window = max_length - len(prefix) - len(suffix) - len(head)
    if window <= chunk_overlap:
        raise ValueError(
            f"max_length={max_length} leaves {window} tokens per window after special tokens and "
            f"prompt, not more than chunk_overlap={chunk_overlap}"
        )
    starts = range(0, max(1, len(body) - chunk_overlap), window - chunk_overlap)
    return [prefix + head + body[i : i + window] + suffix for i in starts]


def token_budget_batches(lengths, batch_size, max_tokens=None):
    """Index lists, longest sequences first: at most `batch_size` sequences and, with
    `max_tokens`, at most that many padded tokens (count x longest) per batch."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches, current = [], []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) == batch_size or (max_tokens and (len(current) + 1) * longest > max_tokens)):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


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
    encoder, tokenizer, policy, model_max_length = load_encoder(model_dir, dtype=dtype, device=device)
    texts = read_texts(input_path)
    if prompt is not None and prompt not in ("query", "document"):
        raise EncodeError(f"--prompt {prompt}: expected query or document (the prompts of {model_dir})")
    max_length = max_length or model_max_length
    limit = encoder.backbone.config.max_position_embeddings
    if max_length > limit:
        raise EncodeError(f"--max-length {max_length} exceeds {model_dir}'s max_position_embeddings={limit}")
    embeddings = encode_texts(
        encoder,
        tokenizer,
        texts,
        batch_size,
        max_length,
        dim,
        progress=True,
        max_tokens=max_tokens,
        long_documents=long_documents,
        chunk_overlap=chunk_overlap,
        prompt=prompt_text(policy, prompt),
    )
    write_embeddings(output_path, embeddings, texts)
    return embeddings
