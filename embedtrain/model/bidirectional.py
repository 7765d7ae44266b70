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
import transformers
from torch import nn
from transformers import LlamaConfig, LlamaModel, LlamaPreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, MaskedLMOutput, SequenceClassifierOutput

# transformers 5's attention functions read is_causal from the module when no mask is given
MASKLESS_IS_BIDIRECTIONAL = int(transformers.__version__.split(".")[0]) >= 5


class LlamaBidirectionalConfig(LlamaConfig):
    """A Llama config plus the two fields embedding consumers read: `pooling` and `temperature`.

    `pooling` is read by vLLM, SGLang and retriever services; `temperature` records the InfoNCE
    temperature the model was trained with.
    """

    model_type = "llama_bidirec"

    def __init__(self, pooling="avg", temperature=1.0, **kwargs):
        kwargs.pop("model_type", None)  # a plain Llama config dict carries "llama"
        kwargs.setdefault("is_causal", False)
        super().__init__(**kwargs)
        # after the base __init__: transformers 4.x sets the generation default temperature=1.0 there
        self.pooling = pooling
        self.temperature = temperature

    # `temperature` is the training temperature that embedding consumers read, not a sampling
    # setting: keep transformers' save_pretrained from refusing it as a generation parameter.
    def _get_generation_parameters(self):
        found = getattr(super(), "_get_generation_parameters", dict)()
        found.pop("temperature", None)
        return found

    def _get_non_default_generation_parameters(self):  # the same check in transformers 4.x
        found = getattr(super(), "_get_non_default_generation_parameters", dict)()
        found.pop("temperature", None)
        return found


def bidirectional_attention_mask(attention_mask_BL, dtype, attn_implementation, packed=None):
    """The mask handed to every decoder layer: padding keys masked, no causal triangle.

    `attention_mask_BL` is 0 on padding and 1 on tokens, or, in a padding-free (packed) row, the
    number 1, 2, ... of the sequence each token belongs to: tokens then attend only within their
    own sequence. flash_attention_2 takes the 2-D padding mask (None when nothing is padded), and
    None for packed rows (transformers then runs variable-length attention from the position ids,
    which restart at each sequence; the model's forward runs several packed rows as one, since
    transformers infers this for a single row only). sdpa and eager take an additive float mask, (B, 1, 1, L) for
    padding and (B, 1, L, L) for packed rows. A batch without padding gets no mask on transformers
    5, whose attention functions honour the modules' is_causal=False (and a maskless call lets the
    GPU run its flash kernel); transformers 4.x treats a missing mask as causal, so there it gets
    zeros.
    """
    if packed is None:
        packed = bool((attention_mask_BL > 1).any())
    if attn_implementation == "flash_attention_2":
        return None if packed or bool(attention_mask_BL.all()) else attention_mask_BL
    if attn_implementation == "flex_attention":
        return sequence_block_mask(attention_mask_BL)
    if not packed and MASKLESS_IS_BIDIRECTIONAL and bool(attention_mask_BL.all()):
        return None
    if packed:
        same_BLL = attention_mask_BL[:, :, None] == attention_mask_BL[:, None, :]
        keep = (same_BLL & (attention_mask_BL[:, None, :] > 0)).unsqueeze(1)
    else:
        keep = attention_mask_BL[:, None, None, :].to(torch.bool)
    mask = torch.zeros(keep.shape, dtype=dtype, device=attention_mask_BL.device)
    return mask.masked_fill(~keep, torch.finfo(dtype).min)


def sequence_block_mask(attention_mask_BL):
    """FlexAttention's BlockMask for a padded or packed batch: a token attends to the tokens of its
    own sequence (the same label, above 0), in both directions; blocks with no such pair are
    skipped, so a packed row costs the sum of its sequences' squared lengths, not the row's. A
    padding position attends to itself only (its output is never used)."""
    from torch.nn.attention.flex_attention import create_block_mask

    labels_BL = attention_mask_BL.long()

    def same_sequence(b, h, q, kv):
        return ((labels_BL[b, q] == labels_BL[b, kv]) & (labels_BL[b, kv] > 0)) | (q == kv)

    batch, length = labels_BL.shape
    return create_block_mask(same_sequence, batch, None, length, length, device=labels_BL.device)


