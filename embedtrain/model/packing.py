"""Encoder batches with their layout made explicit: `EncoderInputs`, built by the collator on the
CPU, padded (one sequence per row, a 0/1 mask) or padding-free (packed: several sequences per row).

A packed batch concatenates sequences in rows; each token is labelled with the number (1, 2, ...)
of its sequence in its row and 0 for padding (`attention_mask`), its position restarts at 0 at each
sequence (`position_ids`), and the rows flattened end to end are cut into segments by `cu_seq_lens`
(cumulative lengths over the R x W flattened tokens: every sequence, and each row's trailing
padding as a segment of its own, so that a variable-length kernel computes every position and
leaves no uninitialised output) with `max_length` the longest segment, a host integer. Pooling
reads `token_sequence` (the input-order number of each flattened token's sequence, S for padding),
`sequence_starts` and `sequence_lengths`.

Everything is computed on the host from the token lists, so neither the model nor the kernels read
a tensor value back from the device (embedtrain/model/attention.py chooses the kernel from these
fields; model/encoder.py pools by segment sums). The exported modeling file (model/bidirectional.py)
does not know this type: users of an export pass plain tensors.
"""

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class EncoderInputs:
    """One encoder call's tensors. `packed` says which layout it is; the packed-only fields are
    None in a padded batch. Picklable (DataLoader workers), pinnable (`pin_memory`, which the
    DataLoader's pin thread calls) and moved to the device in one call (`to`)."""

    input_ids: torch.Tensor  # (R, W)
    attention_mask: torch.Tensor  # (R, W): 0/1 padding mask, or packed sequence labels 1, 2, ... (0: padding)
    packed: bool = False
    position_ids: torch.Tensor | None = None  # (R, W), restarting at 0 for each sequence
    cu_seq_lens: torch.Tensor | None = None  # (N + 1,) int32 over the R * W flattened tokens
    max_length: int | None = None  # the longest segment of cu_seq_lens
    token_sequence: torch.Tensor | None = None  # (R * W,) sequence of each token, S for padding
    sequence_starts: torch.Tensor | None = None  # (S,) flat index of each sequence's first token
    sequence_lengths: torch.Tensor | None = None  # (S,)

    def tensors(self):
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def to(self, device, non_blocking=False):
        """The same batch on `device`: one call moves every tensor (asynchronously from pinned memory
        with non_blocking=True)."""
        return replace(self, **{k: v.to(device, non_blocking=non_blocking) for k, v in self.tensors().items()})

    def pin_memory(self):
        return replace(self, **{k: v.pin_memory() for k, v in self.tensors().items()})

    @property
    def num_sequences(self):
        return self.sequence_lengths.shape[0] if self.packed else self.input_ids.shape[0]


def padded_inputs(input_ids, attention_mask):
    """EncoderInputs of a padded batch (one sequence per row, a 0/1 mask)."""
    return EncoderInputs(input_ids=input_ids, attention_mask=attention_mask)


def pack(sequences, pad_id=0, pad_to_multiple_of=1):
    """Token-id lists -> a packed EncoderInputs of ONE row holding them all, in order."""
    return pack_rows(sequences, sum(len(s) for s in sequences), pad_id, pad_to_multiple_of)


def pack_rows(sequences, capacity, pad_id=0, pad_to_multiple_of=1):
    """Token-id lists -> a packed EncoderInputs of rows of at most `capacity` tokens (a longer
    sequence gets a row of its own), filled first-fit in decreasing length order. Sequences keep
    their input order in `token_sequence` / `sequence_starts` (what pooling returns)."""
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
    return layout(sequences, rows, pad_id, pad_to_multiple_of)


def layout(sequences, rows, pad_id=0, multiple=1):
    """The packed EncoderInputs of `sequences` placed in `rows` (lists of sequence numbers, in row order)."""
    longest = max((sum(len(sequences[s]) for s in row) for row in rows), default=1)
    width = max(1, -(-longest // multiple) * multiple)
    num_rows = max(1, len(rows))
    ids = torch.full((num_rows, width), pad_id, dtype=torch.long)
    labels = torch.zeros((num_rows, width), dtype=torch.long)
    positions = torch.zeros((num_rows, width), dtype=torch.long)
    token_sequence = torch.full((num_rows * width,), len(sequences), dtype=torch.long)
    starts = torch.zeros(len(sequences), dtype=torch.long)
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    boundaries, longest_segment = [0], 1
    for r, row in enumerate(rows):
        start = 0
        for label, s in enumerate(row, 1):
            length = len(sequences[s])
            ids[r, start : start + length] = torch.tensor(sequences[s], dtype=torch.long)
            labels[r, start : start + length] = label
            positions[r, start : start + length] = torch.arange(length)
            token_sequence[r * width + start : r * width + start + length] = s
            starts[s] = r * width + start
            start += length
            boundaries.append(r * width + start)
            longest_segment = max(longest_segment, length)
        if start < width:  # the row's padding: a segment of its own
            boundaries.append((r + 1) * width)
            longest_segment = max(longest_segment, width - start)
    return EncoderInputs(
        input_ids=ids,
        attention_mask=labels,
        packed=True,
        position_ids=positions,
        cu_seq_lens=torch.tensor(boundaries, dtype=torch.int32),
        max_length=longest_segment,
        token_sequence=token_sequence,
        sequence_starts=starts,
        sequence_lengths=lengths,
    )


def pool_packed(hidden_RWD, inputs, mode="avg"):
    """Pool a packed batch's token states into one fp32 vector per sequence, in input order, without
    re-padding: segment sums over the flattened tokens (index_add by `token_sequence`) for avg and
    weighted_avg, an index for cls and last. Equal to `pool` on the same sequences padded, to fp32
    summation order."""
    flat_TD = hidden_RWD.reshape(-1, hidden_RWD.shape[-1])
    lengths_S = inputs.sequence_lengths
    if mode == "cls":
        return flat_TD[inputs.sequence_starts].float()
    if mode == "last":
        return flat_TD[inputs.sequence_starts + lengths_S - 1].float()
    num = lengths_S.shape[0]
    if mode == "avg":
        weights_T = 1.0 / lengths_S.clamp(min=1).float()
    elif mode == "weighted_avg":  # w_i = p_i / sum_j p_j, p_i = 1..n (bidirectional.position_weights)
        weights_T = (inputs.position_ids.reshape(-1) + 1).float()
        totals_S = (lengths_S * (lengths_S + 1) // 2).clamp(min=1).float()
        weights_T = weights_T / torch.cat([totals_S, totals_S.new_ones(1)])[inputs.token_sequence]
    else:
        raise ValueError(f"unknown pooling mode {mode!r}; expected one of avg, cls, last, weighted_avg")
    if mode == "avg":
        weights_T = torch.cat([weights_T, weights_T.new_zeros(1)])[inputs.token_sequence]
    summed = flat_TD.new_zeros(num + 1, flat_TD.shape[-1], dtype=torch.float32)
    summed = summed.index_add(0, inputs.token_sequence, flat_TD.float() * weights_T[:, None])
    return summed[:num]
