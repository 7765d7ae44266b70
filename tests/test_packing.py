"""Padding-free (packed) training batches give the loss and gradients of padded ones, for every
pooling mode and padding side (fp32, relative 1e-5); the fused forward is checked under DeepSpeed
against a plain step with padded batches; compiling the encoder changes nothing beyond tolerance.
Several packed rows give every sequence its embedding alone on every attention kernel that runs on
the CPU, flash_attention_2's contract included (through a CPU reference of it); the packed forward
reads nothing back to the host; segment-sum pooling equals padded pooling."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import run_worker
from embedtrain.config import ConfigError, load_config
from embedtrain.data.collate import Collator
from embedtrain.data.prepare import prepare
from embedtrain.data.shards import PreparedDataset
from embedtrain.model.encoder import load_tokenizer
from embedtrain.model.packing import pack_rows
from embedtrain.train.engine import build_encoder, build_engine
from embedtrain.train.step import contrastive_loss

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, demo_data):
    folder = tmp_path_factory.mktemp("packing") / "prepared"
    prepare(demo_data, folder)
    return PreparedDataset(folder)


def loss_and_grads(config, prepared, examples):
    torch.manual_seed(0)
    encoder = build_encoder(config, torch.float32)
    collator = Collator(load_tokenizer(config.model.path, config.model.padding_side), config.data, prepared.info)
    loss, _ = contrastive_loss(encoder, collator(examples), config.loss, "cpu")
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in encoder.named_parameters()}


@pytest.mark.parametrize(
    "pooling, side, negatives",
    [
        ("avg", "right", "local"),
        ("cls", "left", "group"),
        ("last", "left", "local"),
        ("weighted_avg", "right", "group"),
    ],
)
def test_a_packed_step_equals_a_padded_step(prepared, pooling, side, negatives):
    common = [
        f"model.pooling={pooling}",
        f"model.padding_side={side}",
        f"loss.negatives={negatives}",
        "train.activation_checkpointing=false",
        "data.pack_length=96",
    ]
    examples = [prepared.example(i, 3) for i in range(0, 40, 5)]
    padded_loss, padded = loss_and_grads(load_config("tiny", [*common, "data.packing=false"]), prepared, examples)
    packed_loss, packed = loss_and_grads(load_config("tiny", [*common, "data.packing=true"]), prepared, examples)
    assert abs(packed_loss - padded_loss) <= TOLERANCE * abs(padded_loss)
    for name, grad in padded.items():
        assert float((packed[name] - grad).norm() / grad.norm()) <= TOLERANCE, name


def test_packed_deepspeed_step_equals_plain_padded_step_on_two_ranks(tmp_path):
    """ZeRO-3, 2 ranks, global pool: one fused packed forward per micro-batch under DeepSpeed
    against the plain single-process step on padded batches of the whole global batch."""
    result, _ = run_worker(
        "grad_parity.py", tmp_path / "r.json", "--negatives", "global", "--reference-padded", nproc=2
    )
    assert abs(result["ds_loss"] - result["ref_loss"]) <= TOLERANCE * abs(result["ref_loss"])
    assert result["max_rel_error"] < TOLERANCE, result


def test_compiled_encoder_matches_plain_pytorch(tmp_path):
    """train.compile (DeepSpeed's engine.compile, dynamic shapes) on CPU under ZeRO-3: the same
    gradients as the plain eager step, within 1e-4 (inductor may reorder float sums)."""
    result, _ = run_worker("grad_parity.py", tmp_path / "r.json", "--compile", timeout=600)
    assert result["compiled"]
    assert result["max_rel_error"] < 1e-4, result


SEQUENCE_LENGTHS = (5, 17, 9, 30, 12, 3, 21)  # packed at 40 tokens: three rows of several sequences


def random_sequences(lengths=SEQUENCE_LENGTHS, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 1000, (n,), generator=generator).tolist() for n in lengths]


def padded_batch(sequences):
    width = max(len(s) for s in sequences)
    ids, mask = (
        torch.zeros(len(sequences), width, dtype=torch.long),
        torch.zeros(len(sequences), width, dtype=torch.long),
    )
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)], mask[row, : len(sequence)] = torch.tensor(sequence), 1
    return ids, mask


@pytest.fixture(scope="module")
def tiny_encoder(tiny_llama):
    from embedtrain.model import Encoder, load_backbone

    return Encoder(load_backbone(tiny_llama)).eval()


@pytest.mark.parametrize("kernel", ["mask", "varlen_reference", "flex"])
def test_packed_rows_equal_each_sequence_alone_on_every_cpu_kernel(tiny_encoder, kernel):
    """Three packed rows of several sequences on each kernel that runs on the CPU (sdpa's block mask,
    the varlen contract through a per-sequence reference, FlexAttention's forward with the document
    BlockMask): each sequence's embedding is its embedding encoded alone, for every pooling mode;
    and the start-up self-test passes on that kernel (two rows of three sequences)."""
    from embedtrain.model.encoder import causal_layouts

    sequences = random_sequences()
    packed = pack_rows(sequences, 40, pad_to_multiple_of=8)
    assert packed.input_ids.shape[0] >= 2 and packed.packed
    tiny_encoder.packed_kernel = kernel
    try:
        for pooling in ("avg", "cls", "last", "weighted_avg"):
            tiny_encoder.pooling = pooling
            with torch.no_grad():
                got = tiny_encoder(packed)
                alone = torch.cat(
                    [tiny_encoder(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in sequences]
                )
            assert float((got - alone).abs().max()) < 1e-5, pooling
        if kernel == "flex":  # CPU inductor fails to compile FlexAttention for a second (dynamic) shape
            torch._dynamo.reset()
        assert causal_layouts(tiny_encoder.backbone, packed_kernel=kernel) == []
    finally:
        tiny_encoder.packed_kernel, tiny_encoder.pooling = None, "avg"


def reference_flash(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' flash_attention_2 contract (modeling_flash_attention_utils._flash_attention_forward),
    on the CPU: a 2-D padding mask unpads; cu_seq_lens_q/k + max_length_q/k run the flattened rows as
    variable-length; without them the varlen layout is inferred from position ids ONLY for a one-row
    batch (_is_packed_sequence); otherwise every row runs dense attention."""
    from embedtrain.model.attention import reference_varlen

    batch, heads, length, dim = query.shape
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (B, L, H, D)
    gqa = heads != key.shape[1]
    cu = kwargs.get("cu_seq_lens_q")
    positions = kwargs.get("position_ids")
    if attention_mask is not None:  # padding: keys masked per row
        keep = attention_mask[:, None, None, :].bool()
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=keep, scale=scaling, enable_gqa=gqa)
        return out.transpose(1, 2), None
    if cu is None and positions is not None and batch == 1 and bool((positions[0].diff() < 0).any()):
        starts = (positions[0] == 0).nonzero().flatten().tolist() + [length]
        cu = torch.tensor(starts, dtype=torch.int32)
    if cu is not None:
        flat = [x.reshape(batch * length, x.shape[2], dim) for x in (q, k, v)]
        return reference_varlen(*flat, cu, None, scaling, gqa).view(batch, length, heads, dim), None
    out = F.scaled_dot_product_attention(query, key, value, scale=scaling, enable_gqa=gqa)  # dense per row
    return out.transpose(1, 2), None


