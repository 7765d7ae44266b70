"""PairScorer, the reranker (cross-encoder) module: a token batch of (query, passage) pairs -> one
relevance logit per pair.

The bidirectional backbone reads each pair as one sequence (`data.pair_template`), the states are
pooled (`model.pooling`), a linear head hidden -> 1 without bias scores them, and the logits are
divided by the temperature (`loss.temperature`, 1.0 in NVIDIA's recipe). Trained with cross-entropy
over each query's group (embedtrain.losses.group_cross_entropy). The exported form is
LlamaBidirectionalForSequenceClassification (model/bidirectional.py): backbone -> `model`,
head -> `score`. embedtrain.inference.Reranker holds it with its tokenizer and pair template for
users.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from embedtrain.errors import ModelError
from embedtrain.model.encoder import Encoder

KIND_FILE = "reranker.json"  # in a run's base_model folder: what the export needs to write a reranker
RERANKER_ARCHITECTURE = "LlamaBidirectionalForSequenceClassification"
HEAD_KEY = "score.weight"


class PairScorer(Encoder):
    """forward(inputs) -> logits_S (fp32), one per sequence; `inputs` as Encoder's (an
    EncoderInputs, padded or packed, or ids with their padding mask)."""

    def __init__(self, backbone, pooling="avg", temperature=1.0, head=None):
        super().__init__(backbone, pooling, normalize=False)
        self.temperature = temperature
        self.head = head if head is not None else nn.Linear(backbone.config.hidden_size, 1, bias=False)

    def forward(self, input_ids, attention_mask=None):
        pooled_BD = super().forward(input_ids, attention_mask)
        return (self.head(pooled_BD.to(self.head.weight.dtype)).squeeze(-1) / self.temperature).float()


def is_reranker_folder(path):
    """Whether a model folder holds a reranker (an exported LlamaBidirectionalForSequenceClassification)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    return RERANKER_ARCHITECTURE in (json.loads(config.read_text()).get("architectures") or [])


def saved_head(path, hidden_size, dtype):
    """The head (Linear hidden -> 1) stored in a reranker folder's safetensors; its absence or a wrong
    shape is an error naming the folder."""
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            if HEAD_KEY in f.keys():
                weight = f.get_tensor(HEAD_KEY)
                break
    else:
        raise ModelError(f"{path}: a reranker folder without {HEAD_KEY} in its safetensors")
    if tuple(weight.shape) != (1, hidden_size):
        raise ModelError(f"{path}: {HEAD_KEY} has shape {tuple(weight.shape)}, expected (1, {hidden_size})")
    head = nn.Linear(hidden_size, 1, bias=False, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(weight.to(dtype))
    return head


def new_head(path, hidden_size, dtype, seed, initializer_range=0.02):
    """The head of a reranker trained from `path`: its saved head when `path` is a reranker, else
    N(0, initializer_range) (transformers' Llama init) from a generator seeded with `seed`, so that
    every rank starts from the same head."""
    if is_reranker_folder(path):
        return saved_head(path, hidden_size, dtype)
    head = nn.Linear(hidden_size, 1, bias=False, dtype=dtype)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        head.weight.copy_(torch.randn((1, hidden_size), generator=generator) * initializer_range)
    return head
