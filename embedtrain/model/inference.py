"""Inference with an exported folder: loading an embedding model or a reranker onto a device and
dtype, embedding texts and scoring (query, passage) pairs. Behind `BiEncoder.from_pretrained(...)
.encode(...)`, `Reranker.from_pretrained(...).score(...)`, `embedtrain encode` / `rerank` / `eval` /
`mine`, the teacher cache and in-training evaluation's retrieval.

Loads with embedtrain's own classes (no trust_remote_code) onto the chosen device and dtype, applies
the model's prompts (embedtrain.prompts), batches sequences sorted by token count under a sequence
and token budget, truncates or chunks over-long documents, and returns float32 vectors on the host
in input order, L2-normalised, optionally truncated to the first K dims (Matryoshka). Reranker pairs
are rendered with the template the model was trained with (recorded in the export), truncated to
its pair max length, sorted by token count and batched; scores are the model's logits (divided by
its temperature), float32, in input order.
"""

import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from embedtrain.errors import EncodeError
from embedtrain.model.distill import TeacherSpaceEncoder
from embedtrain.model.encoder import BiEncoder, check_bidirectional, load_backbone, load_tokenizer
from embedtrain.model.pooling import truncate
from embedtrain.model.reranker import Reranker, is_reranker_folder, saved_head
from embedtrain.prompts import MODEL_METADATA, model_policy

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
