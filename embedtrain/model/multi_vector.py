"""Multi-vector (ColBERT late-interaction) encoder: every token's state of the bidirectional backbone
goes through a linear projection to a small width (no bias) and is L2-normalised, one vector per
token. Relevance is MaxSim (embedtrain.losses.maxsim_scores): the sum over query tokens of the best
cosine with any document token (Khattab and Zaharia, ColBERT, arXiv 2004.12832).

Which tokens are scored is decided by masks, never by the layout:
- documents: their real tokens, optionally without punctuation (`skiplist_ids`, `document_mask`);
- queries, with expansion: exactly `length` tokens, the query's own followed (on the tokenizer's
  padding side) by expansion tokens that are scored but, with attend=False (classic ColBERT), not
  attended to by the other tokens (`expanded_query_batch`).

Both rules are those of sentence-transformers 6.3's MultiVectorEncoder (and PyLate), so that an
export (embedtrain/export_multi_vector.py) scores as embedtrain does: its Transformer module swaps a
fixed-length query's padding for the tokenizer's mask token, else its eos token
(sentence_transformers/base/modules/transformer.py, Transformer.preprocess), and its
MultiVectorMask drops from documents the token ids that the words of its skiplist (ColBERT:
Python's string.punctuation) resolve to, ignoring words that are no single vocabulary token
(multi_vector_encoder/modules/multi_vector_mask.py, resolve_with_tokenizer).

The module knows nothing of prompts, files or distributed code.
"""

import string
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from embedtrain.model import attention
from embedtrain.model.packing import EncoderInputs, padded_inputs

DEFAULT_DIM = 128  # ColBERT's and sentence-transformers' default projection width
PUNCTUATION = tuple(string.punctuation)  # ColBERT's (and PyLate's) document skiplist words


@dataclass(frozen=True)
class MultiVectorSettings:
    """What a multi-vector model is besides its weights, recorded with it (the future config section
    model.multi_vector, an export's embedtrain.json and sentence-transformers files):
    dim: the projection width; query_length / document_length: tokens kept per query / document
    (prompt and special tokens included); query_expansion: None, or {"length": N, "attend": bool}
    (queries padded to exactly N tokens with expansion tokens, expanded_query_batch; N is then the
    query length); skiplist_words: words whose tokens are not scored in documents (PUNCTUATION:
    ColBERT's; empty: none)."""

    dim: int = DEFAULT_DIM
    query_length: int = 32
    document_length: int = 512
    query_expansion: dict | None = None
    skiplist_words: list = field(default_factory=list)

    def __post_init__(self):
        expansion = self.query_expansion
        if expansion is not None:
            unknown = set(expansion) - {"length", "attend"}
            if unknown or not isinstance(expansion.get("length"), int) or expansion["length"] < 1:
                raise ValueError(
                    f"query_expansion {expansion!r}: expected {{'length': a positive int, 'attend': bool}}"
                )
            object.__setattr__(
                self, "query_expansion", {"length": expansion["length"], "attend": bool(expansion.get("attend", False))}
            )
            object.__setattr__(self, "query_length", expansion["length"])
        object.__setattr__(self, "skiplist_words", list(self.skiplist_words or []))

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, data):
        return cls(
            **{
                key: data[key]
                for key in ("dim", "query_length", "document_length", "query_expansion", "skiplist_words")
                if key in data
            }
        )


class TokenEmbeddings(NamedTuple):
    """A batch's token embeddings, one row per sequence in input order (padded or packed input alike):
    embeddings (S, L, D) fp32 unit vectors, mask (S, L) bool (the tokens that are scored; the rest of
    a row is padding or expansion positions not scored), input_ids (S, L) (for `document_mask`)."""

    embeddings: torch.Tensor
    mask: torch.Tensor
    input_ids: torch.Tensor

    def split(self, count):
        """(the first `count` sequences, the rest): queries and passages of one encoder call."""
        first = TokenEmbeddings(*(t[:count] for t in self))
        rest = TokenEmbeddings(*(t[count:] for t in self))
        return first, rest


class MultiVectorHead(nn.Module):
    """Token states (..., hidden) -> (..., dim) fp32 unit vectors: Linear without bias, then L2
    normalisation in fp32 (the projection runs in the states' dtype, as sentence-transformers' Dense)."""

    def __init__(self, hidden_size, dim=DEFAULT_DIM):
        super().__init__()
        self.linear = nn.Linear(hidden_size, dim, bias=False)

    def forward(self, hidden):
        projected = self.linear(hidden.to(self.linear.weight.dtype))
        return F.normalize(projected.float(), dim=-1)


