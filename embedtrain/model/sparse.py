"""Sparse lexical (SPLADE) encoder: the bidirectional backbone's token states go through the
checkpoint's language-model head (kept from the checkpoint, or tied to the input embeddings) to
vocabulary logits; a term's weight is log(1 + relu(logit)), max-pooled over the sequence's real
tokens (Formal et al., SPLADE v2, arXiv 2109.10086). One (vocab,) vector per text, mostly zeros;
relevance is the dot product.

Pooling takes the max of the logits first and applies log(1 + relu(.)) after: the function is
monotone non-decreasing, so the value is the same as transforming every token's logits first (what
sentence-transformers' SpladePooling does, sparse_encoder/modules/splade_pooling.py), and so is the
gradient (it reaches the token holding the max in both); only one (B, V) tensor is transformed.

Inference-free queries (sentence-transformers' SparseStaticEmbedding) are a learned per-term weight
table: a query's vector is the table's weight on each vocabulary id present in the query, no
encoder (`StaticTermWeights`). In training such a micro-batch comes as `InferenceFreeInputs` (the
queries' ids and mask beside the passages' EncoderInputs), one forward of the module for both, so
that ZeRO-3 gathers the table like every other weight and the training step does not branch.

The module knows nothing of prompts, files or distributed code; `load_lm_head` reads one tensor of
a checkpoint folder.
"""

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from embedtrain.errors import ModelError
from embedtrain.model import attention
from embedtrain.model.packing import EncoderInputs, padded_inputs

LM_HEAD_KEY = "lm_head.weight"  # SparseModel's head in its state dict (and in a checkpoint and an export)
QUERY_TABLE_KEY = "query_weights.weight"  # SparseModel's inference-free query table in its state dict


@dataclass(frozen=True)
class SparseSettings:
    """What a sparse model is besides its weights, recorded with it (an export's embedtrain.json and
    sentence-transformers files): query_length / document_length: tokens kept per query / document
    (prompt and special tokens included); inference_free_queries: queries are weighted by the
    learned per-term table (StaticTermWeights), not by the encoder."""

    query_length: int = 512
    document_length: int = 512
    inference_free_queries: bool = False

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, data):
        keys = ("query_length", "document_length", "inference_free_queries")
        return cls(**{key: data[key] for key in keys if key in data})


def activate(max_logits):
    """log(1 + relu(x)) in fp32: a term's weight from its (pooled) logit."""
    return torch.log1p(torch.relu(max_logits.float()))


def splade_weights(logits_BLV, mask_BL):
    """Term weights (B, V), fp32: the max over each row's real tokens (mask 1) of log(1 + relu(logit)).
    A row without real tokens weighs every term 0. The max is taken in the logits' dtype (exact)."""
    masked = logits_BLV.masked_fill(~mask_BL.bool()[..., None], float("-inf"))
    return activate(masked.amax(dim=1))


def splade_weights_packed(logits_TV, token_sequence_T, count):
    """Term weights (count, V), fp32, of a packed batch's flattened token logits (T, V): the max per
    sequence (`token_sequence`, EncoderInputs; `count` marks padding tokens, which are dropped), in
    input order. Equal to splade_weights on the same sequences padded. Differentiable (scatter_reduce)."""
    index = token_sequence_T[:, None].expand_as(logits_TV)
    pooled = logits_TV.new_full((count + 1, logits_TV.shape[-1]), float("-inf"))
    pooled = pooled.scatter_reduce(0, index, logits_TV, "amax", include_self=True)
    return activate(pooled[:count])


@dataclass
class InferenceFreeInputs:
    """One encoder call of a model with inference-free queries: the queries as padded token ids
    (Q, L) and their 0/1 mask (tokenized as sentence-transformers' SparseStaticEmbedding does: the
    prompt and the text, no special tokens), then the passages' EncoderInputs (None: queries only).
    The module returns the queries' rows first, as for one EncoderInputs of queries then passages.
    Moved and pinned like EncoderInputs (model/packing.py)."""

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    passages: EncoderInputs | None = None

    def to(self, device, non_blocking=False):
        passages = None if self.passages is None else self.passages.to(device, non_blocking)
        return replace(
            self,
            query_ids=self.query_ids.to(device, non_blocking=non_blocking),
            query_mask=self.query_mask.to(device, non_blocking=non_blocking),
            passages=passages,
        )

    def pin_memory(self):
        passages = None if self.passages is None else self.passages.pin_memory()
        return replace(
            self, query_ids=self.query_ids.pin_memory(), query_mask=self.query_mask.pin_memory(), passages=passages
        )


