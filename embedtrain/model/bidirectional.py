"""Bidirectional Llama backbone for embedding models.

This file is also the modeling file shipped inside every exported model (`auto_map` points at it),
so it must stay self-contained: it imports only torch and transformers, and it must stay
bidirectional on every transformers release from 4.44 to 5.x.

Why `forward` is overridden instead of a masking hook: the classic trick of overriding
`_update_causal_mask` silently stops working on transformers 5 (the method is gone and the model
runs causal again), and `config.is_causal = False` is only honoured from 5.2 on. Building the
attention mask here, and turning `is_causal` off on every attention module, works on all of them.
"""

import torch
from transformers import LlamaConfig, LlamaModel
from transformers.modeling_outputs import BaseModelOutputWithPast


class LlamaBidirectionalConfig(LlamaConfig):
    """A Llama config plus the two fields embedding consumers read: `pooling` and `temperature`.

    `pooling` is read by vLLM, SGLang and retriever services; `temperature` records the InfoNCE
    temperature the model was trained with.
    """

    model_type = "llama_bidirec"

    def __init__(self, pooling="avg", temperature=1.0, **kwargs):
        self.pooling = pooling
        self.temperature = temperature
        kwargs.pop("model_type", None)  # a plain Llama config dict carries "llama"
        kwargs.setdefault("is_causal", False)
        super().__init__(**kwargs)


def bidirectional_attention_mask(attention_mask_BL, dtype, attn_implementation):
    """The mask handed to every decoder layer: padding keys masked, no causal triangle.

    flash_attention_2 takes the 2-D padding mask (None when nothing is padded); sdpa and eager take
    an additive float mask broadcast over heads and queries, shape (B, 1, 1, L).
    """
    if attn_implementation == "flash_attention_2":
        return None if bool(attention_mask_BL.all()) else attention_mask_BL
    keep_B11L = attention_mask_BL[:, None, None, :].to(torch.bool)
    mask = torch.zeros(keep_B11L.shape, dtype=dtype, device=attention_mask_BL.device)
    return mask.masked_fill(~keep_B11L, torch.finfo(dtype).min)


def positions_from_mask(attention_mask_BL):
    """Position ids that start at 0 on the first real token, so left and right padding agree."""
    return (attention_mask_BL.long().cumsum(-1) - 1).clamp(min=0)


class LlamaBidirectionalModel(LlamaModel):
    """`LlamaModel` whose attention sees past and future tokens; only padding is masked."""

    config_class = LlamaBidirectionalConfig

    def __init__(self, config):
        super().__init__(config)
        for layer in self.layers:
            layer.self_attn.is_causal = False

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=inputs_embeds.device)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
        mask = bidirectional_attention_mask(
            attention_mask, inputs_embeds.dtype, getattr(self.config, "_attn_implementation", "sdpa")
        )
        hidden = inputs_embeds
        position_embeddings = self.rotary_emb(hidden, position_ids)
        for layer in self.layers[: self.config.num_hidden_layers]:
            out = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
            )
            hidden = out[0] if isinstance(out, tuple) else out  # 4.x layers return tuples
        hidden = self.norm(hidden)
        return BaseModelOutputWithPast(last_hidden_state=hidden)
