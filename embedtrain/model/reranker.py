"""Reranker (cross-encoder): a token batch of (query, passage) pairs -> one relevance logit per pair.

The bidirectional backbone reads each pair as one sequence (`data.pair_template`), the states are
pooled (`model.pooling`), a linear head hidden -> 1 without bias scores them, and the logits are
divided by the temperature (`loss.temperature`, 1.0 in NVIDIA's recipe). Trained with cross-entropy
over each query's group (embedtrain.losses.group_cross_entropy). The exported form is
LlamaBidirectionalForSequenceClassification (model/bidirectional.py): backbone -> `model`,
head -> `score`.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from embedtrain.errors import ModelError
from embedtrain.model.encoder import BiEncoder

KIND_FILE = "reranker.json"  # in a run's base_model folder: what the export needs to write a reranker
RERANKER_ARCHITECTURE = "LlamaBidirectionalForSequenceClassification"
HEAD_KEY = "score.weight"


class Reranker(BiEncoder):
    """forward(inputs) -> logits_S (fp32), one per sequence; `inputs` as BiEncoder's (an
    EncoderInputs, padded or packed, or ids with their padding mask)."""

    def __init__(self, backbone, pooling="avg", temperature=1.0, head=None):
        super().__init__(backbone, pooling, normalize=False)
        self.temperature = temperature
        self.head = head if head is not None else nn.Linear(backbone.config.hidden_size, 1, bias=False)

    def forward(self, input_ids, attention_mask=None):
        pooled_BD = super().forward(input_ids, attention_mask)
        return (self.head(pooled_BD.to(self.head.weight.dtype)).squeeze(-1) / self.temperature).float()

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None):
        """An exported reranker (`embedtrain export` of a model.kind=reranker run) ready for `score`,
        in eval mode; device and dtype as BiEncoder.from_pretrained's."""
        from embedtrain.model.inference import load_reranker  # embedtrain.model.inference imports this module

        return load_reranker(path, dtype=dtype, device=device)

    def score(self, query, passages, batch_size=32, max_length=None):
        """Relevance scores (float32 numpy, one per passage, in order) of `passages` for `query`:
        each pair rendered with the template the model was trained with."""
        from embedtrain.model.inference import score_pairs

        single = isinstance(passages, str)
        passages = [passages] if single else list(passages)
        scores = score_pairs(self, [query] * len(passages), passages, batch_size, max_length)
        return scores[0] if single else scores

    def rank(self, query, passages, top_k=None, batch_size=32):
        """[(passage index, score)] of `passages` for `query`, best first (the first `top_k`)."""
        scores = self.score(query, list(passages), batch_size)
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        return [(i, float(scores[i])) for i in order[:top_k]]

    def encode(self, *args, **kwargs):
        raise ValueError(
            "this model is a reranker (cross-encoder): it scores pairs with .score / .rank, it does not encode"
        )


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