@pytest.fixture
def flash_on_cpu():
    """flash_attention_2 served by reference_flash for the duration of a test."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS["flash_attention_2"] = reference_flash
    yield
    del ALL_ATTENTION_FUNCTIONS["flash_attention_2"]  # the local override: transformers' own again


def test_flash_attention_2_keeps_several_packed_rows_apart(tiny_llama, flash_on_cpu):
    """The multi-row flash leak: with several packed rows and no cu_seq_lens, transformers' flash path
    runs each row dense and tokens attend across the sequences packed beside them. embedtrain's
    packed path (EncoderInputs -> cu_seq_lens / max_length) and the exported model's own forward
    (sequence labels as the mask) must give every sequence its embedding encoded alone; and the
    start-up self-test must pass on this path and catch the leak when the boundaries are dropped."""
    from embedtrain.model import Encoder, load_backbone
    from embedtrain.model.encoder import causal_layouts
    from embedtrain.model.pooling import pool

    backbone = load_backbone(tiny_llama)
    backbone.config._attn_implementation = "flash_attention_2"
    encoder = Encoder(backbone).eval()
    sequences = random_sequences()
    packed = pack_rows(sequences, 40, pad_to_multiple_of=8)
    with torch.no_grad():
        alone = torch.cat([encoder(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in sequences])
        through_embedtrain = encoder(packed)
        # the exported model: labels as the mask, pooled per sequence
        states = backbone(input_ids=packed.input_ids, attention_mask=packed.attention_mask).last_hidden_state
        flat = states.flatten(0, 1)
        exported = torch.stack(
            [
                pool(flat[start : start + n][None], torch.ones(1, n), "avg")[0]
                for start, n in zip(packed.sequence_starts.tolist(), packed.sequence_lengths.tolist())
            ]
        )
    assert float((through_embedtrain - alone).abs().max()) < 1e-5
    assert float((F.normalize(exported, dim=-1) - alone).abs().max()) < 1e-5
    assert causal_layouts(backbone) == []

    def leaky(*args, **kwargs):  # the boundaries dropped: what embedtrain passed before
        for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
            kwargs.pop(key, None)
        return reference_flash(*args, **kwargs)

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS["flash_attention_2"] = leaky
    assert "packed (leaks across sequences)" in causal_layouts(backbone)


class HostCopies(TorchDispatchMode):
    """Counts the operations that copy a device value to the host (a sync on a GPU)."""

    SYNCING = {"aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::item"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.SYNCING:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_the_packed_forward_copies_nothing_to_the_host(tiny_encoder):
    """Forward and backward of a packed batch read no tensor value on the host (the layout is the
    EncoderInputs' fields); the same counter sees the padded path's mask check, so it can fail."""
    packed = pack_rows(random_sequences(), 40, pad_to_multiple_of=8)
    with HostCopies() as copies:
        tiny_encoder(packed).sum().backward()
    assert copies.count == 0
    tiny_encoder.zero_grad()
    with HostCopies() as copies, torch.no_grad():
        tiny_encoder(*padded_batch(random_sequences()))
    assert copies.count > 0


@pytest.mark.parametrize("pooling", ["avg", "cls", "last", "weighted_avg"])
def test_segment_pooling_equals_padded_pooling(pooling):
    """pool_packed (segment sums over the flattened tokens, no re-padding) against pool on the same
    token states padded, in fp32 from bf16 states."""
    from embedtrain.model.packing import pool_packed
    from embedtrain.model.pooling import pool

    sequences = random_sequences((7, 1, 30, 12, 3, 40, 18))
    packed = pack_rows(sequences, 48, pad_to_multiple_of=8)
    hidden_RWD = torch.randn(*packed.input_ids.shape, 16, generator=torch.Generator().manual_seed(1)).bfloat16()
    flat = hidden_RWD.flatten(0, 1)
    padded = torch.zeros(len(sequences), 40, 16, dtype=torch.bfloat16)
    mask = torch.zeros(len(sequences), 40, dtype=torch.long)
    for s, (start, n) in enumerate(zip(packed.sequence_starts.tolist(), packed.sequence_lengths.tolist())):
        padded[s, :n], mask[s, :n] = flat[start : start + n], 1
    got = pool_packed(hidden_RWD, packed, pooling)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, pool(padded, mask, pooling), rtol=1e-6, atol=1e-6)


def test_encoder_inputs_move_in_one_call_and_survive_workers():
    import pickle

    packed = pack_rows(random_sequences(), 40, pad_to_multiple_of=8)
    again = pickle.loads(pickle.dumps(packed))
    moved = again.to("cpu", non_blocking=True)
    assert moved.packed and moved.max_length == packed.max_length
    for name, tensor in packed.tensors().items():
        assert torch.equal(getattr(moved, name), tensor), name
    # every token is in exactly one segment: sequences and each row's padding
    assert int(packed.cu_seq_lens[-1]) == packed.input_ids.numel()


def test_flex_attention_training_on_cpu_is_refused():
    with pytest.raises(ConfigError, match="FlexAttention has no backward on the CPU"):
        build_engine(load_config("tiny", ["model.attn_implementation=flex_attention"]), {})
