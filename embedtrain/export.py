"""ZeRO checkpoint -> Hugging Face folder in the format of NVIDIA's released embedding models.

Written: sharded safetensors (backbone keys only, no lm_head) with an index when more than one
shard; config.json with model_type llama_bidirec, auto_map, pooling and temperature; the modeling
file next to the weights; the tokenizer with its pad token and padding side; sentence-transformers
files (Transformer -> Pooling -> Normalize, the recipe's prompts, cosine similarity); a model card.

A reranker (model.kind=reranker) is written as LlamaBidirectionalForSequenceClassification (backbone
-> model.*, head -> score.weight) with sentence-transformers CrossEncoder files instead: its pair
template becomes the tokenizer's chat template (chat_template.jinja), which CrossEncoder (>= 6.2)
renders a (query, passage) pair through, and the export checks that the rendering gives exactly the
tokens embedtrain scores.

A multi-vector model (model.kind=multi_vector) is written in sentence-transformers' MultiVectorEncoder
format (export_multi_vector.py): the backbone's shards as above, its token projection (held out of
the shards, ExportFormat.held) as a Dense module, with the lengths, query expansion and skiplist the
run recorded in base_model/multi_vector.json.

ZeRO-3 checkpoints are consolidated as a stream: every rank's fp32 partition file is memory-mapped
and each parameter is assembled from its W slices, then written; peak host memory is about one
safetensors shard plus one parameter, never the whole model.

A LoRA run (model.lora) is exported merged, in the same released format: the base weights are
streamed from the base model folder (the run's model.path, or --base-model) and each targeted
weight becomes W + (alpha / r) B A, in fp32 before the cast to --dtype. The adapter comes from the
checkpoint's adapter_model.safetensors; its recorded base fingerprint must match the base read,
or the export stops (a merge into another base would silently be another model). A head trained in
full beside the adapter (a multi-vector model's projection) comes from the checkpoint's
trained_head.safetensors and is written as the format writes it. With
`adapter_only` the folder holds the adapter in peft's format, loadable on the bidirectional base
with peft.PeftModel.from_pretrained, plus the tokenizer, prompts and the modeling file.
"""

import json
import shutil
import string
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import yaml
from safetensors.torch import save_file

from embedtrain.errors import CheckpointError
from embedtrain.export_files import MODELING_FILE, hf_config_dict, write_model, write_shards  # noqa: F401 (re-exported)
from embedtrain.export_multi_vector import HEAD_KEY as MULTI_VECTOR_HEAD
from embedtrain.export_multi_vector import write_multi_vector_files
from embedtrain.export_sparse import masked_lm_config, masked_lm_names, sparse_export_files
from embedtrain.file_modes import published_folder
from embedtrain.kinds import kind_files, recorded_kind
from embedtrain.model import bidirectional
from embedtrain.model.distill import PROJECTION_FOLDER, PROJECTION_PREFIX
from embedtrain.model.encoder import load_tokenizer
from embedtrain.model.families import family_of
from embedtrain.model.lora import (
    ADAPTER_BASE,
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    BaseWeights,
    base_fingerprint,
    merge_lora,
    read_adapter,
    read_head,
    recorded_base,
)
from embedtrain.model.multi_vector import MultiVectorSettings
from embedtrain.model.reranker import HEAD_KEY, RERANKER_ARCHITECTURE
from embedtrain.model.sparse import LM_HEAD_KEY, QUERY_TABLE_KEY
from embedtrain.prompts import MODEL_METADATA, model_policy
from embedtrain.train.checkpoint import load_checkpoint_file, rank_files, resolve_checkpoint, zero3_full_tensors
from embedtrain.version import __version__

BACKBONE_PREFIX = "backbone."
HEAD_PARAMETER = "head.weight"  # a reranker's scoring head (model/reranker.py)
SPARSE_PARAMETERS = (LM_HEAD_KEY, QUERY_TABLE_KEY)  # a sparse model's LM head and query table (model/sparse.py)
ST_POOLING = {
    "avg": "pooling_mode_mean_tokens",
    "cls": "pooling_mode_cls_token",
    "last": "pooling_mode_lasttoken",
    "weighted_avg": "pooling_mode_weightedmean_tokens",
}


