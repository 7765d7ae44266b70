"""A multi-vector (ColBERT) model -> a folder that sentence-transformers' MultiVectorEncoder (>= 6.3)
loads, and that transformers loads as the bidirectional backbone.

Written (the module layout sentence-transformers 6.3 saves a MultiVectorEncoder in, read from
sentence_transformers/multi_vector_encoder/model.py and its modules):
- the backbone as a dense export writes it (embedtrain/export.py: safetensors shards of the backbone
  keys, config.json with model_type llama_bidirec and auto_map, the modeling file next to it; other
  families their stock class with is_causal false), and the tokenizer with its pad token and side;
- modules.json: Transformer (token states, `module_output_name` token_embeddings) -> Dense
  (1_Dense: the projection, no bias, identity activation, on token_embeddings) -> MultiVectorMask
  (2_MultiVectorMask: the document skiplist words) -> Normalize (3_Normalize: per token);
- sentence_bert_config.json: the Transformer's query_length, document_length and query_expansion
  (strategy "fixed", the expansion token named explicitly: the one embedtrain uses,
  model/multi_vector.expansion_token_id);
- config_sentence_transformers.json: model_type MultiVectorEncoder, the prompts, similarity maxsim;
- embedtrain.json: the prompt policy, kind "multi_vector" and the MultiVectorSettings.

`export_multi_vector` takes the module's weights in memory (a state dict or (name, tensor) pairs,
streamed to the shards), so that a checkpoint's consolidated parameters can be handed to it.
"""

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from embedtrain.errors import CheckpointError
from embedtrain.export_files import hf_config_dict, save_tokenizer, write_json, write_model
from embedtrain.file_modes import published_folder
from embedtrain.model.multi_vector import MultiVectorSettings, expansion_token_id
from embedtrain.prompts import MODEL_METADATA, PromptPolicy, model_policy
from embedtrain.version import __version__

KIND = "multi_vector"  # embedtrain.json "kind" of an exported multi-vector model
BACKBONE_PREFIX = "backbone."
HEAD_KEY = "head.linear.weight"  # the projection in MultiVectorEncoder's state dict (model/multi_vector.py)
DENSE_FOLDER, MASK_FOLDER, NORMALIZE_FOLDER = "1_Dense", "2_MultiVectorMask", "3_Normalize"
MULTI_VECTOR_MIN_VERSION = "6.3.0"  # the sentence-transformers version the format was read from and tested with


def named_tensors(module_state):
    """(name, tensor) pairs of a state dict, an nn.Module or an iterable of pairs."""
    if isinstance(module_state, torch.nn.Module):
        module_state = module_state.state_dict()
    return module_state.items() if isinstance(module_state, Mapping) else module_state


def split_head(pairs, head):
    """The backbone's (name without the prefix, tensor) pairs, streamed; the projection goes into
    `head` (a dict), anything else is an error naming it."""
    for name, tensor in pairs:
        if name.startswith(BACKBONE_PREFIX):
            yield name[len(BACKBONE_PREFIX) :], tensor.detach()
        elif name == HEAD_KEY:
            head["weight"] = tensor.detach()
        else:
            raise CheckpointError(
                f"multi-vector export: unexpected weight {name!r} (expected backbone.* and {HEAD_KEY})"
            )


