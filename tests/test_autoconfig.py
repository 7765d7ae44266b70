"""deepspeed.config=auto: the decision rule (the cheapest ZeRO stage, then the least recompute, that
fits), partial activation checkpointing (same gradients, fewer recomputed layers), and the refusal
to resume under another ZeRO stage."""

import pytest
import torch

from embedtrain.autoconfig import (
    GIB,
    Hardware,
    auto_deepspeed_json,
    checkpointed_layers,
    checkpointing_ladder,
    decide,
    memory_parts,
)
from embedtrain.config import validate_with_deepspeed
from embedtrain.errors import CheckpointError
from embedtrain.plan import SHAPES
from embedtrain.shape import Shape

ONE_B, EIGHT_B = Shape(**SHAPES["llama-3.2-1b"]), Shape(**SHAPES["llama-3.1-8b"])


def total(shape, hardware, tokens, stage, every, hpz=1):
    parts = memory_parts(
        shape, hardware.world, stage, tokens, checkpointed_layers(shape.num_hidden_layers, every), hpz=hpz
    )
    return sum(parts.values())


def test_ladder_is_least_recompute_first():
    assert checkpointing_ladder(16) == [0, 16, 8, 6, 4, 3, 2, 1]
    counts = [checkpointed_layers(32, k) for k in checkpointing_ladder(32)]
    assert counts == sorted(set(counts)) and counts[0] == 0 and counts[-1] == 32


@pytest.mark.parametrize(
    "shape, hardware, tokens, expected",
    [
        # 1B on one H100: ZeRO-2's 2 P + 18 P fits, and so do the activations of 12k tokens
        (ONE_B, Hardware(1, 1, 80 * GIB), 12288, (2, False, 1, 0)),
        # 1B at 50k tokens: ZeRO-2 still, with every 3rd layer checkpointed
        (ONE_B, Hardware(1, 1, 80 * GIB), 50000, (2, False, 1, 3)),
        # 8B on 2 x 2 x 80 GiB: ZeRO-2 fits without recompute
        (EIGHT_B, Hardware(2, 2, 80 * GIB), 3072, (2, False, 1, 0)),
        # 8B on 4 x 8 x 24 GiB: ZeRO-2's replicated bf16 weights (15 GB) leave too little; ZeRO-3 with
        # leaf layers, hpZ within the 8-GPU nodes and every 3rd layer recomputed
        (EIGHT_B, Hardware(4, 8, 24 * GIB), 3072, (3, True, 8, 3)),
    ],
)
def test_decision_is_the_cheapest_that_fits(shape, hardware, tokens, expected):
    decision = decide(shape, hardware, tokens)
    assert (decision.stage, decision.leaf_modules, decision.hpz, decision.checkpoint_every) == expected
    limit = 0.9 * hardware.card_bytes
    assert decision.fits and decision.memory_bytes == pytest.approx(
        total(shape, hardware, tokens, decision.stage, decision.checkpoint_every, decision.hpz)
    )
    assert decision.memory_bytes <= limit
    ladder = checkpointing_ladder(shape.num_hidden_layers)
    position = ladder.index(decision.checkpoint_every)
    if position:  # one step less recompute does not fit
        assert total(shape, hardware, tokens, decision.stage, ladder[position - 1], decision.hpz) > limit
    if decision.stage == 3:  # ZeRO-2 fits with no recompute at all
        assert total(shape, hardware, tokens, 2, 1) > limit
    assert f"ZeRO-{decision.stage}" in decision.reason and f"{tokens:,} tokens" in decision.reason


def test_forced_stage_and_checkpointing_and_nothing_fits():
    forced = decide(ONE_B, Hardware(1, 1, 80 * GIB), 12288, stage=3)
    assert (forced.stage, forced.leaf_modules, forced.checkpoint_every) == (3, True, 0)
    assert "set by the recipe" in forced.reason
    fixed = decide(ONE_B, Hardware(1, 1, 80 * GIB), 12288, checkpoint_every=1)
    assert (fixed.stage, fixed.checkpoint_every) == (2, 1)
    hopeless = decide(EIGHT_B, Hardware(1, 1, 80 * GIB), 3072)
    assert not hopeless.fits and hopeless.stage == 3 and hopeless.checkpoint_every == 1
    assert "nothing fits" in hopeless.reason and "zero3_offload.json" in hopeless.reason