def checkpoint_parameters(folder, projection=None):
    """(name, fp32 tensor) of the backbone, streamed for ZeRO-3, in memory for other stages.
    `projection`: a dict that receives a distilled student's projection tensors (by their names
    without the prefix), which are not yielded."""
    stage = (
        load_checkpoint_file(rank_files(folder, "model")[0])["ds_config"].get("zero_optimization", {}).get("stage", 0)
    )
    if stage == 3:
        items = ((name, full["fp32"]) for name, full in zero3_full_tensors(folder))
    else:  # ZeRO 0-2: DeepSpeed's own consolidation, which holds the model in memory once
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        items = get_fp32_state_dict_from_zero_checkpoint(str(Path(folder).parent), tag=Path(folder).name).items()
    found = False
    for name, tensor in items:
        if name.startswith(BACKBONE_PREFIX):
            found = True
            yield name[len(BACKBONE_PREFIX) :], tensor
        elif name == HEAD_PARAMETER or name in SPARSE_PARAMETERS or name == MULTI_VECTOR_HEAD:
            yield name, tensor
        elif projection is not None and name.startswith(PROJECTION_PREFIX):
            projection[name[len(PROJECTION_PREFIX) :]] = tensor
    if not found:
        raise CheckpointError(f"{folder}: no '{BACKBONE_PREFIX}*' weights in the checkpoint (not an embedtrain run?)")


def sentence_transformers_files(folder, config, prompts, max_seq_length, projection=None):
    """modules.json (Transformer -> Pooling -> Normalize, then with a kept distillation projection
    Dense -> Normalize) and each module's config."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    if projection is not None:
        modules += [
            {"idx": 3, "name": "3", "path": projection["path"], "type": "sentence_transformers.models.Dense"},
            {"idx": 4, "name": "4", "path": "4_Normalize", "type": "sentence_transformers.models.Normalize"},
        ]
        (folder / "4_Normalize").mkdir()
    (folder / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    pooling = {
        mode: False
        for mode in (
            "pooling_mode_cls_token",
            "pooling_mode_mean_tokens",
            "pooling_mode_max_tokens",
            "pooling_mode_mean_sqrt_len_tokens",
            "pooling_mode_weightedmean_tokens",
            "pooling_mode_lasttoken",
        )
    }
    pooling[ST_POOLING[config["pooling"]]] = True
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": config["hidden_size"], **pooling, "include_prompt": True}, indent=2)
        + "\n"
    )
    (folder / "2_Normalize").mkdir()
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}, indent=2) + "\n"
    )
    st_config = {
        "prompts": prompts,
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
        "model_type": "SentenceTransformer",
    }
    if config.get("matryoshka_dims"):
        st_config["matryoshka_dims"] = config["matryoshka_dims"]
    (folder / "config_sentence_transformers.json").write_text(json.dumps(st_config, indent=2) + "\n")


def write_projection(folder, tensors, step_folder):
    """A distilled student's projection as a sentence-transformers Dense module (identity
    activation, fp32) in `folder`/3_Dense; returns its entry for embedtrain.json."""
    if set(tensors) != {"weight", "bias"}:
        raise CheckpointError(
            f"{step_folder}: no distillation projection in the checkpoint (found {sorted(tensors) or 'none'})"
        )
    weight, bias = tensors["weight"].float().contiguous(), tensors["bias"].float().contiguous()
    dense = folder / PROJECTION_FOLDER
    dense.mkdir()
    save_file({"linear.weight": weight, "linear.bias": bias}, dense / "model.safetensors")
    out_features, in_features = weight.shape
    config = {
        "in_features": in_features,
        "out_features": out_features,
        "bias": True,
        "activation_function": "torch.nn.modules.linear.Identity",
    }
    (dense / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"path": PROJECTION_FOLDER, "in_features": in_features, "out_features": out_features}


def lora_line(run_config):
    lora = (run_config.get("model") or {}).get("lora")
    if lora is None:
        return ""
    return (
        f"- Fine-tuning: LoRA rank {lora['r']}, alpha {lora['alpha']}, dropout {lora['dropout']} on "
        f"{', '.join(lora['target_modules'])}, merged into the base weights (W + alpha / r x B A)\n"
    )


def model_card(config, run_config, step, prompts):
    data, train, loss = run_config.get("data", {}), run_config.get("train", {}), run_config.get("loss", {})
    return f"""---
