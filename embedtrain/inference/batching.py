"""Batched encoding and scoring with an eval-mode module: texts -> float32 embeddings, (query,
passage) pairs -> float32 scores, on the host, in input order.

Applies a prompt in front of every text, batches sequences sorted by token count under a sequence
and token budget, truncates or chunks over-long documents, and returns vectors L2-normalised,
optionally truncated to the first K dims (Matryoshka). Reranker pairs are rendered with the
template the model was trained with, truncated to its pair max length, sorted by token count and
batched; scores are the model's logits (divided by its temperature). Used by the inference objects
(embedtrain.inference.api), the commands (encode, rerank, eval, mine, the teacher cache) and
in-training evaluation's retrieval, which hands it the training module itself.
"""

from contextlib import contextmanager

import numpy as np
import torch
from tqdm import tqdm

from embedtrain.errors import EncodeError
from embedtrain.model.pooling import truncate

LONG_DOCUMENT_MODES = ("truncate", "chunk")
BLOCK = 8192  # texts tokenized at a time: bounds the memory of token lists on large corpora


def prompt_text(policy, prompt):
    """The text put in front of every input: "query"/"document" name the model's prompts (`policy`,
    embedtrain.prompts), None is no prompt, any other string is used literally."""
    if prompt is None:
        return ""
    if prompt in ("query", "document"):
        return policy.named(prompt)
    return prompt


def output_dim(encoder, dim=None):
    """Width of the vectors encode_texts returns: the module's width, or `dim` (checked)."""
    hidden = encoder.width
    if dim is not None and not 0 < dim <= hidden:
        raise EncodeError(f"--dim {dim} is outside 1..{hidden} (the model's embedding width)")
    return dim or hidden


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
    """(N, D) float32 numpy array on the host in the order of `texts`, each text prefixed with `prompt`;
    `encoder` is an Encoder module (model/encoder.py), `tokenizer` its tokenizer.

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


@torch.no_grad()
def score_pairs(reranker, queries, passages, batch_size=32, max_length=None, max_tokens=None, progress=False):
    """Scores of the pairs (queries[i], passages[i]) as a float32 numpy array, in input order.

    `reranker`: an embedtrain.inference.Reranker (its module, tokenizer, pair_template and
    max_length, the default of `max_length`). Pairs are tokenized BLOCK at a time (bounded host
    memory on long inputs) and, within a block, batched longest first under `batch_size` sequences
    and `max_tokens` padded tokens."""
    if len(queries) != len(passages):
        raise ValueError(f"{len(queries)} queries but {len(passages)} passages: one query per passage")
    module, tokenizer = reranker.module, reranker.tokenizer
    device = next(module.parameters()).device
    scores = np.zeros(len(queries), np.float32)
    bar = tqdm(total=len(queries), desc="rerank", unit="pair", disable=not progress)
    for start in range(0, len(queries), BLOCK):
        texts = [
            reranker.pair_template.format(query=q, passage=p)
            for q, p in zip(queries[start : start + BLOCK], passages[start : start + BLOCK])
        ]
        ids = tokenizer(texts, max_length=max_length or reranker.max_length, truncation=True)["input_ids"]
        for batch_indices in token_budget_batches([len(x) for x in ids], batch_size, max_tokens):
            batch = tokenizer.pad({"input_ids": [ids[i] for i in batch_indices]}, return_tensors="pt")
            logits = module(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            scores[[start + i for i in batch_indices]] = logits.float().cpu().numpy()
            bar.update(len(batch_indices))
    bar.close()
    return scores
