"""A sparse (SPLADE) model -> a folder that sentence-transformers' SparseEncoder (>= 6.3) loads, and
that transformers loads as a fill-mask model (AutoModelForMaskedLM, trust_remote_code) or as the
bidirectional backbone (AutoModel, embedtrain's load_backbone).

Written (the module layout sentence-transformers 6.3 saves a SPLADE SparseEncoder in, read from
sentence_transformers/sparse_encoder/model.py, sparse_encoder/modules/splade_pooling.py and
base/modules/transformer.py):
- the weights as LlamaBidirectionalForMaskedLM's (embedtrain/model/bidirectional.py, shipped as the
  modeling file): the backbone under model.*, the LM head as lm_head.weight, or no head when it is
  tied to the input embeddings (config.json tie_word_embeddings, which that class reads);
  config.json with auto_map AutoModelForMaskedLM; the tokenizer with its pad token and side;
- modules.json: Transformer (transformer_task "fill-mask": the vocabulary logits of every token, as
  token_embeddings; query_length / document_length per task) -> SpladePooling (1_SpladePooling:
  max over the tokens of log(1 + relu(logit)), the padding masked);
- config_sentence_transformers.json: model_type SparseEncoder, the prompts, similarity "dot";
- embedtrain.json: the prompt policy, kind "sparse" and the SparseSettings.

With inference-free queries (a learned query table, SparseSettings.inference_free_queries) the
folder is the Router layout sentence-transformers saves an inference-free SPLADE model in (read
from sentence_transformers/base/modules/router.py's save and load, and sparse_encoder/modules/
sparse_static_embedding.py): modules.json holds one Router; router_config.json routes the task
"query" to query_0_SparseStaticEmbedding/ (the table as its `weight`, its tokenizer, whose
model_max_length is the query length: that module tokenizes with truncation to it and without
special tokens) and "document" (the default route) to document_0_Transformer/ (the fill-mask model,
its tokenizer and sentence_bert_config.json, as the plain layout has them at the top) ->
document_1_SpladePooling/. config_sentence_transformers.json, embedtrain.json and the model card
stay at the top, with a copy of the modeling file: transformers (5.25, dynamic_module_utils) looks
for a model's remote code at the top of the folder even when it loads the model from a subfolder,
so without it sentence-transformers cannot load even the folder it saves itself.

Only Llama exports as a fill-mask model: transformers has no masked-LM class for the other families'
stock model types, and the modeling file imports Llama's classes only (it must stay self-contained).

masked_lm_names, masked_lm_config and sparse_export_files are the "sparse" entry of embedtrain/export.py's
EXPORT_FORMATS (`embedtrain export` of a run trained with model.kind=sparse); `export_sparse` writes
the same folder from a module's weights in memory (a SparseModel, its state dict or (name, tensor)
pairs), streamed to the shards.
"""

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from embedtrain.errors import CheckpointError
from embedtrain.export_files import MODELING_FILE, hf_config_dict, save_tokenizer, write_json, write_model
from embedtrain.file_modes import published_folder
from embedtrain.model.encoder import load_tokenizer
from embedtrain.model.sparse import LM_HEAD_KEY, QUERY_TABLE_KEY, SparseSettings
from embedtrain.prompts import MODEL_METADATA, model_policy
from embedtrain.version import __version__

KIND = "sparse"  # embedtrain.json "kind" of an exported sparse model
BACKBONE_PREFIX = "backbone."
EMBEDDINGS_KEY = "embed_tokens.weight"  # the backbone's input embeddings (a tied head is this tensor)
MASKED_LM_ARCHITECTURE = "LlamaBidirectionalForMaskedLM"
POOLING_FOLDER = "1_SpladePooling"
SPARSE_MIN_VERSION = "6.3.0"  # the sentence-transformers version the format was read from and tested with
# the Router layout of inference-free queries: the folders sentence-transformers names its modules by
QUERY_FOLDER = "query_0_SparseStaticEmbedding"
DOCUMENT_FOLDER = "document_0_Transformer"
DOCUMENT_POOLING_FOLDER = "document_1_SpladePooling"
ROUTER_TYPE = "sentence_transformers.base.modules.router.Router"
STATIC_TYPE = "sentence_transformers.sparse_encoder.modules.sparse_static_embedding.SparseStaticEmbedding"
TRANSFORMER_TYPE = "sentence_transformers.base.modules.transformer.Transformer"
POOLING_TYPE = "sentence_transformers.sparse_encoder.modules.splade_pooling.SpladePooling"


