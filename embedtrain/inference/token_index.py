"""Token embeddings of many texts held flat, written to `.npz`, and searched by exact MaxSim.

A collection of N texts' token embeddings is two arrays: `embeddings` (total tokens x D, float32) and
`offsets` (N + 1, int64): text i owns rows offsets[i]:offsets[i+1] (the format `embedtrain encode`
writes for a multi-vector model; numpy.savez, uncompressed, so it can be memory-mapped).

`maxsim_search` ranks a corpus for each query by exact MaxSim (embedtrain.losses.maxsim_scores),
block by block so that the similarities held at once stay under a budget whatever the corpus size.
"""

import numpy as np
import torch

from embedtrain.losses import MAXSIM_BLOCK_ELEMENTS, maxsim_scores


def flatten(arrays, dim=None):
    """(embeddings (total, D) float32, offsets (N + 1,) int64) of a list of (n_i, D) arrays."""
    arrays = [np.asarray(a, dtype=np.float32) for a in arrays]
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([a.shape[0] for a in arrays])
    width = arrays[0].shape[1] if arrays else (dim or 0)
    embeddings = np.concatenate(arrays) if arrays else np.zeros((0, width), np.float32)
    return embeddings, offsets


def unflatten(embeddings, offsets):
    """The per-text arrays (views) of flat embeddings and their offsets."""
    return [embeddings[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]


def write_token_embeddings(path, arrays):
    """Write a list of per-text (n_i, D) token embedding arrays as `.npz`: embeddings, offsets."""
    embeddings, offsets = flatten(arrays)
    with open(path, "wb") as f:  # a file object: numpy appends no ".npz" to the name
        np.savez(f, embeddings=embeddings, offsets=offsets)


def read_token_embeddings(path):
    """(embeddings, offsets) of a `.npz` written by write_token_embeddings, checked."""
    with np.load(path) as data:
        if "embeddings" not in data or "offsets" not in data:
            raise ValueError(f"{path}: not a token-embedding file (needs the arrays 'embeddings' and 'offsets')")
        embeddings, offsets = data["embeddings"], data["offsets"]
    if offsets.ndim != 1 or offsets[0] != 0 or offsets[-1] != len(embeddings) or np.any(np.diff(offsets) < 0):
        raise ValueError(f"{path}: offsets do not cut the {len(embeddings)} embedding rows into texts")
    return embeddings, offsets


def padded_block(embeddings, offsets, start, stop, device="cpu"):
    """Texts start..stop of a flat collection as (B, L, D) fp32 and their (B, L) bool mask."""
    lengths = np.diff(offsets[start : stop + 1])
    width = max(1, int(lengths.max(initial=0)))
    block = np.zeros((stop - start, width, embeddings.shape[1]), np.float32)
    mask = np.zeros((stop - start, width), bool)
    for row, (first, length) in enumerate(zip(offsets[start:stop], lengths)):
        block[row, :length] = embeddings[first : first + length]
        mask[row, :length] = True
    return torch.from_numpy(block).to(device), torch.from_numpy(mask).to(device)


def corpus_blocks(offsets, queries_tokens, max_elements):
    """(start, stop) runs of the corpus in order, each holding at most `max_elements`
    query-token x document-token similarities (one document at least) for `queries_tokens`
    query tokens (count x padded length of the longest query)."""
    lengths = np.diff(offsets)
    blocks, start, longest = [], 0, 0
    for index, length in enumerate(lengths):
        longest_with = max(longest, int(length), 1)
        if index > start and queries_tokens * (index - start + 1) * longest_with > max_elements:
            blocks.append((start, index))
            start, longest_with = index, max(int(length), 1)
        longest = longest_with
    if start < len(lengths):
        blocks.append((start, len(lengths)))
    return blocks


@torch.no_grad()
def maxsim_search(
    queries, corpus_embeddings, corpus_offsets, k, query_chunk=64, max_elements=MAXSIM_BLOCK_ELEMENTS, device="cpu"
):
    """Exact MaxSim top-k of a corpus for each query.

    queries: a list of (t_i, D) arrays; the corpus: flat embeddings and offsets (write_token_embeddings'
    format). For each chunk of `query_chunk` queries the corpus is scored in blocks of documents
    holding at most `max_elements` similarities, and a running top-k is merged per block. Returns
    (scores (Q, k) float32, rows (Q, k) int64), best first; k is cut to the corpus size."""
    num_docs = len(corpus_offsets) - 1
    k = min(k, num_docs)
    all_scores = np.full((len(queries), k), -np.inf, np.float32)
    all_rows = np.full((len(queries), k), -1, np.int64)
    for q_start in range(0, len(queries), query_chunk):
        chunk = queries[q_start : q_start + query_chunk]
        q_embeddings, q_offsets = flatten(chunk, corpus_embeddings.shape[1])
        q_QTD, q_mask_QT = padded_block(q_embeddings, q_offsets, 0, len(chunk), device)
        best_scores = torch.full((len(chunk), 0), -torch.inf, device=device)
        best_rows = torch.zeros((len(chunk), 0), dtype=torch.long, device=device)
        for start, stop in corpus_blocks(corpus_offsets, q_QTD.shape[0] * q_QTD.shape[1], max_elements):
            d_PLD, d_mask_PL = padded_block(corpus_embeddings, corpus_offsets, start, stop, device)
            scores_QP = maxsim_scores(q_QTD, q_mask_QT, d_PLD, d_mask_PL, max_elements)
            rows_QP = torch.arange(start, stop, device=device).expand_as(scores_QP)
            merged_scores, merged_rows = torch.cat([best_scores, scores_QP], 1), torch.cat([best_rows, rows_QP], 1)
            top = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
            best_scores, best_rows = top.values, merged_rows.gather(1, top.indices)
        all_scores[q_start : q_start + len(chunk), : best_scores.shape[1]] = best_scores.cpu().numpy()
        all_rows[q_start : q_start + len(chunk), : best_rows.shape[1]] = best_rows.cpu().numpy()
    return all_scores, all_rows