library_name: transformers
tags: [sentence-transformers, feature-extraction, embedding, embedtrain]
pipeline_tag: feature-extraction
---
# Bidirectional Llama embedding model

Trained with embedtrain from `{run_config.get("model", {}).get("path", "?")}` for {step} steps.

- Architecture: {family_of(config["model_type"]).name if "auto_map" not in config else "Llama"}, \
{config["num_hidden_layers"]} layers, hidden {config["hidden_size"]}, bidirectional attention
- Pooling: `{config["pooling"]}`, L2-normalised; similarity: cosine
- Data: `{data.get("path", "?")}`, subsets {data.get("subsets") or "all"}
- Loss: InfoNCE, negatives `{loss.get("negatives")}`, {loss.get("hard_negatives")} hard negatives, \
temperature {loss.get("temperature")}
- Optimisation: lr {train.get("lr")}, global batch {train.get("global_batch_size")}, seed {train.get("seed")}
- Prompts: query `{prompts["query"]!r}`, document `{prompts["document"]!r}`
{lora_line(run_config)}
```python
from sentence_transformers import SentenceTransformer
model = SentenceTransformer("PATH", trust_remote_code=True)
queries = model.encode(["..."], prompt_name="query")
documents = model.encode(["..."], prompt_name="document")
```
"""


def lora_base(run_config, base_model=None):
    """The base model folder of a LoRA run: `base_model` (export --base-model) or the run's model.path."""
    path = Path(base_model or run_config["model"]["path"])
    if not (path / "config.json").is_file():
        where = "--base-model" if base_model else "the run's model.path"
        raise CheckpointError(
            f"the base model of this LoRA run, {path} ({where}), is not a model folder (no config.json); the "
            "merged export reads the base weights: pass the base folder with --base-model PATH"
        )
    return path


def merged_lora_parameters(step_folder, base_path):
    """(name, fp32 tensor) of the backbone with the checkpoint's adapter merged into the base weights,
    streamed from the base folder one tensor at a time. Refuses a base other than the one trained on."""
    adapter, adapter_config = read_adapter(step_folder)
    recorded = recorded_base(step_folder)
    try:
        if recorded.get("fingerprint") != base_fingerprint(base_path):
            raise CheckpointError(
                f"{base_path} is not the base model the adapter in {step_folder} was trained on (the fingerprint of "
                f"its weights differs from the one in {ADAPTER_BASE}, recorded from {recorded.get('base_model')}); "
                "pass that base with --base-model"
            )
        scaling = adapter_config["lora_alpha"] / adapter_config["r"]
        for name, weight in merge_lora(BaseWeights(base_path).items(), adapter, scaling):
            yield name, weight.float()
    except ValueError as err:  # a missing base weight, or an adapter for modules the base lacks
        raise CheckpointError(f"merging the adapter of {step_folder} into {base_path}: {err}") from err


def export_checkpoint(
    source,
    out,
    dtype="float32",
    overwrite=False,
    max_shard_gb=5.0,
    adapter_only=False,
    base_model=None,
    keep_projection=False,
):
    """Write the checkpoint `source` names (a run, its checkpoints folder, a step folder) as a
    Hugging Face folder `out`. A LoRA run: merged into its base (`base_model`, default the run's
    model.path), or with `adapter_only` the adapter in peft's format. A distilled student
    (loss.distill) is exported at its own width; `keep_projection` adds its projection to the
    teacher's width as a sentence-transformers Dense module, which embedtrain applies too."""
    checkpoint_root, tag = resolve_checkpoint(source)
    step_folder = checkpoint_root / tag
    base = step_folder / "base_model"
    if not (base / "config.json").is_file():
        raise CheckpointError(f"{step_folder} lacks base_model/config.json: not a complete embedtrain checkpoint")
    with published_folder(out, overwrite) as tmp:  # the folder appears complete or not at all
        write_export(step_folder, base, tmp, dtype, max_shard_gb, adapter_only, base_model, keep_projection)
    return Path(out)