def test_lora_shrinks_model_states():
    """LoRA on 8B: only the adapter has gradients and optimizer states, so ZeRO-2 fits one card."""
    lora = {"r": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    assert decide(EIGHT_B, Hardware(1, 1, 80 * GIB), 3072).fits is False
    decision = decide(EIGHT_B, Hardware(1, 1, 80 * GIB), 3072, lora_params=EIGHT_B.lora_params(lora))
    assert decision.fits and decision.stage == 2


def test_auto_json_is_valid_deepspeed():
    for decision in (decide(ONE_B, Hardware(1, 1, 80 * GIB), 12288), decide(EIGHT_B, Hardware(4, 8, 24 * GIB), 3072)):
        ds = auto_deepspeed_json(decision, ONE_B)
        ds.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=4)
        validate_with_deepspeed(ds, "auto")
        assert ds["gradient_clipping"] == 1.0  # fp32 accumulation: config.set_grad_accum_dtype
        assert ds["zero_optimization"]["stage"] == decision.stage
        assert ds["zero_optimization"].get("zero_hpz_partition_size", 1) == decision.hpz
        assert ds["bf16"].get("check_grad_overflow", decision.stage == 3) is not False


def gradients(tiny_llama, every, sequences):
    """fp32 gradients of a loss on pooled embeddings, checkpointing every `every`-th layer; and how
    many times each decoder layer ran its forward (a checkpointed layer runs it twice)."""
    from embedtrain.model import Encoder, load_backbone
    from embedtrain.train.engine import decoder_layers, enable_activation_checkpointing

    torch.manual_seed(0)
    backbone = load_backbone(tiny_llama, dtype=torch.float32)
    if every:
        enable_activation_checkpointing(backbone, every=every)
    calls = []  # a submodule's hook: a recompute calls the layer's forward, and so the MLP again
    for index, layer in enumerate(decoder_layers(backbone)):
        layer.mlp.register_forward_pre_hook(lambda module, args, index=index: calls.append(index))
    encoder = Encoder(backbone).train()
    ids, mask = sequences
    embeddings = encoder(input_ids=ids, attention_mask=mask)
    loss = (embeddings @ torch.linspace(-1, 1, embeddings.shape[-1])).square().sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in encoder.named_parameters() if p.grad is not None}
    return grads, [calls.count(i) for i in range(len(decoder_layers(backbone)))]


def test_partial_checkpointing_gives_the_same_gradients(tiny_llama):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 500, (3, 24), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    plain, plain_calls = gradients(tiny_llama, 0, (ids, mask))
    layers = len(plain_calls)
    for every in (2, 1):
        grads, calls = gradients(tiny_llama, every, (ids, mask))
        assert grads.keys() == plain.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, plain[name], rtol=1e-5, atol=1e-7, msg=name)
        recomputed = [i for i in range(layers) if calls[i] > plain_calls[i]]
        assert recomputed == list(range(0, layers, every)), (every, calls, plain_calls)


class FakeEngine:
    def __init__(self, stage, reason=None):
        self.stage = stage
        self.config = {"zero_optimization": {"stage": stage}}
        if reason:
            self.config["embedtrain_auto"] = {"reason": reason}

    def zero_optimization_stage(self):
        return self.stage


def test_resume_refuses_a_stage_change(tmp_path):
    from embedtrain.train.checkpoint import check_stage_resume

    saved = {"ds_config": {"zero_optimization": {"stage": 2}, "embedtrain_auto": {"reason": "ZeRO-2 fits 72 GiB"}}}
    check_stage_resume(FakeEngine(2), tmp_path, saved)  # same stage: fine
    with pytest.raises(CheckpointError, match=r"ZeRO stage 2 \(auto: ZeRO-2 fits 72 GiB\).*ZeRO stage 3 \(auto: b"):
        check_stage_resume(FakeEngine(3, "b"), tmp_path, saved)
    with pytest.raises(CheckpointError, match="deepspeed.zero_optimization.stage=2"):
        check_stage_resume(FakeEngine(3), tmp_path, saved)
