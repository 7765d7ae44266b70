"""Padding-free (packed) training batches give the loss and gradients of padded ones, for every
pooling mode and padding side (fp32, relative 1e-5); the fused forward is checked under DeepSpeed
against a plain step with padded batches; compiling the encoder changes nothing beyond tolerance."""

import pytest
import torch

from conftest import run_worker
from embedtrain.config import ConfigError, load_config
from embedtrain.data.collate import Collator
from embedtrain.data.prepare import prepare
from embedtrain.data.shards import PreparedDataset
from embedtrain.model.encoder import load_tokenizer
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


def test_flex_attention_equals_sdpa_on_packed_and_padded_batches(tiny_llama):
    """model.attn_implementation=flex_attention: a block-sparse mask (a packed row costs its
    sequences' attention, not the row's), with the embeddings of sdpa's block mask. Forward only:
    FlexAttention has no backward on the CPU (tests/test_gpu.py compares gradients on CUDA)."""
    from embedtrain.model import BiEncoder, load_backbone
    from embedtrain.model.packing import pack_rows

    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(3, 1000, (n,), generator=generator).tolist() for n in (5, 17, 9, 30, 12)]
    packed = pack_rows(sequences, 40, pad_to_multiple_of=8)
    padded = torch.zeros(len(sequences), 32, dtype=torch.long), torch.zeros(len(sequences), 32, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        padded[0][row, : len(sequence)], padded[1][row, : len(sequence)] = torch.tensor(sequence), 1
    results = {}
    for implementation in ("sdpa", "flex_attention"):
        encoder = BiEncoder(load_backbone(tiny_llama, attn_implementation=implementation)).eval()
        with torch.no_grad():
            results[implementation] = (
                encoder(
                    packed["input_ids"],
                    packed["segments"],
                    sequence_index=packed["sequence_index"],
                    sequence_mask=packed["sequence_mask"],
                ),
                encoder(*padded),
            )
    for sdpa, flex in zip(results["sdpa"], results["flex_attention"]):
        assert torch.allclose(sdpa, flex, atol=1e-5)
    assert torch.allclose(results["sdpa"][0], results["sdpa"][1], atol=1e-5)  # packed == padded


def test_flex_attention_training_on_cpu_is_refused():
    with pytest.raises(ConfigError, match="FlexAttention has no backward on the CPU"):
        build_engine(load_config("tiny", ["model.attn_implementation=flex_attention"]), {})