def masked_lm_names(named_tensors):
    """A sparse model's (name, tensor) pairs, backbone names without their prefix (as
    export.checkpoint_parameters yields them) -> LlamaBidirectionalForMaskedLM's: the backbone under
    model.*, the head as lm_head.weight unless it is the embeddings' own tensor (a tied head, which
    the tied export does not store). The query table is no weight of the fill-mask model: the
    writers hold it apart (ExportFormat.held, export_sparse), and one reaching here is an error."""
    embeddings = None
    for name, tensor in named_tensors:
        if name == LM_HEAD_KEY:
            if embeddings is not None and tensor.data_ptr() == embeddings.data_ptr():
                continue  # tied: the same parameter as the embeddings
            yield name, tensor
        elif name == QUERY_TABLE_KEY:
            raise CheckpointError(f"sparse export: {QUERY_TABLE_KEY} must be held apart from the fill-mask weights")
        else:
            if name == EMBEDDINGS_KEY:
                embeddings = tensor
            yield f"model.{name}", tensor


def masked_lm_config(config):
    """config.json of a sparse export from the backbone's (export_files.hf_config_dict): the fill-mask
    class and its auto_map; refuses a family without the modeling file (stock exports)."""
    if "auto_map" not in config:
        raise CheckpointError(
            f"sparse export: model_type {config.get('model_type')!r} has no fill-mask class that sentence-transformers "
            "can load; sparse models export from Llama backbones only"
        )
    config["architectures"] = [MASKED_LM_ARCHITECTURE]
    config["auto_map"]["AutoModelForMaskedLM"] = f"{MODELING_FILE[:-3]}.{MASKED_LM_ARCHITECTURE}"
    return config


def stored_names(folder):
    """The tensor names in the safetensors files of `folder`."""
    names = set()
    for file in Path(folder).glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            names.update(handle.keys())
    return names


def settle_tie(folder):
    """Record in config.json whether the head is tied: tied exactly when no lm_head.weight was written
    (the class then computes the logits from the embeddings, bidirectional.LlamaBidirectionalForMaskedLM)."""
    config_file = Path(folder) / "config.json"
    config = json.loads(config_file.read_text())
    config["tie_word_embeddings"] = LM_HEAD_KEY not in stored_names(folder)
    write_json(config_file, config, sort_keys=True)
    return config


def sparse_settings(settings, run_config=None):
    """SparseSettings of a run: its base_model file's settings (model.sparse), the lengths from the
    run's data section (data.query_max_length / passage_max_length) where the settings have none."""
    settings = dict(settings or {})
    data = (run_config or {}).get("data") or {}
    settings.setdefault("query_length", data.get("query_max_length", SparseSettings.query_length))
    settings.setdefault("document_length", data.get("passage_max_length", SparseSettings.document_length))
    return SparseSettings.from_dict(settings)


def sparse_export_files(folder, config, run_config, step, policy, metadata, settings, held=None):
    """The "sparse" export format's files: the tie recorded, sentence-transformers' modules, embedtrain.json's
    kind and settings, and the model card (`settings`: the run's base_model/sparse.json; `held`: the
    checkpoint's query table under QUERY_TABLE_KEY when the run trained one, ExportFormat.held)."""
    resolved = sparse_settings(settings, run_config)
    source = (run_config or {}).get("model", {}).get("path", "?")
    config = write_layout(folder, resolved, policy, (held or {}).get(QUERY_TABLE_KEY))
    (folder / "README.md").write_text(model_card(config, resolved, policy, f"from `{source}` for {step} steps"))


