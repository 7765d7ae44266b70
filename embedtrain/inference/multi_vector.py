"""`embedtrain.MultiVectorEncoder`: a multi-vector (ColBERT) model ready for `encode` (one array of
token embeddings per text) and `score` (MaxSim of queries against documents).

Loads the folder embedtrain/export_multi_vector.py writes, or any sentence-transformers
MultiVectorEncoder folder of the same layout (Transformer -> Dense without bias -> MultiVectorMask
-> Normalize) on a supported backbone: the settings are read from the sentence-transformers files
themselves, so that embedtrain tokenizes, expands, masks and scores as sentence-transformers does.
"""

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from embedtrain.errors import ModelError
from embedtrain.inference.api import QueryDocumentEncoder
from embedtrain.inference.batching import BLOCK, prompt_text, token_budget_batches
from embedtrain.inference.loading import folder_tokenizer, require_kind, resolve_device, resolve_dtype
from embedtrain.inference.token_index import flatten, maxsim_search, padded_block
from embedtrain.losses import maxsim_scores
from embedtrain.model.encoder import check_bidirectional, load_backbone
from embedtrain.model.multi_vector import (
    MultiVectorEncoder as MultiVectorModule,
)
from embedtrain.model.multi_vector import (
    MultiVectorSettings,
    document_mask,
    expanded_query_batch,
    expansion_token_id,
    skiplist_ids,
)
from embedtrain.prompts import model_policy

LAYOUT = ("Transformer", "Dense", "MultiVectorMask", "Normalize")  # the module types loaded, by class name


def read_settings(model_dir, tokenizer):
    """(MultiVectorSettings, the expansion token id or None) from a folder's sentence-transformers
    files; a layout or option embedtrain does not reproduce is an error naming the file."""
    model_dir = Path(model_dir)
    modules = json.loads((model_dir / "modules.json").read_text())
    types = tuple(entry["type"].rsplit(".", 1)[-1] for entry in modules)
    if types != LAYOUT:
        raise ModelError(
            f"{model_dir / 'modules.json'}: modules {', '.join(types)}; embedtrain loads multi-vector models of the "
            f"layout {' -> '.join(LAYOUT)}"
        )
    paths = {t: model_dir / entry["path"] for t, entry in zip(types, modules)}
    dense = json.loads((paths["Dense"] / "config.json").read_text())
    if dense.get("bias") or not dense.get("activation_function", "").endswith("Identity"):
        raise ModelError(f"{paths['Dense'] / 'config.json'}: embedtrain loads a projection without bias or activation")
    transformer = json.loads((model_dir / "sentence_bert_config.json").read_text())
    expansion = transformer.get("query_expansion")
    if expansion is not None and expansion.get("strategy") != "fixed":
        raise ModelError(
            f"{model_dir / 'sentence_bert_config.json'}: query_expansion strategy {expansion.get('strategy')!r}; "
            "embedtrain expands queries to a fixed length only"
        )
    mask_config = json.loads((paths["MultiVectorMask"] / "config.json").read_text())
    if mask_config.get("keep_only_token_ids") or list(mask_config.get("skiplist_tasks", ["document"])) != ["document"]:
        raise ModelError(f"{paths['MultiVectorMask'] / 'config.json'}: embedtrain applies a document skiplist only")
    default_length = transformer.get("max_seq_length") or min(tokenizer.model_max_length, 8192)
    settings = MultiVectorSettings(
        dim=dense["out_features"],
        query_length=transformer.get("query_length") or default_length,
        document_length=transformer.get("document_length") or default_length,
        query_expansion=None
        if expansion is None
        else {"length": expansion["length"], "attend": bool(expansion.get("attend", False))},
        skiplist_words=mask_config.get("skiplist_words") or [],
    )
    expansion_id = None if expansion is None else expansion_token_id(tokenizer, expansion.get("token"))
    return settings, expansion_id


def multi_vector_parts(model_dir, dtype=None, device=None):
    """The keyword arguments of MultiVectorEncoder for a multi-vector folder: module (the model's
    MultiVectorEncoder module with its projection, eval mode, on `device` in `dtype`), tokenizer,
    prompt_policy, settings, expansion_id and name_or_path."""
    model_dir = Path(model_dir)
    require_kind(model_dir, "multi_vector", "model")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    tokenizer = folder_tokenizer(model_dir)
    settings, expansion_id = read_settings(model_dir, tokenizer)
    module = MultiVectorModule(load_backbone(model_dir, dtype=dtype), settings.dim)
    weight = load_file(str(model_dir / "1_Dense" / "model.safetensors"))["linear.weight"]
    module.head.linear.weight.data.copy_(weight)
    module.head.to(dtype)
    module.eval().to(device)
    check_bidirectional(module.backbone)  # a causal path would encode silently wrong vectors
    return {
        "module": module,
        "tokenizer": tokenizer,
        "prompt_policy": model_policy(model_dir),
        "settings": settings,
        "expansion_id": expansion_id,
        "name_or_path": str(model_dir),
    }


