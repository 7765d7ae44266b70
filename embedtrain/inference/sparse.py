"""`embedtrain.SparseEncoder`: a sparse (SPLADE) model ready for `encode` (CSR SparseVectors, one
row of term weights per text) and `score` (dot products of queries and documents).

Loads the folder embedtrain/export_sparse.py writes, or any sentence-transformers SparseEncoder
folder of the same layout (a fill-mask Transformer -> SpladePooling max with relu) on a supported
backbone: the lengths are read from the sentence-transformers files, so that embedtrain tokenizes,
weighs and scores as sentence-transformers does. Inference-free models (the Router layout: the
query route a SparseStaticEmbedding, the document route that Transformer -> SpladePooling) weigh
queries by their table, tokenized as that module does: no special tokens, cut at its tokenizer's
model_max_length.
"""

import json
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from embedtrain.errors import ModelError
from embedtrain.inference.api import QueryDocumentEncoder
from embedtrain.inference.batching import BLOCK, prompt_text, token_budget_batches
from embedtrain.inference.loading import folder_tokenizer, require_kind, resolve_device, resolve_dtype
from embedtrain.inference.sparse_index import SparseVectors, build_index, concatenate, dot_scores, from_dense, search
from embedtrain.model.encoder import check_bidirectional, load_backbone
from embedtrain.model.sparse import SparseModel, SparseSettings, StaticTermWeights, load_lm_head
from embedtrain.prompts import model_policy

LAYOUT = ("Transformer", "SpladePooling")  # the module types loaded, by class name
QUERY_ROUTE = ("SparseStaticEmbedding",)  # an inference-free model's query route (Router layout)
UNBOUNDED = 10**9  # a query tokenizer without model_max_length: nothing is cut, as in transformers


def class_names(types):
    return tuple(name.rsplit(".", 1)[-1] for name in types)


def sparse_layout(model_dir):
    """(document folder, SpladePooling folder, query-table folder or None) of a sparse folder: the
    plain layout (modules.json: Transformer -> SpladePooling, the fill-mask model at the top) or the
    Router layout of inference-free queries (router_config.json: "query" a SparseStaticEmbedding,
    "document" Transformer -> SpladePooling, each in its folder). Anything else is an error naming
    the file."""
    model_dir = Path(model_dir)
    modules = json.loads((model_dir / "modules.json").read_text())
    types = class_names(entry["type"] for entry in modules)
    if types == LAYOUT:
        return model_dir, model_dir / modules[1]["path"], None
    if types == ("Router",):
        router_file = model_dir / modules[0]["path"] / "router_config.json"
        router = json.loads(router_file.read_text())
        query, document = router["structure"].get("query", []), router["structure"].get("document", [])
        kinds = {name: kind for name, kind in zip(router["types"], class_names(router["types"].values()))}
        if tuple(kinds[n] for n in query) == QUERY_ROUTE and tuple(kinds[n] for n in document) == LAYOUT:
            root = router_file.parent
            return root / document[0], root / document[1], root / query[0]
        raise ModelError(
            f"{router_file}: embedtrain loads a Router whose query route is {' -> '.join(QUERY_ROUTE)} and whose "
            f"document route is {' -> '.join(LAYOUT)}"
        )
    raise ModelError(
        f"{model_dir / 'modules.json'}: modules {', '.join(types)}; embedtrain loads sparse models of the "
        f"layout {' -> '.join(LAYOUT)} (or a Router with an inference-free query route)"
    )


def read_settings(model_dir, tokenizer):
    """SparseSettings from a folder's sentence-transformers files; a layout or option embedtrain does
    not reproduce is an error naming the file."""
    document_dir, pooling_dir, query_dir = sparse_layout(model_dir)
    pooling_file = pooling_dir / "config.json"
    pooling = json.loads(pooling_file.read_text()) if pooling_file.is_file() else {}
    if pooling.get("pooling_strategy", "max") != "max" or pooling.get("activation_function", "relu") != "relu":
        raise ModelError(f"{pooling_file}: embedtrain pools sparse models by max of log(1 + relu(logit)) only")
    transformer = json.loads((document_dir / "sentence_bert_config.json").read_text())
    if transformer.get("transformer_task", "fill-mask") != "fill-mask":
        raise ModelError(
            f"{document_dir / 'sentence_bert_config.json'}: a sparse model's Transformer is a fill-mask one"
        )
    default_length = transformer.get("max_seq_length") or min(tokenizer.model_max_length, 8192)
    document_length = transformer.get("document_length") or default_length
    if query_dir is None:
        return SparseSettings(transformer.get("query_length") or default_length, document_length)
    query_tokenizer = json.loads((query_dir / "tokenizer_config.json").read_text())
    query_length = int(query_tokenizer.get("model_max_length") or UNBOUNDED)
    return SparseSettings(min(query_length, UNBOUNDED), document_length, inference_free_queries=True)