def write_layout(folder, settings, policy, table=None):
    """Lay out a folder holding the fill-mask model's weights, config and tokenizer (and
    embedtrain.json) as a SparseEncoder: the plain layout, or with a query table (`table`, (vocab,))
    the Router layout; returns the fill-mask model's config (the tie recorded). The table and
    settings.inference_free_queries must agree (a checkpoint without its table is an error)."""
    folder = Path(folder)
    if settings.inference_free_queries != (table is not None):
        have = "has a query table" if table is not None else "has no query table (query_weights.weight)"
        raise CheckpointError(
            f"sparse export: the model {have} but its settings say inference_free_queries="
            f"{str(settings.inference_free_queries).lower()}"
        )
    if table is None:
        config = settle_tie(folder)
        write_sparse_files(folder, config, settings, policy)
        return config
    document = folder / DOCUMENT_FOLDER
    document.mkdir()
    for item in list(folder.iterdir()):
        if item.name not in (MODEL_METADATA, DOCUMENT_FOLDER):
            item.rename(document / item.name)
    if (document / MODELING_FILE).is_file():  # transformers 5.25 reads remote code at the top, subfolder or not
        shutil.copyfile(document / MODELING_FILE, folder / MODELING_FILE)
    config = settle_tie(document)
    write_json(document / "sentence_bert_config.json", transformer_config(settings))
    (folder / DOCUMENT_POOLING_FOLDER).mkdir()
    write_json(folder / DOCUMENT_POOLING_FOLDER / "config.json", pooling_config(config))
    write_query_table(folder / QUERY_FOLDER, table, load_tokenizer(document), settings.query_length)
    write_json(folder / "modules.json", [{"idx": 0, "name": "0", "path": "", "type": ROUTER_TYPE}])
    router = {
        "types": {QUERY_FOLDER: STATIC_TYPE, DOCUMENT_FOLDER: TRANSFORMER_TYPE, DOCUMENT_POOLING_FOLDER: POOLING_TYPE},
        "structure": {"query": [QUERY_FOLDER], "document": [DOCUMENT_FOLDER, DOCUMENT_POOLING_FOLDER]},
        "parameters": {"default_route": "document", "allow_empty_key": True, "route_mappings": {}},
    }
    write_json(folder / "router_config.json", router)
    write_top_files(folder, settings, policy)
    return config


def write_query_table(query_folder, table, tokenizer, query_length):
    """sentence-transformers' SparseStaticEmbedding folder: the table as `weight` (float32), its
    config (trainable: frozen false) and the tokenizer, cut at `query_length` tokens (the module
    truncates to its tokenizer's model_max_length). The module makes one weight per tokenizer
    vocabulary entry, so the table must have that many."""
    vocab = len(tokenizer.get_vocab())
    if table.shape != (vocab,):
        raise CheckpointError(
            f"sparse export: the query table has shape {tuple(table.shape)}, the tokenizer {vocab} entries; "
            "sentence-transformers' SparseStaticEmbedding needs one weight per tokenizer entry"
        )
    query_folder.mkdir()
    save_file({"weight": table.detach().float().contiguous().cpu()}, str(query_folder / "model.safetensors"))
    write_json(query_folder / "config.json", {"frozen": False})
    tokenizer.model_max_length = query_length
    tokenizer.save_pretrained(query_folder)


def transformer_config(settings):
    """sentence_bert_config.json of the fill-mask Transformer module."""
    return {
        "transformer_task": "fill-mask",
        "modality_config": {"text": {"method": "forward", "method_output_name": "logits"}},
        "module_output_name": "token_embeddings",
        "max_seq_length": max(settings.query_length, settings.document_length),
        "query_length": settings.query_length,
        "document_length": settings.document_length,
        "do_lower_case": False,
    }


def pooling_config(config):
    """The SpladePooling module's config.json."""
    return {"pooling_strategy": "max", "activation_function": "relu", "embedding_dimension": config["vocab_size"]}


def write_top_files(folder, settings, policy):
    """config_sentence_transformers.json and embedtrain.json (kind, settings) at the top of `folder`."""
    st_config = {
        "__version__": {"sentence_transformers": SPARSE_MIN_VERSION},
        "model_type": "SparseEncoder",
        "prompts": policy.sentence_transformers_prompts(),
        "default_prompt_name": None,
        "similarity_fn_name": "dot",
    }
    write_json(folder / "config_sentence_transformers.json", st_config)
    metadata_file = folder / MODEL_METADATA
    metadata = json.loads(metadata_file.read_text()) if metadata_file.is_file() else policy.to_dict()
    metadata.update({"kind": KIND, **settings.to_dict(), "embedtrain_version": __version__})
    write_json(metadata_file, metadata)


def write_sparse_files(folder, config, settings, policy):
    """The sentence-transformers modules of a SPLADE SparseEncoder (see the module docstring) and
    embedtrain.json, beside the fill-mask model's weights, config and tokenizer in `folder`."""
    folder = Path(folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": TRANSFORMER_TYPE},
        {"idx": 1, "name": "1", "path": POOLING_FOLDER, "type": POOLING_TYPE},
    ]
    write_json(folder / "modules.json", modules)
    write_json(folder / "sentence_bert_config.json", transformer_config(settings))
    (folder / POOLING_FOLDER).mkdir(exist_ok=True)
    write_json(folder / POOLING_FOLDER / "config.json", pooling_config(config))
    write_top_files(folder, settings, policy)