def reranker_names(named_tensors):
    """Checkpoint names -> LlamaBidirectionalForSequenceClassification's: backbone -> model.*, head -> score."""
    for name, tensor in named_tensors:
        yield (HEAD_KEY if name == HEAD_PARAMETER else f"model.{name}"), tensor


def reranker_config_dict(config):
    """config.json of an exported reranker: loadable with AutoModelForSequenceClassification."""
    config["architectures"] = [RERANKER_ARCHITECTURE]
    config["auto_map"]["AutoModelForSequenceClassification"] = f"{MODELING_FILE[:-3]}.{RERANKER_ARCHITECTURE}"
    config["num_labels"] = 1
    config["id2label"], config["label2id"] = {"0": "LABEL_0"}, {"LABEL_0": 0}
    config["sentence_transformers"] = {"activation_fn": CROSS_ENCODER_ACTIVATION}  # CrossEncoder reads it here too
    return config


# --- a reranker as a sentence-transformers CrossEncoder --------------------------------------------
#
# CrossEncoder tokenizes a (query, passage) pair itself. Recent releases (verified with 6.2) render a
# pair through the tokenizer's chat template when the model has one, as a "query" message and a "document" message
# (sentence_transformers.base.modality.InputFormatter.pair_to_messages), then tokenizes the rendered
# text without adding special tokens and truncates it to max_seq_length. A template that renders
# exactly <the tokenizer's special prefix> + pair_template + <its special suffix> therefore gives the
# tokens embedtrain scores: tokenizer(pair_template.format(query=q, passage=p), truncation=True).

# Identity: CrossEncoder.predict returns the raw logits, the scores embedtrain returns. The head was
# trained with a softmax over each query's group, so sigmoid(logit) is not a calibrated probability.
CROSS_ENCODER_ACTIVATION = "torch.nn.modules.linear.Identity"
CROSS_ENCODER_MIN_VERSION = "6.2"  # the version the rendering below was verified with
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def jinja_literal(text):
    """`text` as a Jinja string literal (Jinja decodes the JSON escapes, non-ASCII stays as it is)."""
    return json.dumps(text, ensure_ascii=False)


def special_affixes(tokenizer):
    """(prefix, suffix): the text of the special tokens the tokenizer adds around a text (Llama 3:
    "<|begin_of_text|>", "")."""
    plain = tokenizer("x y", add_special_tokens=False)["input_ids"]
    full = tokenizer("x y")["input_ids"]
    start = next((k for k in range(len(full) - len(plain) + 1) if full[k : k + len(plain)] == plain), None)
    if start is None:
        raise CheckpointError("the tokenizer's special tokens change the text's own tokens; cannot export a reranker")
    return tokenizer.decode(full[:start]), tokenizer.decode(full[start + len(plain) :])