@torch.no_grad()
def encode_tokens(encoder, texts, prompt="", is_query=False, batch_size=32, max_length=None, progress=False):
    """Per text, its scored token embeddings as a float32 (n_i, D) numpy array, in input order.

    `encoder`: a MultiVectorEncoder (its module, tokenizer, settings, expansion_id). Each text gets
    `prompt` in front and is cut to the query or document length (`max_length` overrides it; with
    query expansion, queries are exactly the expansion length). Documents lose their skiplist
    tokens; expanded queries keep their expansion positions."""
    module, tokenizer, settings = encoder.module, encoder.tokenizer, encoder.settings
    expand = is_query and settings.query_expansion is not None
    length = (
        settings.query_expansion["length"]
        if expand
        else max_length or (settings.query_length if is_query else settings.document_length)
    )
    skip = None if is_query else skiplist_ids(tokenizer, settings.skiplist_words)
    device = next(module.parameters()).device
    out = [None] * len(texts)
    bar = tqdm(total=len(texts), desc="encode", unit="text", disable=not progress)
    for start in range(0, len(texts), BLOCK):
        block = [prompt + text for text in texts[start : start + BLOCK]]
        sequences = tokenizer(block, truncation=True, max_length=length)["input_ids"]
        for indices in token_budget_batches([len(s) for s in sequences], batch_size):
            batch = [sequences[i] for i in indices]
            score_mask = None
            if expand:
                ids, attention_mask, score_mask = expanded_query_batch(
                    batch, length, encoder.expansion_id, settings.query_expansion["attend"], tokenizer.padding_side
                )
            else:
                padded = tokenizer.pad({"input_ids": batch}, return_tensors="pt")
                ids, attention_mask = padded["input_ids"], padded["attention_mask"]
            tokens = module(
                ids.to(device), attention_mask.to(device), None if score_mask is None else score_mask.to(device)
            )
            mask = tokens.mask if is_query else document_mask(tokens.input_ids, tokens.mask, skip)
            embeddings, mask = tokens.embeddings.float().cpu(), mask.cpu()
            for row, index in enumerate(indices):
                out[start + index] = embeddings[row][mask[row]].numpy()
            bar.update(len(indices))
    bar.close()
    return out


class MultiVectorEncoder(QueryDocumentEncoder):
    """A multi-vector (ColBERT) model ready for `encode` and `score`: `module` (eval mode), `tokenizer`,
    `prompt_policy`, `settings` (MultiVectorSettings), `expansion_id` (the query expansion token)
    and `name_or_path`."""

    def __init__(self, module, tokenizer, prompt_policy, settings, expansion_id=None, name_or_path=None):
        self.module = module
        self.tokenizer = tokenizer
        self.prompt_policy = prompt_policy
        self.settings = settings
        self.expansion_id = expansion_id
        self.name_or_path = name_or_path

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None):
        """An exported multi-vector folder ready for `encode`, in eval mode; device and dtype as
        BiEncoder.from_pretrained's. A folder of another kind is refused with a message naming it."""
        return cls(**multi_vector_parts(path, dtype=dtype, device=device))

    def encode(self, texts, prompt=None, is_query=None, batch_size=32, max_length=None, progress=False):
        """Token embeddings of `texts`: a list of float32 (n_i, D) arrays in input order (one string
        gives one array). prompt: "query" / "document" (the model's prompts), another string put in
        front literally, or None. is_query: encode as queries (length, expansion) or documents
        (length, skiplist); default: prompt == "query"."""
        single = isinstance(texts, str)
        is_query = prompt == "query" if is_query is None else is_query
        arrays = encode_tokens(
            self,
            [texts] if single else list(texts),
            prompt_text(self.prompt_policy, prompt),
            is_query,
            batch_size,
            max_length,
            progress,
        )
        return arrays[0] if single else arrays

    def score(self, queries, documents, batch_size=32):
        """(Q, P) float32 MaxSim of `queries` (texts, encoded as queries) against `documents` (texts)."""
        q = self.encode_query(list(queries), batch_size=batch_size)
        d = self.encode_document(list(documents), batch_size=batch_size)
        return maxsim_matrix(q, d)

    def search(self, queries, corpus_embeddings, corpus_offsets, k=10, batch_size=32):
        """Exact MaxSim top-k (scores, rows) of a corpus in token_index's flat format for query texts."""
        return maxsim_search(
            self.encode_query(list(queries), batch_size=batch_size), corpus_embeddings, corpus_offsets, k
        )

    def __repr__(self):
        return f"MultiVectorEncoder({self.name_or_path!r}, {self.settings.dim} dims per token on {self.device})"


def maxsim_matrix(queries, documents):
    """(Q, P) float32 numpy MaxSim of lists of per-text token embedding arrays."""
    q_flat, q_offsets = flatten(queries)
    d_flat, d_offsets = flatten(documents, q_flat.shape[1] if len(q_flat) else None)
    q, q_mask = padded_block(q_flat, q_offsets, 0, len(queries))
    d, d_mask = padded_block(d_flat, d_offsets, 0, len(documents))
    return maxsim_scores(q, q_mask, d, d_mask).numpy().astype(np.float32)