def named_tensors(module_state):
    """(name, tensor) pairs of a state dict, an nn.Module or an iterable of pairs. A module's own
    state dict keeps a tied head under both names (the same tensor), which masked_lm_names drops."""
    if isinstance(module_state, torch.nn.Module):
        module_state = module_state.state_dict(keep_vars=False)
    return module_state.items() if isinstance(module_state, Mapping) else module_state


def unprefixed(pairs):
    """A module's (name, tensor) pairs with the backbone's prefix removed (checkpoint_parameters' form)."""
    for name, tensor in pairs:
        if name.startswith(BACKBONE_PREFIX):
            yield name[len(BACKBONE_PREFIX) :], tensor.detach()
        elif name in (LM_HEAD_KEY, QUERY_TABLE_KEY):
            yield name, tensor.detach()
        else:
            raise CheckpointError(f"sparse export: unexpected weight {name!r} (expected backbone.* and {LM_HEAD_KEY})")


def export_sparse(
    module_state,
    backbone_folder,
    out,
    settings=None,
    prompt_policy=None,
    padding_side=None,
    dtype="float32",
    overwrite=False,
    max_shard_gb=5.0,
):
    """Write a sparse model as a sentence-transformers SparseEncoder folder `out`.

    module_state: the weights of an embedtrain.model.sparse.SparseModel (the module, its state dict or
    (name, tensor) pairs): backbone.* and lm_head.weight (absent, or the embeddings' tensor, when
    tied), and query_weights.weight with inference-free queries (then written in the Router layout).
    backbone_folder: where the backbone's config.json and tokenizer are (the model path).
    settings: SparseSettings (default: its defaults, inference_free_queries when the weights hold a
    query table). prompt_policy: a PromptPolicy (default: the one
    recorded in backbone_folder). padding_side: the tokenizer's in the export (default: as in
    backbone_folder's tokenizer_config.json, else right). The folder appears complete or not at all."""
    backbone_folder = Path(backbone_folder)
    held = {}
    with published_folder(out, overwrite, "overwrite=True") as tmp:
        config = masked_lm_config(hf_config_dict(json.loads((backbone_folder / "config.json").read_text())))
        pairs = masked_lm_names(held_apart(unprefixed(named_tensors(module_state)), held))
        write_model(pairs, config, tmp, dtype, max_shard_gb)  # masked_lm_config names the modeling file
        settings = settings or SparseSettings(inference_free_queries=QUERY_TABLE_KEY in held)
        save_tokenizer(backbone_folder, tmp, padding_side)
        policy = prompt_policy or model_policy(backbone_folder)
        write_json(tmp / MODEL_METADATA, policy.to_dict())
        config = write_layout(tmp, settings, policy, held.get(QUERY_TABLE_KEY))
        (tmp / "README.md").write_text(model_card(config, settings, policy, f"from `{backbone_folder.name}`"))
    return Path(out)


def held_apart(pairs, held):
    """The (name, tensor) pairs less the query table, which goes into the dict `held`."""
    for name, tensor in pairs:
        if name == QUERY_TABLE_KEY:
            held[name] = tensor
        else:
            yield name, tensor


def model_card(config, settings, policy, origin):
    head = "tied to the input embeddings" if config.get("tie_word_embeddings") else "the checkpoint's own"
    query_side = f"up to {settings.query_length} tokens"
    if settings.inference_free_queries:
        query_side = (
            f"inference-free: each of its tokens (up to {settings.query_length}, no special tokens) weighs its "
            "learned table weight, no encoder (the Router's query route, SparseStaticEmbedding)"
        )
    return f"""---
library_name: sentence-transformers
tags: [sentence-transformers, sparse-encoder, sparse, splade, embedtrain]
pipeline_tag: feature-extraction
---
# Bidirectional Llama sparse (SPLADE) retriever

Trained with embedtrain {origin}. One weight per vocabulary term ({config["vocab_size"]} terms, mostly
zero): the bidirectional backbone's token states go through the LM head ({head}); a term's weight is
log(1 + relu(logit)), max-pooled over the text's tokens. Relevance is the dot product.

- Queries: {query_side}; prompt `{policy.default_query!r}`
- Documents: up to {settings.document_length} tokens; prompt `{policy.default_document!r}`

```python
from sentence_transformers import SparseEncoder  # sentence-transformers >= {SPARSE_MIN_VERSION}
model = SparseEncoder("PATH", trust_remote_code=True)
queries = model.encode_query(["..."])
documents = model.encode_document(["..."])
scores = model.similarity(queries, documents)
```

With embedtrain: `embedtrain.SparseEncoder.from_pretrained("PATH").score(queries, documents)`, or
`embedtrain encode PATH ...` (CSR `.npz`: indices, values, offsets).
"""