def pair_chat_template(pair_template, prefix="", suffix=""):
    """A chat template rendering [{"role": "query", ...}, {"role": "document", ...}] as
    prefix + pair_template.format(query=..., passage=...) + suffix; anything else (a system
    prompt, a single text) raises."""
    pieces = [jinja_literal(prefix)]
    for literal, field, spec, conversion in string.Formatter().parse(pair_template):
        if literal:
            pieces.append(jinja_literal(literal))
        if spec or conversion:
            raise CheckpointError(
                f"data.pair_template {pair_template!r}: {{{field}}} has a conversion or format spec, which "
                "sentence-transformers' chat template cannot reproduce; use plain {query} and {passage}"
            )
        if field is not None:
            pieces.append("messages[0]['content']" if field == "query" else "messages[1]['content']")
    if suffix:
        pieces.append(jinja_literal(suffix))
    message = (
        "this embedtrain reranker scores (query, passage) pairs: pass a 'query' message and a 'document' "
        "message (CrossEncoder.predict([(query, passage), ...])), without a prompt or system message"
    )
    return (
        "{#- embedtrain reranker: a (query, passage) pair rendered as its data.pair_template -#}\n"
        "{%- if messages | length != 2 or messages[0]['role'] != 'query' or messages[1]['role'] != 'document'"
        " or messages[0]['content'] is not string or messages[1]['content'] is not string -%}\n"
        "{{- raise_exception(" + jinja_literal(message) + ") -}}\n"
        "{%- endif -%}\n"
        "{{- " + " + ".join(pieces) + " -}}\n"
    )


PROBE_PAIRS = [
    ("Who is Shilin Linlofo?", "Shilin Linlofo is a chemist."),
    ('  spaces {braces} \\ "quotes"', "line\nbreaks\tand ünïcödé, 東京 and 🙂 "),
]


