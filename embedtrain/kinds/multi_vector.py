"""The multi-vector model (model.kind=multi_vector, ColBERT late interaction): one projected, unit
token vector per token (model/multi_vector.MultiVectorEncoder), trained with InfoNCE over MaxSim
scores over the configured negative pool (train/multi_vector_loss.py), queries optionally expanded
to a fixed length and documents scored without their skiplist tokens (data/collate.py
MultiVectorCollator). Its in-training evaluation ranks each held-out corpus by exact MaxSim; its
export is a sentence-transformers MultiVectorEncoder folder, whose settings base_model/multi_vector.json
records (embedtrain/export.py, "multi_vector" format). model.path may be such an export: training
continues from its projection instead of a new one."""

import math
import types
from pathlib import Path

import torch
from safetensors.torch import load_file

from embedtrain.data.collate import MultiVectorCollator
from embedtrain.errors import ConfigError
from embedtrain.kinds.base import ModelKind
from embedtrain.model.multi_vector import (
    PUNCTUATION,
    MultiVectorEncoder,
    MultiVectorSettings,
    expansion_token_id,
    skiplist_ids,
)
from embedtrain.train.evaluation import load_sources, maxsim_in_training
from embedtrain.train.multi_vector_loss import multi_vector_backward

KIND_FILE = "multi_vector.json"  # in <run>/base_model: the MultiVectorSettings the export writes
PROJECTION_FILE = "1_Dense/model.safetensors"  # an exported multi-vector model's projection (export_multi_vector.py)


def multi_vector_settings(config):
    """The MultiVectorSettings of a run: model.multi_vector (resolved by config.resolve_multi_vector)
    with the lengths of data.query_max_length / data.passage_max_length (the expansion length, with
    query expansion, is the query length)."""
    section = config.model.multi_vector
    expansion = section["query_expansion"]
    return MultiVectorSettings(
        dim=section["dim"],
        query_length=config.data.query_max_length,
        document_length=config.data.passage_max_length,
        query_expansion=None
        if expansion is None
        else {"length": config.data.query_max_length, "attend": expansion["attend"]},
        skiplist_words=list(PUNCTUATION) if section["skiplist"] == "punctuation" else [],
    )


def saved_projection(path):
    """The token projection (dim, hidden) of a multi-vector model folder (an export: its
    sentence-transformers Dense module), to continue training from it; None for any other folder
    (a new projection is drawn)."""
    file = Path(path) / PROJECTION_FILE
    return load_file(str(file))["linear.weight"] if file.is_file() else None


def seed_projection(linear, seed):
    """nn.Linear's own initialisation, U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform with a = sqrt(5)),
    drawn from a generator seeded with `seed` alone: every rank (and a plain reference) starts from
    the same projection, whatever their RNG streams."""
    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(linear.in_features)
    with torch.no_grad():
        linear.weight.copy_((torch.rand(linear.weight.shape, generator=generator) * 2 - 1) * bound)


class MultiVectorKind(ModelKind):
    name = "multi_vector"
    base_model_file = KIND_FILE
    export_format = "multi_vector"
    model_keys = ("model.multi_vector.dim",)
    length_keys = ("data.query_max_length", "data.passage_max_length")

    def build_module(self, config, backbone, dtype, teacher_dim=None):
        module = MultiVectorEncoder(backbone, config.model.multi_vector["dim"])
        saved = saved_projection(config.model.path)
        if saved is None:
            seed_projection(module.head.linear, config.train.seed)
        elif tuple(saved.shape) != tuple(module.head.linear.weight.shape):
            raise ConfigError(
                f"model.multi_vector.dim={module.width}: model.path {config.model.path} is a multi-vector model whose "
                f"projection is {tuple(saved.shape)} (dim x hidden); set model.multi_vector.dim={saved.shape[0]}"
            )
        else:
            with torch.no_grad():
                module.head.linear.weight.copy_(saved)
        module.head.to(dtype)
        return module

    def make_collator(self, tokenizer, config, dataset_info, one_row, teacher=None):
        settings = multi_vector_settings(config)
        expansion = None
        if settings.query_expansion is not None:
            expansion = {**settings.query_expansion, "token_id": expansion_token_id(tokenizer)}
        skip = skiplist_ids(tokenizer, settings.skiplist_words) if settings.skiplist_words else ()
        chunk = config.train.grad_cache_chunk_size
        return MultiVectorCollator(tokenizer, config.data, dataset_info, chunk, one_row, expansion, skip)

    def backward(self, engine, batch, config, divisor, group=None, boundary=None):
        grad_cache = self.grad_cache(config, batch)
        return multi_vector_backward(engine, batch, config.loss, divisor, grad_cache, group, boundary)

    def budget_chunks(self, config):
        return config.loss.negatives != "group"  # local/global: every query's loss needs the whole pool

    def eval_sources(self, config, collator):
        return load_sources(config.eval, collator.policy)

    def evaluate(self, engine, tokenizer, sources, config):
        settings = multi_vector_settings(config)
        expansion_id = expansion_token_id(tokenizer) if settings.query_expansion is not None else None
        # the fields of inference.MultiVectorEncoder that its encode_tokens reads, around the engine
        encoder = types.SimpleNamespace(
            module=engine, tokenizer=tokenizer, settings=settings, expansion_id=expansion_id
        )
        return maxsim_in_training(encoder, sources, config.eval.batch_size)

    def base_model_files(self, config):
        return {KIND_FILE: {"kind": self.name, **multi_vector_settings(config).to_dict()}}
