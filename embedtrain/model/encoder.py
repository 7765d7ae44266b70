"""Encoder: a token batch -> L2-normalised fp32 embeddings; plus loading any family's checkpoint and its
tokenizer. The module knows nothing of prompts or exported folders: embedtrain.inference holds it
with its tokenizer and prompts for users."""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from embedtrain.errors import ModelError
from embedtrain.model import attention
from embedtrain.model.bidirectional import BidirectionalDecoderMixin
from embedtrain.model.families import MODEL_TYPES, WRAPPED_WEIGHTS, WRAPPERS, family_config, family_of
from embedtrain.model.packing import EncoderInputs, layout, padded_inputs, pool_packed
from embedtrain.model.pooling import POOLING_MODES, pool


class Encoder(nn.Module):
    """Shared-weight encoder for queries and passages.

    forward(inputs) -> embeddings_SD, fp32, unit length when `normalize`: `inputs` is an
    EncoderInputs (model/packing.py; padded, or packed with one embedding per sequence in input
    order), or a (B, L) id tensor with its 0/1 padding mask as the second argument.
    `packed_kernel`: None chooses the attention kernel of packed batches (model/attention.py); a
    name from attention.KERNELS forces one (tests).
    """

    def __init__(self, backbone, pooling="avg", normalize=True):
        super().__init__()
        if pooling not in POOLING_MODES:
            raise ValueError(f"model.pooling: unknown mode {pooling!r}; expected one of {', '.join(POOLING_MODES)}")
        self.backbone = backbone
        self.pooling = pooling
        self.normalize = normalize
        self.packed_kernel = None
        attention.install(backbone)

    @property
    def width(self):
        """The width of the embeddings forward returns."""
        return self.backbone.config.hidden_size

    def forward(self, input_ids, attention_mask=None):
        embeddings_BD = self.pooled(input_ids, attention_mask)
        return F.normalize(embeddings_BD, dim=-1) if self.normalize else embeddings_BD

    def pooled(self, input_ids, attention_mask=None):
        """The pooled hidden states, before normalisation. The layout is read from the EncoderInputs'
        `packed` field, never from tensor values: a packed batch runs on its varlen kernel and is
        pooled by segment sums, a padded one as the exported model runs it."""
        inputs = input_ids if isinstance(input_ids, EncoderInputs) else padded_inputs(input_ids, attention_mask)
        if inputs.packed:
            hidden_RWD = attention.packed_states(self.backbone, inputs, self.packed_kernel)
            return pool_packed(hidden_RWD, inputs, self.pooling)
        mask_BL = inputs.attention_mask
        if mask_BL is None:
            mask_BL = torch.ones_like(inputs.input_ids)
        hidden_BLD = self.backbone(input_ids=inputs.input_ids, attention_mask=mask_BL, packed=False).last_hidden_state
        return pool(hidden_BLD, mask_BL, self.pooling)


def load_tokenizer(path, padding_side="right"):
    """The checkpoint's tokenizer with a pad token: Llama has none, training uses eos as pad."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"model.path: the tokenizer in {path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def read_model_config(path):
    """The checkpoint's config as its family's bidirectional config (embedtrain.model.families);
    errors name the path and the problem."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"model.path: {path} is not a model folder (no config.json)")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ModelError(f"model.path: {config_file} is not valid JSON: {err}") from err
    if raw.get("model_type") in WRAPPERS:  # a vision-language checkpoint: its language model
        raw = dict(raw[WRAPPERS[raw["model_type"]]])
    family = family_of(raw.get("model_type"))
    if family is None:
        raise ModelError(
            f"model.path: {path} is not a checkpoint of a supported family (config.json model_type="
            f"{raw.get('model_type')!r}; supported: {', '.join(MODEL_TYPES)})"
        )
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelError(f"model.path: {path} has a config.json but no weights (*.safetensors or *.bin)")
    return family_config(family, raw)


def is_wrapper(path):
    """Whether the checkpoint at `path` is a vision-language wrapper (families.WRAPPERS)."""
    return json.loads((Path(path) / "config.json").read_text()).get("model_type") in WRAPPERS


