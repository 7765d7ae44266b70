"""The registry of model kinds (model.kind): each name's ModelKind (embedtrain/kinds/base.py), the one
place the kinds are named. Adding a kind: its module beside these, and one line in KINDS."""

import json
from pathlib import Path

from embedtrain.errors import ConfigError
from embedtrain.kinds.dense import DenseKind
from embedtrain.kinds.multi_vector import MultiVectorKind
from embedtrain.kinds.reranker import RerankerKind
from embedtrain.kinds.sparse import SparseKind

KINDS = {
    "embedding": DenseKind(),
    "reranker": RerankerKind(),
    "multi_vector": MultiVectorKind(),
    "sparse": SparseKind(),
}
DEFAULT = "embedding"  # the kind of a config or checkpoint that names none (written before model.kind)


def kind_named(name):
    """The ModelKind of a model.kind value; None (or a config tree without the key) is DEFAULT."""
    name = DEFAULT if name is None else name
    if name not in KINDS:
        raise ConfigError(f"model.kind={name}: not a model kind; choose from {', '.join(KINDS)}")
    return KINDS[name]


def kind_of(config):
    """The ModelKind of a Config (its model.kind)."""
    return kind_named(config.model.kind)


def recorded_kind(base_model):
    """(ModelKind, its recorded settings or None) of a checkpoint's base_model folder: the kind whose
    base_model_file is there (read as JSON), else DEFAULT with None."""
    for kind in KINDS.values():
        if kind.base_model_file and (Path(base_model) / kind.base_model_file).is_file():
            return kind, json.loads((Path(base_model) / kind.base_model_file).read_text())
    return KINDS[DEFAULT], None


def kind_files():
    """The names of every kind's base_model file (an export copies none of them into the model folder)."""
    return {kind.base_model_file for kind in KINDS.values() if kind.base_model_file}