def export_multi_vector(
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
    """Write a multi-vector model as a sentence-transformers MultiVectorEncoder folder `out`.

    module_state: the weights of an embedtrain.model.multi_vector.MultiVectorEncoder (its state dict,
    the module, or (name, tensor) pairs): backbone.* and head.linear.weight. backbone_folder: where
    the backbone's config.json and tokenizer are (a checkpoint's base_model folder, the model path).
    settings: MultiVectorSettings (default: its defaults at the head's width). prompt_policy: a
    PromptPolicy (default: the one recorded in backbone_folder). padding_side: the tokenizer's in
    the export (default: as in backbone_folder's tokenizer_config.json, else right). The folder
    appears complete or not at all."""
    backbone_folder = Path(backbone_folder)
    with published_folder(out, overwrite, "overwrite=True") as tmp:
        head = {}
        config = hf_config_dict(json.loads((backbone_folder / "config.json").read_text()))
        write_model(split_head(named_tensors(module_state), head), config, tmp, dtype, max_shard_gb)
        if "weight" not in head:
            raise CheckpointError(f"multi-vector export: no {HEAD_KEY} among the weights (not a multi-vector model?)")
        settings = settings or MultiVectorSettings(dim=head["weight"].shape[0])
        if head["weight"].shape[0] != settings.dim:
            raise CheckpointError(
                f"multi-vector export: the projection is {tuple(head['weight'].shape)}, settings.dim {settings.dim}"
            )
        tokenizer = save_tokenizer(backbone_folder, tmp, padding_side)
        policy = prompt_policy or model_policy(backbone_folder)
        write_multi_vector_files(tmp, tokenizer, head["weight"], settings, policy)
    return Path(out)


def write_multi_vector_files(folder, tokenizer, head_weight, settings, policy):
    """The sentence-transformers modules of a MultiVectorEncoder (see the module docstring), its
    embedtrain.json and model card, in `folder` beside the backbone's weights, config and tokenizer."""
    folder = Path(folder)
    dim, hidden = head_weight.shape
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"},
        {"idx": 1, "name": "1", "path": DENSE_FOLDER, "type": "sentence_transformers.base.modules.dense.Dense"},
        {
            "idx": 2,
            "name": "2",
            "path": MASK_FOLDER,
            "type": "sentence_transformers.multi_vector_encoder.modules.multi_vector_mask.MultiVectorMask",
        },
        {
            "idx": 3,
            "name": "3",
            "path": NORMALIZE_FOLDER,
            "type": "sentence_transformers.base.modules.normalize.Normalize",
        },
    ]
    write_json(folder / "modules.json", modules)
    transformer = {
        "transformer_task": "feature-extraction",
        "modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
        "module_output_name": "token_embeddings",
        "query_length": settings.query_length,
        "document_length": settings.document_length,
        "query_expansion": None,
    }
    if settings.query_expansion is not None:
        token = tokenizer.convert_ids_to_tokens(expansion_token_id(tokenizer))
        transformer["query_expansion"] = {"strategy": "fixed", **settings.query_expansion, "token": token}
    write_json(folder / "sentence_bert_config.json", transformer)
    (folder / DENSE_FOLDER).mkdir()
    save_file({"linear.weight": head_weight.float().contiguous()}, str(folder / DENSE_FOLDER / "model.safetensors"))
    token_io = {"module_input_name": "token_embeddings", "module_output_name": "token_embeddings"}
    dense = {
        "in_features": hidden,
        "out_features": dim,
        "bias": False,
        "activation_function": "torch.nn.modules.linear.Identity",
        **token_io,
    }
    write_json(folder / DENSE_FOLDER / "config.json", dense)
    (folder / MASK_FOLDER).mkdir()
    mask = {"skiplist_words": settings.skiplist_words, "skiplist_tasks": ["document"], "keep_only_token_ids": None}
    write_json(folder / MASK_FOLDER / "config.json", mask)
    (folder / NORMALIZE_FOLDER).mkdir()
    write_json(folder / NORMALIZE_FOLDER / "config.json", token_io)
    st_config = {
        "__version__": {"sentence_transformers": MULTI_VECTOR_MIN_VERSION},
        "model_type": "MultiVectorEncoder",
        "prompts": policy.sentence_transformers_prompts(),
        "default_prompt_name": None,
        "similarity_fn_name": "maxsim",
    }
    write_json(folder / "config_sentence_transformers.json", st_config)
    metadata = {**policy.to_dict(), "kind": KIND, **settings.to_dict(), "embedtrain_version": __version__}
    write_json(folder / MODEL_METADATA, metadata)
    (folder / "README.md").write_text(model_card(settings, policy))


def model_card(settings, policy):
    expansion = settings.query_expansion
    return f"""---
library_name: sentence-transformers
tags: [sentence-transformers, multi-vector, colbert, late-interaction, embedtrain]
pipeline_tag: sentence-similarity
---
# Bidirectional Llama multi-vector (ColBERT) retriever

One {settings.dim}-dim unit vector per token (a linear projection of the bidirectional backbone's token
states); relevance is MaxSim: the sum over query tokens of the best dot product with any document token.

- Queries: up to {settings.query_length} tokens{
        ""
        if expansion is None
        else f", expanded to exactly {expansion['length']} with expansion tokens (attended: {expansion['attend']})"
    }; prompt `{policy.default_query!r}`
- Documents: up to {settings.document_length} tokens; not scored: {settings.skiplist_words or "none"}; \
prompt `{policy.default_document!r}`

```python
from sentence_transformers import MultiVectorEncoder  # sentence-transformers >= {MULTI_VECTOR_MIN_VERSION}
model = MultiVectorEncoder("PATH", trust_remote_code=True)
queries = model.encode_query(["..."])
documents = model.encode_document(["..."])
scores = model.similarity(queries, documents)
```

With embedtrain: `embedtrain.MultiVectorEncoder.from_pretrained("PATH").score(queries, documents)`.
"""


def policy_from_prompts(query="", document=""):
    """A PromptPolicy with fixed query and document prompts (each given with its joiner, as
    sentence-transformers puts it in front of the text)."""
    return PromptPolicy(query.rstrip(" "), document.rstrip(" "), query, document)
