"""Which attention kernel runs a packed batch (model/packing.EncoderInputs), and the layer inputs
each kernel takes. Padded batches keep the backbone's own path (model/bidirectional.py).

`model.attn_implementation` keeps its meaning for the user; for packed rows it runs:

    sdpa               CPU: sdpa with the additive block mask (rows, 1, W, W): the reference path.
                       CUDA, bf16/fp16: torch.nn.attention.varlen.varlen_attn (torch's flash
                       kernel, no mask) on the rows flattened end to end; fp32 or a torch without
                       varlen_attn: FlexAttention with a document mask.
    flash_attention_2  flash-attn's flash_attn_varlen_func through transformers' flash path, given
                       cu_seq_lens_q/k and max_length_q/k explicitly (transformers infers them from
                       the position ids only for a one-row batch).
    flex_attention     FlexAttention with a document BlockMask built once per micro-batch from the
                       sequence labels (block tables only, never a W x W tensor), the row width
                       rounded up to a multiple of 128 so shapes repeat.
    eager              the additive block mask (a debugging reference).

Every varlen kernel sees the R x W tokens as one sequence cut at `cu_seq_lens` (each row's padding a
segment of its own), so rows never attend to each other. The kernel is chosen from the backbone's
config, the device and the dtype (host facts), never from tensor values.

The sdpa choice runs through `SDPA_VARLEN`, a function registered in transformers'
AttentionInterface that the backbone's config names (`install`): without the `varlen` keyword it
is transformers' sdpa exactly (padded batches, the exported model), with it a variable-length
kernel. The choice travels as layer keywords, so activation checkpointing's recompute takes the
same kernel. transformers does not write `_attn_implementation` into saved configs.
"""

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from embedtrain.model.bidirectional import BidirectionalDecoderMixin, bidirectional_attention_mask

SDPA_VARLEN = "embedtrain_sdpa"  # the backbone's attn implementation when the user chose sdpa
KERNELS = ("mask", "varlen", "varlen_reference", "flash", "flex")
FLEX_BLOCK = 128  # FlexAttention's block size: packed rows are padded to a multiple of it


def user_implementation(config):
    """model.attn_implementation as the user chose it (sdpa where `install` switched it)."""
    implementation = getattr(config, "_attn_implementation", None) or "sdpa"
    return "sdpa" if implementation == SDPA_VARLEN else implementation


def install(backbone):
    """Point an embedtrain sdpa backbone at SDPA_VARLEN (sdpa itself for every call without `varlen`)."""
    # a stock transformers model builds its own masks by the implementation's name: leave it be
    if isinstance(backbone, BidirectionalDecoderMixin) and backbone.config._attn_implementation == "sdpa":
        backbone.config._attn_implementation = SDPA_VARLEN


def varlen_available():
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def packs_in_one_row(attn_implementation, cuda=None):
    """Whether packed rows will run a variable-length kernel (choose_kernel gives all but "mask"):
    on CUDA under every implementation except eager. Then an encoder call may pack into one row
    (data.pack_length's default, data/collate.default_pack_length). A host fact, decided before the
    model is built."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return cuda and attn_implementation != "eager"


def choose_kernel(config, device, dtype):
    """The kernel for packed rows (KERNELS) under `config`'s attn implementation on `device` in `dtype`."""
    implementation = user_implementation(config)
    if implementation == "flash_attention_2":
        return "flash"
    if implementation == "flex_attention":
        return "flex"
    if implementation != "sdpa" or torch.device(device).type != "cuda":
        return "mask"
    if dtype in (torch.bfloat16, torch.float16) and varlen_available():
        return "varlen"
    return "flex"  # torch's flash kernel takes no fp32; FlexAttention does


