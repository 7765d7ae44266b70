"""Backbone families: one entry per decoder family embedtrain trains as a bidirectional encoder.

An entry says which config.json `model_type`s it reads, which transformers classes load it, the
bidirectional model class embedtrain trains (the family's model with BidirectionalDecoderMixin:
the same masks, positions and packing for every family), how it exports, and what it supports.
Adding a family is one entry here plus its tests (tests/test_families.py).

Llama exports as `llama_bidirec` with its modeling file (the released llama-embed-nemotron format).
The other families export as their stock `model_type` with `is_causal: false` and no remote code:
transformers (5.x) builds a bidirectional mask for them from that flag, which is how NeMo AutoModel
trains and NeMo Retriever serves such models. Sliding-window attention is turned off (embedtrain
attends over the whole sequence; the export records `sliding_window: null`).
"""

from dataclasses import dataclass

import transformers

from embedtrain.model.bidirectional import (
    BidirectionalDecoderMixin,
    LlamaBidirectionalConfig,
    LlamaBidirectionalModel,
)


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple  # config.json model_type values read as this family
    config_class: type
    model_class: type  # the bidirectional backbone embedtrain trains and encodes with
    architecture: str  # the `architectures` entry of an export
    stock_export: bool  # export as the stock model_type with is_causal false (no remote code)
    reranker: bool  # model.kind=reranker supported (its export format exists)
    liger: str | None  # liger_kernel.transformers function for model.liger_kernels (None: no Liger patch)


def stock_family(name, model_types, config_name, model_name, liger):
    """A family served by transformers' own classes, made bidirectional by the mixin."""
    config_class, base = getattr(transformers, config_name), getattr(transformers, model_name)
    model_class = type(
        f"{model_name.removesuffix('Model')}BidirectionalModel",
        (BidirectionalDecoderMixin, base),
        {"__doc__": f"transformers' {model_name}, bidirectional (embedtrain.model.families)."},
    )
    return Family(name, model_types, config_class, model_class, model_name, True, False, liger)


FAMILIES = (
    Family(
        "llama",
        ("llama", "llama_bidirec"),
        LlamaBidirectionalConfig,
        LlamaBidirectionalModel,
        "LlamaBidirectionalModel",
        stock_export=False,
        reranker=True,
        liger="apply_liger_kernel_to_llama",
    ),
    stock_family("mistral", ("mistral",), "MistralConfig", "MistralModel", "apply_liger_kernel_to_mistral"),
    stock_family("ministral", ("ministral",), "MinistralConfig", "MinistralModel", "apply_liger_kernel_to_ministral"),
    stock_family("ministral3", ("ministral3",), "Ministral3Config", "Ministral3Model", None),  # liger 0.8.5: none
    stock_family("qwen3", ("qwen3",), "Qwen3Config", "Qwen3Model", "apply_liger_kernel_to_qwen3"),
)
MODEL_TYPES = {model_type: family for family in FAMILIES for model_type in family.model_types}

# Vision-language checkpoints whose language model embedtrain trains (the vision tower and projector
# are not read): their config key holding the text model's config, and the regexes that map their
# weight names to the text model's. mistralai's Ministral 3 checkpoints are `mistral3` wrappers of a
# `ministral3` text model (NeMo AutoModel extracts the language model the same way).
WRAPPERS = {"mistral3": "text_config"}
WRAPPED_WEIGHTS = {r"^language_model\.model\.": "", r"^model\.language_model\.": ""}


def family_of(model_type):
    """The Family of a config.json model_type, or None."""
    return MODEL_TYPES.get(model_type)


def family_config(family, raw):
    """The family's config from a config.json dict, bidirectional (is_causal false), without
    sliding windows, keeping embedtrain's `pooling` (and Llama's `temperature`)."""
    dropped = ("auto_map", "architectures", "transformers_version", "dtype", "torch_dtype")
    raw = {k: v for k, v in raw.items() if k not in dropped}
    if family.stock_export:
        raw.pop("model_type", None)
        raw.update(is_causal=False, sliding_window=None, use_sliding_window=False)
        if raw.get("layer_types") is not None:
            raw["layer_types"] = ["full_attention"] * len(raw["layer_types"])
        raw.setdefault("pooling", "avg")
    return family.config_class(**raw)