def load_backbone(path, dtype=torch.float32, attn_implementation="sdpa", pooling=None):
    """Load a checkpoint folder of any supported family (a causal LM, its base model or an embedtrain
    export) as a bidirectional backbone. Missing backbone weights are an error, not a random init."""
    config = read_model_config(path)
    if pooling is not None:
        config.pooling = pooling
    # transformers reports the keys it does not use (a causal LM's lm_head, a reranker's score head)
    # as a warning; they are expected here, and missing keys are checked below
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = family_of(config.model_type).model_class.from_pretrained(
            path,
            config=config,
            dtype=dtype,
            attn_implementation=attn_implementation,
            output_loading_info=True,
            key_mapping=WRAPPED_WEIGHTS if is_wrapper(path) else None,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ModelError(
            f"model.path: {path} lacks backbone weights: {', '.join(missing[:5])}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    return model


LAYOUTS = ("full", "padded", "packed")  # the batch layouts training and encoding hand the backbone

# the packed self-test: two rows of three sequences each (token counts), every one checked
PACKED_ROWS = ((5, 2, 4), (3, 6, 2))
ALONE_COSINE = 0.99  # a sequence's states packed against alone: bf16 rounding stays far above it


@torch.no_grad()
def causal_layouts(backbone, vocab_size=None, length=8, packed_kernel=None):
    """The batch layouts on which the backbone's attention stayed causal (empty: bidirectional on all;
    "packed (leaks across sequences)" when a packed sequence sees another, "packed (differs from the
    sequence alone)" when its states are not those it has encoded alone).

    Each layout changes the last real token of the first sequence and checks that the first token's
    output state changes (a causal model's first position never sees later tokens): "full" (no
    padding: on transformers 5 no mask is passed, so the attention modules' is_causal decides),
    "padded" (right padding, a padding mask), "packed" (only for embedtrain's bidirectional
    backbones: PACKED_ROWS, two rows of three sequences, on the kernel packed training batches get,
    model/attention.py; `packed_kernel` forces one). Runs on the device of the embeddings; under
    ZeRO-3 every rank must call it together.
    """
    vocab_size = vocab_size or backbone.config.vocab_size
    device = backbone.embed_tokens.weight.device
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (1, length), generator=generator).to(device)
    cases = {
        "full": (torch.ones_like(ids), length - 1),
        "padded": (torch.tensor([[1] * (length - 2) + [0, 0]], device=device), length - 3),
    }
    was_training = backbone.training
    backbone.eval()
    causal = []
    for layout_name, (mask, position) in cases.items():
        changed = ids.clone()
        changed[0, position] = (ids[0, position] + 1) % vocab_size
        states = backbone(input_ids=ids, attention_mask=mask).last_hidden_state[0].float()
        states_changed = backbone(input_ids=changed, attention_mask=mask).last_hidden_state[0].float()
        if torch.allclose(states[0], states_changed[0], rtol=0, atol=1e-6):
            causal.append(layout_name)
    if isinstance(backbone, BidirectionalDecoderMixin):  # sequence labels are embedtrain's own format
        causal += packed_failures(backbone, vocab_size, generator, packed_kernel)
    backbone.train(was_training)
    return causal


def packed_failures(backbone, vocab_size, generator, kernel=None):
    """causal_layouts' packed entries (see there) for PACKED_ROWS on `kernel` (None: the chosen one)."""
    device = backbone.embed_tokens.weight.device
    lengths = [n for row in PACKED_ROWS for n in row]
    sequences = [torch.randint(0, vocab_size, (n,), generator=generator).tolist() for n in lengths]
    rows, start = [], 0
    for row in PACKED_ROWS:
        rows.append(list(range(start, start + len(row))))
        start += len(row)

    def states(sequences):  # per sequence, its token states (n, D) in fp32
        inputs = layout(sequences, rows, multiple=8)
        flat = attention.packed_states(backbone, inputs.to(device), kernel).flatten(0, 1).float()
        return [flat[s : s + n] for s, n in zip(inputs.sequence_starts.tolist(), lengths)]

    packed = states(sequences)
    changed_sequences = [list(s) for s in sequences]
    changed_sequences[0][-1] = (changed_sequences[0][-1] + 1) % vocab_size
    changed = states(changed_sequences)
    failures = []
    if torch.allclose(packed[0][0], changed[0][0], rtol=0, atol=1e-6):
        failures.append("packed")
    if any(not torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(packed[1:], changed[1:])):
        failures.append("packed (leaks across sequences)")  # another sequence saw the change
    for sequence, got in zip(sequences, packed):  # alone, with one padding token: an explicit mask
        ids = torch.tensor([sequence + [0]], device=device)
        mask = torch.tensor([[1] * len(sequence) + [0]], device=device)
        alone = backbone(input_ids=ids, attention_mask=mask, packed=False).last_hidden_state[0, :-1]
        if float(F.cosine_similarity(got, alone.float(), dim=-1).min()) < ALONE_COSINE:
            failures.append("packed (differs from the sequence alone)")
            break
    return failures


def attention_is_bidirectional(backbone, vocab_size=None, length=8):
    """True when no layout stays causal (causal_layouts)."""
    return not causal_layouts(backbone, vocab_size, length)


def check_bidirectional(backbone):
    """Start-up self-check: fail loudly rather than train a silently causal model."""
    causal = causal_layouts(backbone)
    if causal:
        import transformers

        implementation = attention.user_implementation(backbone.config)
        raise RuntimeError(
            f"attention is causal on the {', '.join(causal)} path(s) of {type(backbone).__name__} "
            f"(attn_implementation={implementation}, transformers {transformers.__version__}): changing a later "
            "token did not change the first token's output (or, packed, changed another sequence's), so the "
            "bidirectional mask was not applied there. "
            "Use another model.attn_implementation or transformers version, or check the family's entry in "
            "embedtrain/model/families.py."
        )