def packed_states(backbone, inputs, kernel=None):
    """Last hidden states (R, W, D) of a packed EncoderInputs on the chosen kernel (None: choose_kernel)."""
    install(backbone)
    ids, labels, positions = inputs.input_ids, inputs.attention_mask, inputs.position_ids
    width = ids.shape[1]
    if kernel is None:
        kernel = choose_kernel(backbone.config, ids.device, backbone.embed_tokens.weight.dtype)
    if kernel not in KERNELS:
        raise ValueError(f"unknown packed attention kernel {kernel!r}; expected one of {', '.join(KERNELS)}")
    if kernel == "flex":  # one compiled shape per 128 tokens of width, not one per width
        bucket = -(-width // FLEX_BLOCK) * FLEX_BLOCK
        ids, labels, positions = (F.pad(t, (0, bucket - width)) for t in (ids, labels, positions))
    embeddings = backbone.embed_tokens(ids)
    kwargs = {}
    if kernel == "mask":
        layer_mask = bidirectional_attention_mask(labels, embeddings.dtype, "sdpa", packed=True)
    elif kernel == "flex":
        layer_mask = document_block_mask(labels)
    else:
        layer_mask = None
        kwargs = {
            "cu_seq_lens_q": inputs.cu_seq_lens,
            "cu_seq_lens_k": inputs.cu_seq_lens,
            "max_length_q": inputs.max_length,
            "max_length_k": inputs.max_length,
        }
        if kernel != "flash":
            if backbone.config._attn_implementation != SDPA_VARLEN:
                raise ValueError(f"the {kernel} kernel runs under attn_implementation=sdpa only")
            kwargs["varlen"] = kernel
    hidden = backbone.decode(embeddings, layer_mask, positions, **kwargs).last_hidden_state
    return hidden[:, :width]


def document_block_mask(labels_RW):
    """FlexAttention's BlockMask for packed rows whose width is a multiple of FLEX_BLOCK: a token
    attends to the tokens of its own sequence (a row's padding forms one more), built from block
    tables: (rows, n, n) booleans for n = W / 128 blocks, never the (W, W) mask."""
    from torch.nn.attention.flex_attention import BlockMask

    rows, width = labels_RW.shape
    # document number, non-decreasing along the row: the labels 1..n, then the padding
    document_RW = torch.where(labels_RW > 0, labels_RW, width + 1)
    first_RN, last_RN = document_RW[:, ::FLEX_BLOCK], document_RW[:, FLEX_BLOCK - 1 :: FLEX_BLOCK]
    touching_RNN = (first_RN[:, :, None] <= last_RN[:, None, :]) & (first_RN[:, None, :] <= last_RN[:, :, None])
    single_RN = first_RN == last_RN  # one document fills the block
    full_RNN = single_RN[:, :, None] & single_RN[:, None, :] & (first_RN[:, :, None] == first_RN[:, None, :])
    partial_RNN = touching_RNN & ~full_RNN

    def tables(blocks_RNN):
        count = blocks_RNN.sum(-1, dtype=torch.int32)[:, None]
        order = torch.argsort(blocks_RNN.to(torch.int8), dim=-1, descending=True, stable=True)
        return count, order.to(torch.int32)[:, None]

    def same_document(b, h, q, kv):
        return document_RW[b, q] == document_RW[b, kv]

    return BlockMask.from_kv_blocks(
        *tables(partial_RNN),
        *tables(full_RNN),
        BLOCK_SIZE=FLEX_BLOCK,
        mask_mod=same_document,
        seq_lengths=(width, width),
    )


def sdpa_or_varlen(module, query, key, value, attention_mask, scaling=None, dropout=0.0, varlen=None, **kwargs):
    """SDPA_VARLEN: transformers' sdpa, or with `varlen` ("varlen": torch's varlen_attn;
    "varlen_reference": a per-sequence sdpa loop that runs on the CPU) variable-length attention over
    the rows flattened end to end, cut at cu_seq_lens_q; a BlockMask goes to FlexAttention."""
    if varlen is None:
        from torch.nn.attention.flex_attention import BlockMask

        name = "flex_attention" if isinstance(attention_mask, BlockMask) else "sdpa"
        return ALL_ATTENTION_FUNCTIONS[name](
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    batch, heads, length, head_dim = query.shape
    q, k, v = (x.transpose(1, 2).reshape(batch * length, x.shape[1], head_dim) for x in (query, key, value))
    cu, longest = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
    attend = torch_varlen if varlen == "varlen" else reference_varlen
    out = attend(q, k, v, cu, longest, scaling, enable_gqa=q.shape[1] != k.shape[1])
    return out.view(batch, length, heads, head_dim), None


def torch_varlen(q, k, v, cu, longest, scale, enable_gqa):
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale, enable_gqa=enable_gqa)


def reference_varlen(q, k, v, cu, longest, scale, enable_gqa):
    """varlen_attn's contract with sdpa per segment (T, H, D). Reads cu on the host: a reference
    for tests and the CPU, not a fast path."""
    out = []
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        segment = [x[start:end].transpose(0, 1) for x in (q, k, v)]
        out.append(F.scaled_dot_product_attention(*segment, scale=scale, enable_gqa=enable_gqa).transpose(0, 1))
    return torch.cat(out)


AttentionInterface.register(SDPA_VARLEN, sdpa_or_varlen)