def positions_from_mask(attention_mask_BL, packed=None):
    """Position ids that start at 0 on the first real token, so left and right padding agree; in a
    packed row they restart at 0 at the first token of each sequence."""
    if packed is None:
        packed = bool((attention_mask_BL > 1).any())
    if not packed:
        return (attention_mask_BL.long().cumsum(-1) - 1).clamp(min=0)
    index = torch.arange(attention_mask_BL.shape[-1], device=attention_mask_BL.device).expand_as(attention_mask_BL)
    previous = torch.nn.functional.pad(attention_mask_BL, (1, 0), value=0)[..., :-1]
    starts = (attention_mask_BL != previous) & (attention_mask_BL > 0)
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=-1).values
    return (index - start_index) * (attention_mask_BL > 0)


# --- pooling: token states (B, L, D) + padding mask (B, L) -> one vector per sequence (B, D), fp32.
# Every mode reads the mask, never the padding side, so left- and right-padded batches pool the same.

POOLING_MODES = ("avg", "cls", "last", "weighted_avg")


def first_token_index(mask_BL):
    """Index of the first non-padding token of each row (left padding puts it past 0)."""
    return mask_BL.to(torch.int64).argmax(dim=-1)


def last_token_index(mask_BL):
    """Index of the last non-padding token of each row (right padding puts it before L-1)."""
    length = mask_BL.shape[-1]
    return length - 1 - mask_BL.to(torch.int64).flip(-1).argmax(dim=-1)


def position_weights(mask_BL):
    """weighted_avg weights: w_i = p_i / sum_j p_j with p_i = 1..n the position among real tokens.

    Later tokens have seen more of the text in a causal model's pre-training, so they weigh more
    (SGPT's position-weighted mean). Padding gets weight 0; each row sums to 1.
    """
    mask = mask_BL.to(torch.float32)
    positions = mask.cumsum(dim=-1) * mask
    return positions / positions.sum(dim=-1, keepdim=True).clamp(min=1.0)