class MultiVectorEncoder(nn.Module):
    """Shared-weight late-interaction encoder for queries and passages.

    forward(inputs, attention_mask=None, score_mask=None) -> TokenEmbeddings. `inputs` is an
    EncoderInputs (model/packing.py: padded, or packed) or a (B, L) id tensor with its 0/1 padding
    mask. `score_mask` (B, L), padded only: the tokens to score when they differ from the attended
    ones (queries expanded with attend=False: expanded_query_batch). A packed batch is re-padded per
    sequence (row s holds sequence s's tokens from column 0) without reading the device: its width
    is the batch's `max_length`, a host integer.
    """

    def __init__(self, backbone, dim=DEFAULT_DIM):
        super().__init__()
        self.backbone = backbone
        self.head = MultiVectorHead(backbone.config.hidden_size, dim)
        self.packed_kernel = None
        attention.install(backbone)

    @property
    def width(self):
        """The width of each token vector."""
        return self.head.linear.out_features

    def forward(self, input_ids, attention_mask=None, score_mask=None):
        inputs = input_ids if isinstance(input_ids, EncoderInputs) else padded_inputs(input_ids, attention_mask)
        if inputs.packed:
            if score_mask is not None:
                raise ValueError("score_mask applies to padded batches; a packed batch scores its real tokens")
            hidden_RWD = attention.packed_states(self.backbone, inputs, self.packed_kernel)
            return repad_packed(self.head(hidden_RWD), inputs)
        mask_BL = inputs.attention_mask
        if mask_BL is None:
            mask_BL = torch.ones_like(inputs.input_ids)
        hidden_BLD = self.backbone(input_ids=inputs.input_ids, attention_mask=mask_BL, packed=False).last_hidden_state
        scored_BL = (mask_BL if score_mask is None else score_mask).bool()
        return TokenEmbeddings(self.head(hidden_BLD), scored_BL, inputs.input_ids)


def repad_packed(flat_RWD, inputs):
    """A packed batch's per-token vectors (R, W, D) as TokenEmbeddings (S, max_length, D) in input
    order: a token goes to row `token_sequence`, column `position_ids` (its place in its sequence);
    padding tokens (sequence S) are dropped. Differentiable (index_put)."""
    flat_TD = flat_RWD.reshape(-1, flat_RWD.shape[-1])
    rows_T, columns_T = inputs.token_sequence, inputs.position_ids.reshape(-1)
    count, width = inputs.num_sequences, inputs.max_length
    embeddings = flat_TD.new_zeros(count + 1, width, flat_TD.shape[-1]).index_put((rows_T, columns_T), flat_TD)
    mask = torch.zeros(count + 1, width, dtype=torch.bool, device=flat_TD.device)
    mask = mask.index_put((rows_T, columns_T), torch.ones_like(rows_T, dtype=torch.bool))
    ids = inputs.input_ids.new_zeros(count + 1, width).index_put((rows_T, columns_T), inputs.input_ids.reshape(-1))
    return TokenEmbeddings(embeddings[:count], mask[:count], ids[:count])


def skiplist_ids(tokenizer, words=PUNCTUATION):
    """The token ids a document skiplist of `words` removes, resolved as sentence-transformers'
    MultiVectorMask resolves them: each word as one vocabulary token (convert_tokens_to_ids); a word
    that is no single token (None, or the unknown token's id while the word is not that token) is
    left out. Sorted, without duplicates."""
    unknown_id, unknown = getattr(tokenizer, "unk_token_id", None), getattr(tokenizer, "unk_token", None)
    ids = set()
    for word in words:
        token_id = tokenizer.convert_tokens_to_ids(word)
        if token_id is None or (unknown_id is not None and token_id == unknown_id and word != unknown):
            continue
        ids.add(int(token_id))
    return sorted(ids)


def document_mask(input_ids_SL, mask_SL, skip_ids=None):
    """The scored document tokens: `mask_SL` (real tokens) less those whose id is in `skip_ids`
    (skiplist_ids; None or empty: none dropped)."""
    if not skip_ids:
        return mask_SL
    skip = torch.as_tensor(list(skip_ids), dtype=input_ids_SL.dtype, device=input_ids_SL.device)
    return mask_SL & ~torch.isin(input_ids_SL, skip)


def expansion_token_id(tokenizer, token=None):
    """The id of the query expansion token: `token` when given, else the tokenizer's mask token, else
    its eos token (sentence-transformers' and PyLate's chain: [MASK] for encoders, eos for decoders)."""
    if token is not None:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
            raise ValueError(f"query expansion token {token!r} is not a token of this tokenizer's vocabulary")
        return int(token_id)
    for candidate in (tokenizer.mask_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise ValueError("query expansion: the tokenizer has neither a mask nor an eos token; name the token explicitly")


def expanded_query_batch(sequences, length, expansion_id, attend=False, padding_side="right"):
    """Queries expanded to exactly `length` tokens (ColBERT's query augmentation, sentence-transformers'
    query_expansion strategy "fixed"): each token list is cut to `length`, and the positions left on
    the `padding_side` get `expansion_id`. Returns (input_ids_BL, attention_mask_BL, score_mask_BL):
    every position is scored; the expansion positions are attended to only with `attend` (else the
    other tokens do not see them, while their own states still read the query)."""
    ids = torch.full((len(sequences), length), expansion_id, dtype=torch.long)
    attended = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        kept = list(sequence[:length])
        place = slice(0, len(kept)) if padding_side == "right" else slice(length - len(kept), length)
        ids[row, place] = torch.tensor(kept, dtype=torch.long)
        attended[row, place] = 1
    if attend:
        attended.fill_(1)
    return ids, attended, torch.ones((len(sequences), length), dtype=torch.bool)
