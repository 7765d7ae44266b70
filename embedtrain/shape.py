"""A decoder's size from its config.json: parameter counts (with and without the lm_head, LoRA
adapters) and training FLOPs per token. Pure arithmetic, no torch: `embedtrain plan`, the training
loop's FLOPs counter and tools/bench.py read it."""

from dataclasses import dataclass

# the config.json keys every family's shape needs (num_key_value_heads may be left to the family default)
CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# What a config.json leaves out, per family: the defaults of transformers' config classes (5.x:
# LlamaConfig, MistralConfig, MinistralConfig, Ministral3Config, Qwen3Config). head_dim None and
# num_key_value_heads None mean hidden / heads and every head. llama_bidirec is embedtrain's (and the
# released llama-embed-nemotron's) bidirectional Llama; mistral3 is the vision-language wrapper of
# Ministral 3 checkpoints, whose text model is read from its text_config.
FAMILY_DEFAULTS = {
    "llama": dict(head_dim=None, num_key_value_heads=None, qk_norm=False),
    "llama_bidirec": dict(head_dim=None, num_key_value_heads=None, qk_norm=False),
    "mistral": dict(head_dim=None, num_key_value_heads=8, qk_norm=False),
    "ministral": dict(head_dim=None, num_key_value_heads=8, qk_norm=False),
    "ministral3": dict(head_dim=128, num_key_value_heads=8, qk_norm=False),
    "qwen3": dict(head_dim=128, num_key_value_heads=32, qk_norm=True),
}


@dataclass
class Shape:
    """A decoder's size: Llama, Mistral/Ministral/Ministral3 and Qwen3 are the same block (RMSNorm,
    grouped-query attention, SwiGLU MLP) apart from head_dim (Qwen3 and Ministral3 set it, so q_proj
    maps hidden to heads x head_dim, which need not be hidden), Qwen3's q_norm and k_norm, and
    biases (Llama's attention_bias / mlp_bias, off in every released checkpoint here). `params` is
    the backbone an embedding model keeps: no lm_head; `causal_lm_params` adds the lm_head unless
    tied to the embeddings (what model cards count)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None  # None: hidden_size // num_attention_heads (Llama, Mistral)
    qk_norm: bool = False  # Qwen3: RMSNorm(head_dim) on queries and on keys in every layer
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @classmethod
    def from_config(cls, raw):
        """The shape of a config.json dict of a supported family (FAMILY_DEFAULTS); a Mistral3
        vision-language config is read through its text_config."""
        if raw.get("model_type") == "mistral3" and isinstance(raw.get("text_config"), dict):
            text = raw["text_config"]
            if text.get("tie_word_embeddings") is None and raw.get("tie_word_embeddings") is not None:
                text = {**text, "tie_word_embeddings": raw["tie_word_embeddings"]}
            raw = text
        model_type = raw.get("model_type")
        if model_type not in FAMILY_DEFAULTS:
            raise ValueError(
                f"config.json model_type {model_type!r} is not a family plan knows "
                f"({', '.join([*FAMILY_DEFAULTS, 'mistral3'])})"
            )
        defaults = FAMILY_DEFAULTS[model_type]
        missing = [k for k in CONFIG_KEYS if raw.get(k) is None]
        if missing:
            raise ValueError(f"config.json ({model_type}) lacks {', '.join(missing)}")

        def read(key, default):
            return raw[key] if raw.get(key) is not None else default

        kv_heads = read("num_key_value_heads", defaults["num_key_value_heads"])
        return cls(
            **{k: raw[k] for k in CONFIG_KEYS},
            num_key_value_heads=kv_heads if kv_heads is not None else raw["num_attention_heads"],
            head_dim=read("head_dim", defaults["head_dim"]),
            qk_norm=defaults["qk_norm"],
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
        )

    @property
    def attention_width(self):
        """Width of the queries, and of the attention output before o_proj: heads x head_dim."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_width(self):
        return self.num_key_value_heads * self.head_dim

    @property
    def layer_params(self):
        h, q, kv, i = self.hidden_size, self.attention_width, self.kv_width, self.intermediate_size
        params = 2 * h * q + 2 * h * kv + 3 * h * i + 2 * h  # q, o; k, v; gate, up, down; two RMSNorms
        if self.qk_norm:
            params += 2 * self.head_dim
        if self.attention_bias:
            params += q + 2 * kv + h
        if self.mlp_bias:
            params += 2 * i + h
        return params

    @property
    def non_embedding_params(self):
        return self.num_hidden_layers * self.layer_params + self.hidden_size

    @property
    def params(self):
        return self.non_embedding_params + self.vocab_size * self.hidden_size

    @property
    def causal_lm_params(self):
        """The causal language model's count: the backbone plus an lm_head unless it is tied."""
        return self.params + (0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size)

    @property
    def largest_layer_params(self):
        return max(self.layer_params, self.vocab_size * self.hidden_size)

    def projection_shapes(self):
        """(in, out) features of each linear projection of a decoder layer, by module name."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.attention_width, self.kv_width
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def lora_params(self, lora):
        """Adapter parameters of a resolved model.lora: A (r x in) and B (out x r) per targeted
        projection and layer; 0 without LoRA."""
        if not lora:
            return 0
        shapes = self.projection_shapes()
        return self.num_hidden_layers * lora["r"] * sum(sum(shapes[name]) for name in lora["target_modules"])

    def flops_per_token(self, length, lora=None):
        """Training FLOPs per token of a sequence of `length`: forward 2 N + 4 L A length, backward
        twice that (gradients of activations and of weights); A = heads x head_dim, the width of
        QK^T and of the attention-weighted values (the hidden size for Llama). With LoRA the frozen
        base needs no weight gradients: 4 N + 6 N_lora + 12 L A length (N: non-embedding parameters)."""
        attention = 12 * self.num_hidden_layers * self.attention_width * length
        if not lora:
            return 6 * self.non_embedding_params + attention
        return 4 * self.non_embedding_params + 6 * self.lora_params(lora) + attention

    def training_flops(self, real_tokens, squared_lengths, lora=None):
        """Model FLOPs of training on sequences holding `real_tokens` tokens in all, whose lengths'
        squares sum to `squared_lengths` (forward and backward, no recompute, padding not counted):
        sum over sequences of n x flops_per_token(n) = flops_per_token(0) x tokens + 12 L A x sum n^2.
        The one FLOP accounting of the training log's MFU, `plan` and tools/bench.py."""
        attention = 12 * self.num_hidden_layers * self.attention_width * squared_lengths
        return self.flops_per_token(0, lora) * real_tokens + attention

    def forward_flops_per_token(self, length, lora=None):
        """FLOPs of one forward per token (what activation checkpointing and GradCache repeat)."""
        attention = 4 * self.num_hidden_layers * self.attention_width * length
        return 2 * (self.non_embedding_params + self.lora_params(lora)) + attention