def check_pair_rendering(folder, pair_template):
    """The chat template, rendered and tokenized as CrossEncoder does, gives the token ids embedtrain
    scores (inference.batching.score_pairs): refuse to write a folder where the two would differ."""
    tokenizer = load_tokenizer(folder)
    for query, passage in PROBE_PAIRS:
        messages = [{"role": "query", "content": query}, {"role": "document", "content": passage}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        expected = tokenizer(pair_template.format(query=query, passage=passage))["input_ids"]
        if tokenizer(rendered, add_special_tokens=False)["input_ids"] != expected:
            raise CheckpointError(
                f"{folder / CHAT_TEMPLATE_FILE}: rendering the pair ({query!r}, {passage!r}) gives {rendered!r}, "
                f"whose tokens differ from embedtrain's for data.pair_template {pair_template!r}"
            )


def cross_encoder_files(folder, reranker):
    """chat_template.jinja (the pair template) and the sentence-transformers files of a CrossEncoder:
    one Transformer module (sequence classification, pairs rendered as flat chat messages, truncated
    to pair_max_length), Identity activation, no prompts."""
    prefix, suffix = special_affixes(load_tokenizer(folder))
    (folder / CHAT_TEMPLATE_FILE).write_text(pair_chat_template(reranker["pair_template"], prefix, suffix))
    shutil.rmtree(folder / "additional_chat_templates", ignore_errors=True)  # a base model's chat templates
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    if tokenizer_config.pop("chat_template", None) is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    check_pair_rendering(folder, reranker["pair_template"])

    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"}
    ]
    (folder / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    output = {"method": "forward", "method_output_name": "logits"}
    module_config = {
        "transformer_task": "sequence-classification",
        "modality_config": {"text": output, "message": {**output, "format": "flat"}},
        "module_output_name": "scores",
        "max_seq_length": reranker["pair_max_length"],
        "do_lower_case": False,
    }
    (folder / "sentence_bert_config.json").write_text(json.dumps(module_config, indent=2) + "\n")
    requirement = {
        "specifier": f">={CROSS_ENCODER_MIN_VERSION}",
        "reason": "This reranker's (query, passage) template is its chat template (chat_template.jinja). A "
        "CrossEncoder that does not render pairs through it tokenizes them as two segments and scores differently; "
        "the export was verified with this version.",
    }
    st_config = {
        "__version__": {"sentence_transformers": CROSS_ENCODER_MIN_VERSION},
        "requirements": {"sentence_transformers": requirement},
        "model_type": "CrossEncoder",
        "activation_fn": CROSS_ENCODER_ACTIVATION,
        "prompts": {},
        "default_prompt_name": None,
    }
    (folder / "config_sentence_transformers.json").write_text(json.dumps(st_config, indent=2) + "\n")


def reranker_model_card(config, run_config, step, reranker):
    data, train, loss = run_config.get("data", {}), run_config.get("train", {}), run_config.get("loss", {})
    return f"""---
library_name: sentence-transformers
tags: [sentence-transformers, cross-encoder, reranker, text-ranking, embedtrain]
pipeline_tag: text-ranking
---
# Bidirectional Llama reranker (cross-encoder)

Trained with embedtrain from `{run_config.get("model", {}).get("path", "?")}` for {step} steps. It reads a
(query, passage) pair as one sequence and returns one relevance logit: higher is more relevant.

- Architecture: Llama, {config["num_hidden_layers"]} layers, hidden {config["hidden_size"]}, bidirectional \
attention, `{config["pooling"]}` pooling, linear head to 1 logit (no bias), divided by temperature \
{config.get("temperature", 1.0)}
- Pair template: `{reranker["pair_template"]!r}` (Python `str.format`), truncated to \
{reranker["pair_max_length"]} tokens, the tokenizer's special tokens included
- Data: `{data.get("path", "?")}`, subsets {data.get("subsets") or "all"}
- Loss: cross-entropy over each query's group of 1 positive + {loss.get("hard_negatives")} hard negatives
- Optimisation: lr {train.get("lr")}, global batch {train.get("global_batch_size")}, seed {train.get("seed")}

Scores are raw logits. The model was trained with a softmax over each query's passages, so compare
scores of one query's passages; a sigmoid of a score is not a calibrated probability.

## Usage

```python
from sentence_transformers import CrossEncoder  # sentence-transformers >= {CROSS_ENCODER_MIN_VERSION}
model = CrossEncoder("PATH", trust_remote_code=True)
scores = model.predict([("Who is Shilin Linlofo?", "Shilin Linlofo is a chemist.")])
ranking = model.rank("Who is Shilin Linlofo?", ["Shilin Linlofo is a chemist.", "Paris is in France."])
```

CrossEncoder renders each pair with `chat_template.jinja`, which holds the pair template above, and
returns the logits as they are (activation `Identity`, `config_sentence_transformers.json`); pass
`activation_fn=torch.nn.Sigmoid()` for values in (0, 1). Pass plain (query, passage) pairs: the template
takes no prompt or system message.

With transformers alone, render the template yourself and tokenize with special tokens:

```python
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
model = AutoModelForSequenceClassification.from_pretrained("PATH", trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained("PATH")
pairs = [("Who is Shilin Linlofo?", "Shilin Linlofo is a chemist.")]
texts = [{reranker["pair_template"]!r}.format(query=q, passage=p) for q, p in pairs]
batch = tokenizer(texts, truncation=True, max_length={reranker["pair_max_length"]}, padding=True, return_tensors="pt")
with torch.no_grad():
    scores = model(**batch).logits[:, 0]
```

With embedtrain: `embedtrain.Reranker.from_pretrained("PATH").score(query, passages)`, or
`embedtrain rerank PATH --input pairs.jsonl --output scores.jsonl`.
"""


def write_adapter_export(step_folder, base, tmp, run_config, base_path):
    """The adapter-only folder: peft's two files (base_model_name_or_path: the base), the tokenizer,
    embedtrain.json (prompts, pooling, normalisation, max length), the modeling file, a model card."""
    shutil.copy(step_folder / ADAPTER_WEIGHTS, tmp / ADAPTER_WEIGHTS)
    adapter_config = json.loads((step_folder / ADAPTER_CONFIG).read_text())
    adapter_config["base_model_name_or_path"] = str(base_path)
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    for item in base.iterdir():
        if item.name not in ("config.json", "prompts.json", *kind_files()):
            shutil.copy(item, tmp / item.name)
    shutil.copyfile(bidirectional.__file__, tmp / MODELING_FILE)
    model = run_config["model"]
    config = json.loads((base / "config.json").read_text())
    metadata = {
        **model_policy(base).to_dict(),
        "pooling": config.get("pooling", model["pooling"]),
        "normalize": model["normalize"],
        "max_seq_length": run_config["data"]["passage_max_length"],
        "base_model": str(base_path),
        "base_fingerprint": recorded_base(step_folder).get("fingerprint"),
        "embedtrain_version": __version__,
    }
    (tmp / MODEL_METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
    step = int(step_folder.name.split("_")[-1])
    (tmp / "README.md").write_text(adapter_model_card(config, run_config, step, metadata, adapter_config))


def adapter_model_card(config, run_config, step, metadata, adapter_config):
    return f"""---
library_name: peft
base_model: {metadata["base_model"]}
tags: [peft, lora, sentence-transformers, feature-extraction, embedding, embedtrain]
pipeline_tag: feature-extraction
---
# LoRA adapter for a bidirectional Llama embedding model

Trained with embedtrain on `{metadata["base_model"]}` for {step} steps: rank {adapter_config["r"]}, alpha \
{adapter_config["lora_alpha"]}, dropout {adapter_config["lora_dropout"]}, on \
{", ".join(adapter_config["target_modules"])}.

The adapter only works on the base loaded **bidirectionally** (`{MODELING_FILE}`, shipped here): a plain
`AutoModel` on a Llama checkpoint is causal and gives other embeddings. Pooling `{metadata["pooling"]}`,
then L2 normalisation{"" if metadata["normalize"] else " (off for this model)"}; prompts: query \
`{metadata["default_query"]!r}`, document `{metadata["default_document"]!r}`.

```python
import torch
from peft import PeftModel
from embedtrain.model import load_backbone  # or LlamaBidirectionalModel from {MODELING_FILE}
base = load_backbone("{metadata["base_model"]}", pooling="{metadata["pooling"]}")
model = PeftModel.from_pretrained(base, "PATH").eval()
```

`embedtrain export RUN OUT` (without --adapter-only) writes the same model merged into the base, in
the released format (transformers and sentence-transformers load it without peft).
"""


def write_export(
    step_folder, base, tmp, dtype, max_shard_gb, adapter_only=False, base_model=None, keep_projection=False
):
    kind, settings = recorded_kind(base)  # the model kind, from its file in base_model (embedtrain.kinds)
    form = EXPORT_FORMATS[kind.export_format]
    run_config = yaml.safe_load((step_folder / "config.yaml").read_text())
    lora = (run_config.get("model") or {}).get("lora")
    projection = {} if keep_projection else None
    if keep_projection and (run_config.get("loss") or {}).get("distill") is None:
        raise CheckpointError(f"{step_folder} is not a distillation run (loss.distill is unset): no projection to keep")
    if keep_projection and lora is not None:
        raise CheckpointError(
            f"{step_folder}: --keep-projection is not supported for LoRA runs (the merged export reads the "
            "adapter, not the projection); export without it"
        )
    if adapter_only and lora is not None and form.held:
        raise CheckpointError(
            f"{step_folder}: --adapter-only is not supported for a LoRA run of model.kind={kind.name}: its "
            f"{', '.join(form.held)} is trained in full beside the adapter and peft's adapter folder has no place for "
            "it; export without --adapter-only (the adapter merged into the base, the head included)"
        )
    if lora is None and (adapter_only or base_model):
        raise CheckpointError(
            f"{step_folder} is not a LoRA run (model.lora is unset): --adapter-only and --base-model apply to LoRA "
            "runs only"
        )
    if adapter_only:  # the base's weights are not read: the folder names the base, peft loads it
        base_path = Path(base_model or run_config["model"]["path"])
        return write_adapter_export(step_folder, base, tmp, run_config, base_path)
    if lora is not None:  # the merged backbone, then the format's head trained beside the adapter
        head = [(name, tensor) for name, tensor in read_head(step_folder).items() if name in form.held]
        parameters = chain(merged_lora_parameters(step_folder, lora_base(run_config, base_model)), head)
    else:
        parameters = checkpoint_parameters(step_folder, projection)
    held = {}  # the format's `held` tensors (a multi-vector projection), kept out of the shards
    config = form.config(hf_config_dict(json.loads((base / "config.json").read_text())))
    config = write_model(form.names(divert(parameters, form.held, held)), config, tmp, dtype, max_shard_gb)
    policy = model_policy(base)
    metadata = {**policy.to_dict(), **(settings or {})}
    metadata["embedtrain_version"] = __version__  # which embedtrain wrote the folder (CHANGELOG.md)
    if projection is not None:
        metadata["projection"] = write_projection(tmp, projection, step_folder)
    (tmp / MODEL_METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
    for item in base.iterdir():
        if item.name not in ("config.json", "prompts.json", *kind_files()):
            shutil.copy(item, tmp / item.name)
    step = int(step_folder.name.split("_")[-1])
    form.files(tmp, config, run_config, step, policy, metadata, settings, **({"held": held} if form.held else {}))


def embedding_export_files(folder, config, run_config, step, policy, metadata, settings=None):
    """An embedding model's sentence-transformers files (Transformer -> Pooling -> Normalize, with
    the distilled student's Dense projection when kept) and its model card."""
    prompts = policy.sentence_transformers_prompts()
    sentence_transformers_files(
        folder, config, prompts, run_config["data"]["passage_max_length"], metadata.get("projection")
    )
    (folder / "README.md").write_text(model_card(config, run_config, step, prompts))


def cross_encoder_export_files(folder, config, run_config, step, policy, metadata, settings):
    """A reranker's CrossEncoder files (its pair template as the chat template, checked) and its
    model card; `settings`: its base_model/reranker.json."""
    cross_encoder_files(folder, settings)
    (folder / "README.md").write_text(reranker_model_card(config, run_config, step, settings))


@dataclass(frozen=True)
class ExportFormat:
    """How write_export writes one export format, which a model kind names (ModelKind.export_format,
    embedtrain.kinds): export.py sits above the kinds (tests/test_layers.py), so the writers live here.
    `names`: the checkpoint's (name, tensor) pairs -> the format's; `config`: the backbone's
    config.json dict -> the format's; `files`: (folder, config, run_config, step, prompt policy,
    metadata, the kind's base_model settings) -> its remaining files and model card. `held`: names of
    checkpoint tensors that are no backbone weight (a multi-vector model's projection): kept out of
    the shards and handed to `files` as held={name: tensor}."""

    names: object
    config: object
    files: object
    held: tuple = ()


def divert(named_tensors, names, into):
    """The (name, tensor) pairs less those whose name is in `names`, which go into the dict `into`."""
    for name, tensor in named_tensors:
        if name in names:
            into[name] = tensor
        else:
            yield name, tensor


def multi_vector_export_files(folder, config, run_config, step, policy, metadata, settings, held):
    """A multi-vector model's sentence-transformers MultiVectorEncoder modules (export_multi_vector.py:
    the projection as a Dense module, the skiplist, query expansion and lengths of its recorded
    settings, base_model/multi_vector.json), its embedtrain.json and model card."""
    if MULTI_VECTOR_HEAD not in held:
        raise CheckpointError(f"multi-vector export: no {MULTI_VECTOR_HEAD} in the checkpoint (not a multi-vector run)")
    multi_vector = MultiVectorSettings.from_dict(settings)
    write_multi_vector_files(folder, load_tokenizer(folder), held[MULTI_VECTOR_HEAD], multi_vector, policy)


EXPORT_FORMATS = {
    "sentence_transformer": ExportFormat(lambda named: named, lambda config: config, embedding_export_files),
    "cross_encoder": ExportFormat(reranker_names, reranker_config_dict, cross_encoder_export_files),
    "sparse": ExportFormat(masked_lm_names, masked_lm_config, sparse_export_files, held=(QUERY_TABLE_KEY,)),
    "multi_vector": ExportFormat(
        lambda named: named, lambda config: config, multi_vector_export_files, held=(MULTI_VECTOR_HEAD,)
    ),
}


def export_command(source, out, **options):
    """`embedtrain export`: export_checkpoint (same options) and a line saying where it went."""
    print(f"exported to {export_checkpoint(source, out, **options)}", flush=True)