class SparseModel(nn.Module):
    """Shared-weight SPLADE encoder for queries and passages.

    forward(inputs, attention_mask=None) -> (B, V) fp32 term weights in input order. `inputs` is an
    EncoderInputs (model/packing.py: padded, or packed) or a (B, L) id tensor with its 0/1 padding
    mask. `lm_head`: nn.Linear(hidden, vocab, bias=False), from `load_lm_head` or `tied_lm_head`
    (its weight then is the embeddings' own parameter). The head runs in its weight's dtype; the
    logits of every token exist at once, (tokens, vocab) in that dtype, as in sentence-transformers.
    `query_weights`: a StaticTermWeights for inference-free queries (`encode_queries`, and the query
    rows of an InferenceFreeInputs), else None.
    """

    def __init__(self, backbone, lm_head, query_weights=None):
        super().__init__()
        self.backbone = backbone
        self.lm_head = lm_head
        self.query_weights = query_weights
        self.packed_kernel = None
        attention.install(backbone)

    @property
    def width(self):
        """The vocabulary size: the width of each term-weight vector."""
        return self.lm_head.out_features

    def logits(self, hidden):
        return self.lm_head(hidden.to(self.lm_head.weight.dtype))

    def forward(self, input_ids, attention_mask=None):
        if isinstance(input_ids, InferenceFreeInputs):
            queries_QV = self.encode_queries(input_ids.query_ids, input_ids.query_mask)
            if input_ids.passages is None:
                return queries_QV
            return torch.cat([queries_QV, self(input_ids.passages)])
        inputs = input_ids if isinstance(input_ids, EncoderInputs) else padded_inputs(input_ids, attention_mask)
        if inputs.packed:
            hidden_RWD = attention.packed_states(self.backbone, inputs, self.packed_kernel)
            logits_TV = self.logits(hidden_RWD.reshape(-1, hidden_RWD.shape[-1]))
            return splade_weights_packed(logits_TV, inputs.token_sequence, inputs.num_sequences)
        mask_BL = inputs.attention_mask
        if mask_BL is None:
            mask_BL = torch.ones_like(inputs.input_ids)
        hidden_BLD = self.backbone(input_ids=inputs.input_ids, attention_mask=mask_BL, packed=False).last_hidden_state
        return splade_weights(self.logits(hidden_BLD), mask_BL)

    def encode_queries(self, input_ids_BL, attention_mask_BL=None):
        """Query term weights (B, V) fp32: the inference-free table when there is one, else forward."""
        if self.query_weights is None:
            return self(input_ids_BL, attention_mask_BL)
        return self.query_weights(input_ids_BL, attention_mask_BL)


class StaticTermWeights(nn.Module):
    """Inference-free query encoder: a learned weight per vocabulary term. A query's vector is the
    weight of each term present among its real tokens (mask 1), 0 elsewhere, in fp32: what
    sentence-transformers' SparseStaticEmbedding computes (token presence times weight), so that an
    export's query side scores as here. `weight`: (vocab,) initial values (default ones)."""

    def __init__(self, vocab_size, weight=None):
        super().__init__()
        initial = torch.ones(vocab_size) if weight is None else torch.as_tensor(weight, dtype=torch.float32)
        self.weight = nn.Parameter(initial.clone())

    @property
    def width(self):
        return getattr(self.weight, "ds_shape", self.weight.shape)[0]  # ZeRO-3: partitioned, its full shape

    def forward(self, input_ids_BL, attention_mask_BL=None):
        if attention_mask_BL is None:
            attention_mask_BL = torch.ones_like(input_ids_BL)
        presence = torch.zeros(input_ids_BL.shape[0], self.width, device=input_ids_BL.device)
        presence = presence.scatter_reduce(1, input_ids_BL, attention_mask_BL.float(), "amax", include_self=True)
        return presence * self.weight.float()


def tied_lm_head(backbone):
    """An LM head whose weight is the backbone's input embedding matrix (the same parameter)."""
    weight = backbone.embed_tokens.weight
    vocab, hidden = getattr(weight, "ds_shape", weight.shape)  # ZeRO-3: partitioned, its full shape
    head = nn.Linear(hidden, vocab, bias=False, device="meta")
    head.weight = backbone.embed_tokens.weight
    return head


# where a checkpoint keeps its LM head: causal LMs and exports, vision-language wrappers
# (families.WRAPPERS: mistral3's language model)
LM_HEAD_KEYS = (LM_HEAD_KEY, "language_model.lm_head.weight", "model.language_model.lm_head.weight")


def checkpoint_ties_embeddings(model_path):
    """Whether config.json ties the LM head to the input embeddings (tie_word_embeddings, at the top
    or in a wrapper's text config); transformers' default when absent is False for these families."""
    raw = json.loads((Path(model_path) / "config.json").read_text())
    text = raw.get("text_config") or {}
    return bool(raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))


def read_checkpoint_tensor(model_path, keys):
    """The first of `keys` found in the checkpoint's weight files (*.safetensors, else *.bin), or None."""
    path = Path(model_path)
    files = sorted(path.glob("*.safetensors"))
    if files:
        from safetensors import safe_open

        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                names = set(handle.keys())
                for key in keys:
                    if key in names:
                        return handle.get_tensor(key)
        return None
    for file in sorted(path.glob("*.bin")):
        state = torch.load(file, map_location="cpu", weights_only=True)
        for key in keys:
            if key in state:
                return state[key]
    return None


def load_lm_head(model_path, backbone, dtype=None):
    """The checkpoint's LM head as nn.Linear(hidden, vocab, bias=False) in `dtype` (default: the
    embeddings' dtype), on the embeddings' device. Tied to the backbone's embeddings (tied_lm_head)
    when config.json ties them or the checkpoint holds no head (LM_HEAD_KEYS); an error names the
    file when the head's shape is not the embeddings'."""
    embeddings = backbone.embed_tokens.weight
    if checkpoint_ties_embeddings(model_path):
        return tied_lm_head(backbone)
    weight = read_checkpoint_tensor(model_path, LM_HEAD_KEYS)
    if weight is None:
        return tied_lm_head(backbone)
    if tuple(weight.shape) != tuple(getattr(embeddings, "ds_shape", embeddings.shape)):  # ZeRO-3: full shape
        raise ModelError(
            f"model.path: {model_path}'s lm_head.weight has shape {tuple(weight.shape)}, "
            f"the embeddings {tuple(embeddings.shape)}: a sparse model needs one logit per vocabulary id"
        )
    dtype = dtype or embeddings.dtype
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=embeddings.device, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(weight)
    return head
