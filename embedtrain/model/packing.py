"""Padding-free (packed) batches: several sequences concatenated in one row, each token labelled
with the number (1, 2, ...) of its sequence in that row and 0 for padding.

That label tensor is passed as the attention mask: LlamaBidirectionalModel lets a token attend
only to tokens of its own sequence and restarts position ids at 0 for each one (both in
model/bidirectional.py, which ships in exports and so holds that logic itself), and BiEncoder
pools each sequence on its own. A mask holding only 0 and 1 is an ordinary padding mask, so the
same entry points serve both. Sequences must be contiguous runs, numbered in increasing order
within a row.

Training packs every sequence of a micro-batch, queries and passages alike, into rows of at most
`capacity` tokens (`pack_rows`, first-fit decreasing) and hands the encoder, made on the CPU before
anything moves to the device, the positions of each sequence's tokens (`sequence_index`), so
that neither the model nor the pooling needs to look at the mask's values on the device.
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


def pack_rows(sequences, capacity, pad_id=0, pad_to_multiple_of=1):
    """Token-id lists -> a padding-free batch of rows of at most `capacity` tokens (a longer
    sequence gets a row of its own), filled first-fit in decreasing length order.

    Returns a dict: input_ids_RT, segments_RT (sequence labels 1, 2, ... per row, 0 for padding),
    sequence_index_SM (flat positions r * T + t of sequence s's tokens, in the input order, right
    padded with R * T: one past the last token) and sequence_mask_SM (1 on real positions).
    """
    order = sorted(range(len(sequences)), key=lambda s: len(sequences[s]), reverse=True)
    rows, room = [], []  # rows: lists of sequence numbers
    for s in order:
        length = len(sequences[s])
        row = next((r for r, free in enumerate(room) if free >= length), None)
        if row is None:
            rows.append([])
            room.append(max(capacity, length))
            row = len(rows) - 1
        rows[row].append(s)
        room[row] -= length
    longest = max((sum(len(sequences[s]) for s in row) for row in rows), default=1)
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    segments = torch.zeros((len(rows), width), dtype=torch.long)
    longest_sequence = max((len(seq) for seq in sequences), default=1)
    index = torch.full((len(sequences), longest_sequence), len(rows) * width, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest_sequence), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for label, s in enumerate(row, 1):
            length = len(sequences[s])
            ids[r, start : start + length] = torch.tensor(sequences[s], dtype=torch.long)
            segments[r, start : start + length] = label
            index[s, :length] = torch.arange(r * width + start, r * width + start + length)
            mask[s, :length] = 1
            start += length
    return {"input_ids": ids, "segments": segments, "sequence_index": index, "sequence_mask": mask}


def gather_sequences(hidden_RTD, sequence_index_SM, sequence_mask_SM):
    """Packed token states -> (hidden_SMD, mask_SM), one right-padded row per sequence in the order
    `pack_rows` was given them. An index gather: no value of the mask is read on the host."""
    flat = hidden_RTD.reshape(-1, hidden_RTD.shape[-1])
    flat = torch.cat([flat, flat.new_zeros(1, flat.shape[-1])])  # position R * T: padding
    return flat[sequence_index_SM], sequence_mask_SM
