"""Padding-free (packed) batches: several sequences concatenated in one row, each token labelled
with the number (1, 2, ...) of its sequence in that row and 0 for padding.

That label tensor is passed as the attention mask: LlamaBidirectionalModel lets a token attend
only to tokens of its own sequence and restarts position ids at 0 for each one (both in
model/bidirectional.py, which ships in exports and so holds that logic itself), and BiEncoder
pools each sequence on its own. A mask holding only 0 and 1 is an ordinary padding mask, so the
same entry points serve both. Sequences must be contiguous runs, numbered in increasing order
within a row.
"""

import torch


def is_packed(attention_mask_BL):
    """True when a row holds more than one sequence (labels above 1)."""
    return bool((attention_mask_BL > 1).any())


def pack(sequences, pad_id=0, pad_to_multiple_of=1):
    """Token-id lists -> (input_ids_1T, segments_1T): all sequences in one row, in order."""
    ids = [token for sequence in sequences for token in sequence]
    labels = [number for number, sequence in enumerate(sequences, 1) for _ in sequence]
    total = -(-len(ids) // pad_to_multiple_of) * pad_to_multiple_of
    ids += [pad_id] * (total - len(ids))
    labels += [0] * (total - len(labels))
    return torch.tensor([ids]), torch.tensor([labels])


def unpack(hidden_BLD, segments_BL):
    """Packed token states -> (hidden_SMD, mask_SM): one right-padded row per sequence, in order
    (row by row, then by label), M the longest sequence. Differentiable in hidden_BLD."""
    rows, cols = (segments_BL > 0).nonzero(as_tuple=True)
    labels = segments_BL[rows, cols]
    key = rows * (int(segments_BL.max()) + 1) + labels
    _, sequence = torch.unique_consecutive(key, return_inverse=True)
    lengths = torch.bincount(sequence)
    offset = torch.arange(sequence.shape[0], device=hidden_BLD.device) - (lengths.cumsum(0) - lengths)[sequence]
    out = hidden_BLD.new_zeros(lengths.shape[0], int(lengths.max()), hidden_BLD.shape[-1])
    out = out.index_put((sequence, offset), hidden_BLD[rows, cols])
    mask = torch.zeros(out.shape[:2], dtype=torch.long, device=hidden_BLD.device)
    mask[sequence, offset] = 1
    return out, mask
