"""Pooling: token states (B, L, D) + padding mask (B, L) -> one vector per sequence (B, D), in fp32.

Every mode reads the mask, never the padding side, so left- and right-padded batches pool the same.
"""

import torch
import torch.nn.functional as F

POOLING_MODES = ("avg", "cls", "last", "weighted_avg")


def first_token_index(mask_BL):
    """Index of the first non-padding token of each row (left padding puts it past 0)."""
    return mask_BL.to(torch.int64).argmax(dim=-1)


def last_token_index(mask_BL):
    """Index of the last non-padding token of each row (right padding puts it before L-1)."""
    length = mask_BL.shape[-1]
    return length - 1 - mask_BL.to(torch.int64).flip(-1).argmax(dim=-1)


def position_weights(mask_BL):
    """weighted_avg weights: w_i = p_i / sum_j p_j with p_i = 1..n the position among real tokens.

    Later tokens have seen more of the text in a causal model's pre-training, so they weigh more
    (SGPT's position-weighted mean). Padding gets weight 0; each row sums to 1.
    """
    mask = mask_BL.to(torch.float32)
    positions = mask.cumsum(dim=-1) * mask
    return positions / positions.sum(dim=-1, keepdim=True).clamp(min=1.0)


def pool(hidden_BLD, mask_BL, mode="avg"):
    """Pool token states into sequence vectors, in fp32.

    avg:          mean over non-padding tokens.
    cls:          the first non-padding token.
    last:         the last non-padding token.
    weighted_avg: sum_i w_i h_i with the weights of `position_weights`.
    """
    hidden = hidden_BLD.to(torch.float32)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if mode == "avg":
        mask = mask_BL.to(torch.float32).unsqueeze(-1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    if mode == "cls":
        return hidden[rows, first_token_index(mask_BL)]
    if mode == "last":
        return hidden[rows, last_token_index(mask_BL)]
    if mode == "weighted_avg":
        return (hidden * position_weights(mask_BL).unsqueeze(-1)).sum(dim=1)
    raise ValueError(f"unknown pooling mode {mode!r}; expected one of {', '.join(POOLING_MODES)}")


def truncate(embeddings_BD, dim=None, normalize=True):
    """Matryoshka truncation: keep the first `dim` dimensions, then L2-normalise again."""
    if dim is not None:
        if not 0 < dim <= embeddings_BD.shape[-1]:
            raise ValueError(f"dim {dim} is outside 1..{embeddings_BD.shape[-1]}")
        embeddings_BD = embeddings_BD[..., :dim]
    return F.normalize(embeddings_BD, dim=-1) if normalize else embeddings_BD
