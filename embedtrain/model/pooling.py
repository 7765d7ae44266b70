"""Pooling: token states (B, L, D) + padding mask (B, L) -> one vector per sequence (B, D), in fp32.

Every mode reads the mask, never the padding side, so left- and right-padded batches pool the same.
"""

import torch.nn.functional as F

# the pooling functions live in the modeling file that exports ship (self-contained)
from embedtrain.model.bidirectional import (  # noqa: F401 - re-exported
    POOLING_MODES,
    first_token_index,
    last_token_index,
    pool,
    position_weights,
)


def truncate(embeddings_BD, dim=None, normalize=True):
    """Matryoshka truncation: keep the first `dim` dimensions, then L2-normalise again."""
    if dim is not None:
        if not 0 < dim <= embeddings_BD.shape[-1]:
            raise ValueError(f"dim {dim} is outside 1..{embeddings_BD.shape[-1]}")
        embeddings_BD = embeddings_BD[..., :dim]
    return F.normalize(embeddings_BD, dim=-1) if normalize else embeddings_BD