def pool(hidden_BLD, mask_BL, mode="avg"):
    """Pool token states into sequence vectors, in fp32.

    avg:          mean over non-padding tokens.
    cls:          the first non-padding token.
    last:         the last non-padding token.
    weighted_avg: sum_i w_i h_i with the weights of `position_weights`.
    """
    hidden = hidden_BLD.to(torch.float32)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if mode == "avg":
        mask = mask_BL.to(torch.float32).unsqueeze(-1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    if mode == "cls":
        return hidden[rows, first_token_index(mask_BL)]
    if mode == "last":
        return hidden[rows, last_token_index(mask_BL)]
    if mode == "weighted_avg":
        return (hidden * position_weights(mask_BL).unsqueeze(-1)).sum(dim=1)
    raise ValueError(f"unknown pooling mode {mode!r}; expected one of {', '.join(POOLING_MODES)}")


class BidirectionalDecoderMixin:
    """Makes a Llama-shaped decoder stack (embed_tokens, rotary_emb, layers, norm; transformers'
    Llama, Mistral, Ministral3, Qwen3 models) bidirectional: its attention sees past and future
    tokens; only padding, or in a packed row the other sequences, is masked. Put it before the
    transformers model class: `class XBidirectionalModel(BidirectionalDecoderMixin, XModel)`."""

    def __init__(self, config):
        config.is_causal = False
        super().__init__(config)
        for layer in self.layers:
            layer.self_attn.is_causal = False

    def forward(
        self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, packed=None, **kwargs
    ):
        """`packed`: whether `attention_mask` holds sequence labels (a padding-free batch); None reads
        it from the mask, which costs a device-to-host sync on a GPU."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=inputs_embeds.device)
        if packed is None:
            packed = bool((attention_mask > 1).any())
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, packed)
        implementation = getattr(self.config, "_attn_implementation", "sdpa")
        mask = bidirectional_attention_mask(attention_mask, inputs_embeds.dtype, implementation, packed)
        if packed and implementation == "flash_attention_2" and batch > 1:
            # transformers infers variable-length attention from the position ids only for ONE row:
            # run the rows end to end as one (positions restart at each sequence and padding token)
            out = self.decode(inputs_embeds.reshape(1, batch * length, -1), mask, position_ids.reshape(1, -1))
            return BaseModelOutputWithPast(last_hidden_state=out.last_hidden_state.reshape(batch, length, -1))
        return self.decode(inputs_embeds, mask, position_ids)

    def decode(self, inputs_embeds, layer_mask, position_ids, **attention_kwargs):
        """The decoder stack on prepared inputs: `layer_mask` is handed to every layer as its attention
        mask and `attention_kwargs` to every layer, which passes them on to the attention function
        (transformers' flash path reads cu_seq_lens_q/k and max_length_q/k there)."""
        hidden = inputs_embeds
        position_embeddings = self.rotary_emb(hidden, position_ids)
        for layer in self.layers[: self.config.num_hidden_layers]:
            out = layer(
                hidden,
                attention_mask=layer_mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                **attention_kwargs,
            )
            hidden = out[0] if isinstance(out, tuple) else out  # 4.x layers return tuples
        hidden = self.norm(hidden)
        return BaseModelOutputWithPast(last_hidden_state=hidden)


class LlamaBidirectionalModel(BidirectionalDecoderMixin, LlamaModel):
    """`LlamaModel` whose attention sees past and future tokens; only padding is masked."""

    config_class = LlamaBidirectionalConfig


class LlamaBidirectionalForSequenceClassification(LlamaPreTrainedModel):
    """Cross-encoder (reranker): the bidirectional backbone reads a (query, passage) pair as one
    sequence, its states are pooled (`config.pooling`), a linear head without bias maps them to
    `config.num_labels` logits (1: a relevance score), divided by `config.temperature`."""

    config_class = LlamaBidirectionalConfig

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = LlamaBidirectionalModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def forward(
        self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None, **kwargs
    ):
        hidden_BLD = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds
        ).last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones(hidden_BLD.shape[:2], dtype=torch.long, device=hidden_BLD.device)
        pooled_BD = pool(hidden_BLD, attention_mask, self.config.pooling)
        logits = self.score(pooled_BD.to(self.score.weight.dtype)) / self.config.temperature
        loss = None
        if labels is not None:  # one relevance target per pair (num_labels 1), as transformers' regression
            loss = nn.functional.mse_loss(logits.squeeze(-1).float(), labels.float())
        return SequenceClassifierOutput(loss=loss, logits=logits)


class LlamaBidirectionalForMaskedLM(LlamaPreTrainedModel):
    """Sparse lexical (SPLADE) model as a fill-mask model: every token's vocabulary logits, the
    bidirectional backbone's states through the LM head. sentence-transformers' SparseEncoder loads it
    (AutoModelForMaskedLM) and max-pools log(1 + relu(logit)) over the tokens (SpladePooling).

    With `config.tie_word_embeddings` the head IS the input embedding matrix (no lm_head weight
    stored); the logits are computed from it directly rather than through transformers' weight
    tying, whose declaration differs between 4.x and 5.x."""

    config_class = LlamaBidirectionalConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaBidirectionalModel(config)
        if not getattr(config, "tie_word_embeddings", False):
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def head_weight(self):
        return (
            self.model.embed_tokens.weight
            if getattr(self.config, "tie_word_embeddings", False)
            else self.lm_head.weight
        )

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        hidden_BLD = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds
        ).last_hidden_state
        weight = self.head_weight()
        return MaskedLMOutput(logits=nn.functional.linear(hidden_BLD.to(weight.dtype), weight))