def query_table(query_dir):
    """The StaticTermWeights of a SparseStaticEmbedding folder (its `weight`, float32)."""
    return StaticTermWeights(0, weight=load_file(str(Path(query_dir) / "model.safetensors"))["weight"])


def sparse_parts(model_dir, dtype=None, device=None):
    """The keyword arguments of SparseEncoder for a sparse folder: module (a SparseModel with the
    folder's LM head, and its query table when the queries are inference-free, eval mode, on
    `device` in `dtype`; the table stays float32), tokenizer, prompt_policy, settings and name_or_path."""
    model_dir = Path(model_dir)
    require_kind(model_dir, "sparse", "model")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    document_dir, _, query_dir = sparse_layout(model_dir)
    tokenizer = folder_tokenizer(document_dir)
    settings = read_settings(model_dir, tokenizer)
    backbone = load_backbone(document_dir, dtype=dtype)
    table = None if query_dir is None else query_table(query_dir)
    module = SparseModel(backbone, load_lm_head(document_dir, backbone, dtype), table)
    module.eval().to(device)
    check_bidirectional(module.backbone)  # a causal path would encode silently wrong vectors
    return {
        "module": module,
        "tokenizer": tokenizer,
        "prompt_policy": model_policy(model_dir),
        "settings": settings,
        "name_or_path": str(model_dir),
    }


@torch.no_grad()
def encode_sparse(encoder, texts, prompt="", is_query=False, batch_size=32, max_length=None, progress=False):
    """SparseVectors of `texts` in input order: each text gets `prompt` in front, is cut to the query
    or document length (`max_length` overrides it) and weighed by the module; only its non-zero
    terms are kept (moved off the device per batch)."""
    module, tokenizer, settings = encoder.module, encoder.tokenizer, encoder.settings
    length = max_length or (settings.query_length if is_query else settings.document_length)
    tokenize, forward = tokenizer, module
    if is_query and module.query_weights is not None:  # inference-free: the table, no special tokens
        tokenize, forward = partial(tokenizer, add_special_tokens=False), module.encode_queries
    device = next(module.parameters()).device
    rows = [None] * len(texts)
    bar = tqdm(total=len(texts), desc="encode", unit="text", disable=not progress)
    for start in range(0, len(texts), BLOCK):
        block = [prompt + text for text in texts[start : start + BLOCK]]
        sequences = tokenize(block, truncation=True, max_length=length)["input_ids"]
        for indices in token_budget_batches([len(s) for s in sequences], batch_size):
            padded = tokenizer.pad({"input_ids": [sequences[i] for i in indices]}, return_tensors="pt")
            weights = forward(padded["input_ids"].to(device), padded["attention_mask"].to(device))
            batch = from_dense(weights)
            for row, index in enumerate(indices):
                terms, values = batch.row(row)
                rows[start + index] = SparseVectors(terms, values, np.array([0, len(terms)], np.int64))
            bar.update(len(indices))
    bar.close()
    return concatenate(rows)


class SparseEncoder(QueryDocumentEncoder):
    """A sparse (SPLADE) model ready for `encode` and `score`: `module` (a SparseModel in eval mode),
    `tokenizer`, `prompt_policy`, `settings` (SparseSettings) and `name_or_path`."""

    def __init__(self, module, tokenizer, prompt_policy, settings, name_or_path=None):
        self.module = module
        self.tokenizer = tokenizer
        self.prompt_policy = prompt_policy
        self.settings = settings
        self.name_or_path = name_or_path

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None):
        """An exported sparse folder ready for `encode`, in eval mode; device and dtype as
        BiEncoder.from_pretrained's. A folder of another kind is refused with a message naming it."""
        return cls(**sparse_parts(path, dtype=dtype, device=device))

    def encode(self, texts, prompt=None, is_query=None, batch_size=32, max_length=None, progress=False):
        """Term weights of `texts` as CSR SparseVectors (indices int64, values float32, offsets int64;
        text i owns entries offsets[i]:offsets[i+1]). prompt: "query" / "document" (the model's
        prompts), another string put in front literally, or None. is_query: cut to the query length
        (else the document length); default: prompt == "query"."""
        is_query = prompt == "query" if is_query is None else is_query
        texts = [texts] if isinstance(texts, str) else list(texts)
        return encode_sparse(
            self, texts, prompt_text(self.prompt_policy, prompt), is_query, batch_size, max_length, progress
        )

    def score(self, queries, documents, batch_size=32):
        """(Q, P) float32 dot products of `queries` (texts, encoded as queries) with `documents` (texts)."""
        index = build_index(self.encode_document(list(documents), batch_size=batch_size), self.width)
        return dot_scores(index, self.encode_query(list(queries), batch_size=batch_size))

    def search(self, queries, index, k=10, batch_size=32):
        """Exact top-k (scores, rows) of query texts in a sparse_index.build_index index."""
        return search(index, self.encode_query(list(queries), batch_size=batch_size), k)

    def __repr__(self):
        return f"SparseEncoder({self.name_or_path!r}, {self.width} terms on {self.device})"
