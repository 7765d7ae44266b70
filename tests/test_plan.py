"""`embedtrain plan`: parameter counts match the real model, model-state memory matches DeepSpeed's
own estimator, and the recommendation is one that fits."""

import json

import pytest
import torch
import transformers
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from test_cli import embedtrain
from transformers import LlamaConfig, LlamaModel

from embedtrain.config import LORA_DEFAULTS, load_config
from embedtrain.plan import (
    SHAPES,
    Shape,
    communication_bytes,
    communication_seconds,
    memory_per_gpu,
    plan,
    shape_for,
)


def test_parameter_count_matches_a_built_model():
    dims = dict(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
    )
    model = LlamaModel(LlamaConfig(**dims))
    assert Shape(**dims).params == sum(p.numel() for p in model.parameters())


def test_8b_shape_is_the_published_size():
    assert abs(Shape(**SHAPES["llama-3.1-8b"]).params - 7.50e9) < 0.01e9  # Llama-3.1-8B without lm_head
    flops = Shape(**SHAPES["llama-3.2-1b"]).flops_per_token(512)
    assert abs(flops - 6.04e9) < 0.01e9  # docs/benchmarks.md, plain baselines on one H100 80GB


def built_params(config_name, model_name, **dims):
    """Parameters of transformers' own model for these dims, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = getattr(transformers, model_name)(getattr(transformers, config_name)(**dims))
    return sum(p.numel() for p in model.parameters())


def test_new_shapes_are_the_published_sizes():
    """Qwen3-0.6B: 596,049,920 parameters, 440,467,456 without the embeddings (model card: 0.6B,
    0.44B non-embedding; tied, so the causal LM has no more). Ministral 3 3B's language model:
    3,429,006,336 (model card: 3.4B language model; tied). Both equal transformers' built models."""
    qwen = Shape(**SHAPES["qwen3-0.6b"])
    assert qwen.params == qwen.causal_lm_params == 596_049_920 and round(qwen.params / 1e9, 1) == 0.6
    assert qwen.non_embedding_params == 440_467_456 and round(qwen.non_embedding_params / 1e9, 2) == 0.44
    assert qwen.projection_shapes()["q_proj"] == (1024, 2048) and qwen.projection_shapes()["o_proj"] == (2048, 1024)
    dims = {k: v for k, v in SHAPES["qwen3-0.6b"].items() if k != "qk_norm"}
    assert qwen.params == built_params("Qwen3Config", "Qwen3Model", **dims)
    ministral = Shape(**SHAPES["ministral3-3b"])
    assert ministral.params == ministral.causal_lm_params == 3_429_006_336
    assert round(ministral.params / 1e9, 1) == 3.4
    assert ministral.params == built_params("Ministral3Config", "Ministral3Model", **SHAPES["ministral3-3b"])
    # Llama: the published 8.03B of Llama-3.1-8B counts its untied lm_head; 1.24B for Llama-3.2-1B (tied)
    assert round(Shape(**SHAPES["llama-3.1-8b"]).causal_lm_params / 1e9, 2) == 8.03
    assert Shape(**SHAPES["llama-3.2-1b"]).causal_lm_params == Shape(**SHAPES["llama-3.2-1b"]).params


def test_attention_flops_use_heads_times_head_dim():
    """Qwen3-0.6B's attention is 16 x 128 = 2048 wide, twice its hidden size; Llama's is its hidden size."""
    qwen = Shape(**SHAPES["qwen3-0.6b"])
    assert qwen.attention_width == 2048
    assert qwen.flops_per_token(512) - qwen.flops_per_token(0) == 12 * 28 * 2048 * 512
    assert qwen.forward_flops_per_token(512) - qwen.forward_flops_per_token(0) == 4 * 28 * 2048 * 512
    llama = Shape(**SHAPES["llama-3.2-1b"])
    assert llama.head_dim == 64 and llama.attention_width == llama.hidden_size
    assert llama.flops_per_token(512) - llama.flops_per_token(0) == 12 * 16 * 2048 * 512


# head_dim 32 with hidden 64 and 4 heads: q_proj 64 -> 128, k/v 64 -> 64, o_proj 128 -> 64
TINY = dict(
    vocab_size=100,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
)


@pytest.mark.parametrize(
    "config_name, model_name, extra",
    [
        ("MistralConfig", "MistralModel", {}),
        ("MinistralConfig", "MinistralModel", {}),
        ("Ministral3Config", "Ministral3Model", {}),
        ("Qwen3Config", "Qwen3Model", {}),
        ("Qwen3Config", "Qwen3Model", {"attention_bias": True}),
        ("LlamaConfig", "LlamaModel", {}),
        ("LlamaConfig", "LlamaModel", {"attention_bias": True, "mlp_bias": True}),
    ],
)
def test_shape_read_from_config_json_matches_the_built_model(tmp_path, config_name, model_name, extra):
    """A config.json saved by each family's config class, head_dim != hidden / heads: plan's count
    equals the parameters of the transformers model built from that config."""
    getattr(transformers, config_name)(**TINY, **extra, tie_word_embeddings=True).save_pretrained(tmp_path)
    config = load_config("tiny", [f"model.path={tmp_path}"])
    shape = shape_for(config, "tiny")
    assert (shape.head_dim, shape.attention_width, shape.kv_width) == (32, 128, 64)
    assert shape.tie_word_embeddings and shape.qk_norm == (model_name == "Qwen3Model")
    assert shape.params == built_params(config_name, model_name, **TINY, **extra)
    assert shape.projection_shapes()["q_proj"] == (64, 128) and shape.projection_shapes()["o_proj"] == (128, 64)


def test_shape_of_hand_written_and_nested_configs(tmp_path):
    """Keys a config.json leaves out take the family's transformers default (Qwen3: head_dim 128);
    a Ministral 3 vision-language checkpoint (model_type mistral3) is read through its text_config;
    a family plan does not know is an error naming it."""
    qwen = {k: v for k, v in TINY.items() if k != "head_dim"}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", **qwen}))
    shape = shape_for(load_config("tiny", [f"model.path={tmp_path}"]), "tiny")
    assert shape.head_dim == 128 and shape.params == built_params("Qwen3Config", "Qwen3Model", **qwen)
    text = {"model_type": "ministral3", **TINY, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral3", "text_config": text}))
    shape = shape_for(load_config("tiny", [f"model.path={tmp_path}"]), "tiny")
    assert shape.tie_word_embeddings and shape.params == built_params("Ministral3Config", "Ministral3Model", **TINY)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", **TINY}))
    with pytest.raises(ValueError, match="model_type 'qwen2'"):
        shape_for(load_config("tiny", [f"model.path={tmp_path}"]), "tiny")


@pytest.mark.parametrize(
    "recipe, total",
    [("ministral3_3b", "3.43B parameters (26 layers, hidden 3072"), ("qwen3_0_6b", "0.60B parameters (28 layers")],
)
def test_plan_command_for_the_new_recipes(recipe, total):
    run = embedtrain("plan", "--config", recipe, "--nodes", "1", "--gpus-per-node", "8")
    assert run.returncode == 0, run.stderr
    assert total in run.stdout and "recommendation: micro-batch" in run.stdout


@pytest.mark.parametrize(
    "gpus, offload, ds_flags",
    [
        (8, "none", (False, False)),
        (64, "none", (False, False)),
        (8, "optimizer", (True, False)),
        (8, "optimizer+params", (True, True)),
    ],
)
def test_model_states_match_deepspeed_estimator(gpus, offload, ds_flags):
    shape = Shape(**SHAPES["llama-3.1-8b"])
    parts = memory_per_gpu(shape, gpus, 1, 512 * 5, 5, True, offload, False)
    _, ds_gpu, _ = estimate_zero3_model_states_mem_needs(
        shape.params, shape.largest_layer_params, gpus, 1, cpu_offload=ds_flags[0], cpu_offload_params=ds_flags[1]
    )
    ours = parts["model states"] + parts["gathered layers"]
    assert abs(ours - ds_gpu) <= 0.01 * ds_gpu + 1


def test_recommendation_fits_and_prefers_speed():
    config = load_config("llama_embed_nemotron_8b", ["model.path=unset", "data.path=unset"])
    result = plan(config, "llama_embed_nemotron_8b", 1, 8)
    best = result["best"]
    assert best["fits"] and best["memory_gib"] <= 0.9 * 80
    assert all(o["step_seconds"] >= best["step_seconds"] for o in result["options"] if o["fits"])
    tight = plan(config, "llama_embed_nemotron_8b", 1, 8, gpu_memory_gib=12)["best"]
    assert tight["offload"] != "none" or tight["checkpointing"]


def test_activation_checkpointing_saves_memory_that_grows_with_micro_batch():
    shape = Shape(**SHAPES["llama-3.2-1b"])
    plain = [sum(memory_per_gpu(shape, 1, m, 3072, 5, False, "none", False).values()) for m in (1, 2, 4)]
    ckpt = [sum(memory_per_gpu(shape, 1, m, 3072, 5, True, "none", False).values()) for m in (1, 2, 4)]
    assert plain[0] < plain[1] < plain[2] and all(c < p for c, p in zip(ckpt, plain))


def test_plan_command():
    run = embedtrain("plan", "--config", "llama3_2_1b", "--nodes", "1", "--gpus-per-node", "1")
    assert run.returncode == 0, run.stderr
    assert "1.24B parameters" in run.stdout and "recommendation: micro-batch" in run.stdout
    assert "comm s" in run.stdout and "Gb/s per GPU" in run.stdout


@pytest.mark.parametrize(
    "recipe, nodes, per_node, stage",
    [("llama3_2_1b", 1, 1, 2), ("llama_embed_nemotron_8b", 4, 8, 2), ("llama_embed_nemotron_8b", 1, 2, 3)],
)
def test_plan_prints_the_auto_decision(recipe, nodes, per_node, stage):
    """`embedtrain plan` prints the decision training makes at start (deepspeed.config=auto), the
    one embedtrain.autoconfig.decide gives for the recipe's shape, cluster, card and token budget."""
    from embedtrain.autoconfig import GIB, Hardware, decide
    from embedtrain.config import micro_step_tokens

    run = embedtrain("plan", "--config", recipe, "--nodes", nodes, "--gpus-per-node", per_node)
    assert run.returncode == 0, run.stderr
    config = load_config(recipe, ["model.path=unset", "data.path=unset"])
    shape = shape_for(config, recipe)
    decision = decide(shape, Hardware(nodes, per_node, 80 * GIB, "--gpu-memory"), micro_step_tokens(config)[0])
    line = f"auto (deepspeed.config=auto, train.activation_checkpointing=auto): {decision.reason}"
    if not decision.fits:
        line = line.replace("): ", "): WARNING: ", 1)
    assert line in run.stdout.splitlines() and decision.stage == stage
    assert f"(ZeRO-{stage} all-gather" in run.stdout  # the step time counts the chosen stage's traffic


def test_plan_accounts_for_sequence_length_and_attention():
    """Memory grows with passage length, linearly under sdpa and quadratically under eager; the
    1B recipe at 8,192-token passages fits one 80 GB GPU with micro-batch 1 and checkpointing."""

    def option(length, attn, micro=1, checkpointing=True, extra=()):
        config = load_config(
            "llama3_2_1b",
            [
                "model.path=unset",
                "data.path=unset",
                f"data.passage_max_length={length}",
                f"model.attn_implementation={attn}",
                *extra,
            ],
        )
        result = plan(config, "llama3_2_1b", 1, 1)
        return next(
            o
            for o in result["options"]
            if o["micro_batch"] == micro and o["checkpointing"] == checkpointing and o["offload"] == "none"
        )

    sdpa = [option(n, "sdpa")["parts_gib"]["activations"] for n in (2048, 4096, 8192)]
    assert sdpa[1] / sdpa[0] == pytest.approx(2, rel=0.05) and sdpa[2] / sdpa[1] == pytest.approx(2, rel=0.05)
    eager = [option(n, "eager")["parts_gib"]["attention scores"] for n in (2048, 8192)]
    assert eager[1] / eager[0] == pytest.approx(16, rel=0.05)
    long = option(8192, "sdpa")
    assert long["fits"] and long["memory_gib"] < 0.9 * 80, long
    cached = option(512, "sdpa", micro=32, extra=["train.grad_cache_chunk_size=4", "train.micro_batch_tokens=0"])
    plain = option(512, "sdpa", micro=32)
    assert (
        cached["queries_per_forward"] == 4
        and cached["parts_gib"]["activations"] < plain["parts_gib"]["activations"] / 4
    )
    assert cached["step_seconds"] == pytest.approx(plain["step_seconds"] * 5 / 4)


def test_communication_bytes_by_hand():
    """A 2-layer toy shape: P counted by hand, then ZeRO-3's per-step bytes and seconds."""
    shape = Shape(
        vocab_size=100,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    # per layer: q, o 8x8; k, v 8x4; gate, up, down 8x16; two norms of 8 -> 128 + 64 + 384 + 16 = 592
    params = 2 * 592 + 8 + 100 * 8  # layers, final norm, embeddings
    assert shape.params == params == 1992
    # accumulation 3, bf16 parameters gathered twice per micro-step, fp32 gradients once
    assert communication_bytes(params, 3, param_bytes=2, grad_bytes=4) == (3 * 2 * 1992 * 2, 3 * 1992 * 4)
    # GradCache with 2 chunks: 6 micro-steps, each gathered three times
    assert communication_bytes(params, 3, chunks=2) == (6 * 3 * 1992 * 2, 6 * 1992 * 2)
    # 4 GPUs in a ring at 8 Gb/s = 1 GB/s: 3/4 of the bytes cross each link
    assert communication_seconds(4e9, 4, 8.0) == pytest.approx(3.0)
    assert communication_seconds(4e9, 1, 8.0) == 0.0


def test_micro_batch_changes_step_time_through_communication():
    """Same global batch on 8 GPUs: micro 1 needs twice the accumulation of micro 2, so twice the
    parameter gathers and gradient reductions; the FLOPs are the same. (ZeRO-3 set explicitly: on
    8 x 80 GB the recipe's auto stage is ZeRO-2.)"""
    config = load_config(
        "llama_embed_nemotron_8b", ["model.path=unset", "data.path=unset", "deepspeed.config=zero3.json"]
    )
    result = plan(config, "llama_embed_nemotron_8b", 1, 8)

    def option(micro):
        return next(
            o for o in result["options"] if o["micro_batch"] == micro and o["checkpointing"] and o["offload"] == "none"
        )

    one, two = option(1), option(2)
    assert one["accumulation"] == 2 * two["accumulation"] == 16
    assert one["compute_seconds"] == pytest.approx(two["compute_seconds"])
    assert one["comm_seconds"] == pytest.approx(2 * two["comm_seconds"]) and two["comm_seconds"] > 0
    assert one["step_seconds"] > two["step_seconds"]
    # the 8B recipe reduces gradients in fp32: 16 x P x 4 bytes; gathers bf16: 16 x 2 x P x 2
    params = Shape(**SHAPES["llama-3.1-8b"]).params
    assert one["reduce_scatter_bytes"] == 16 * params * 4 and one["allgather_bytes"] == 16 * 2 * params * 2
    # 8 GPUs over NVLink at 450 GB/s per direction: 7/8 of the bytes cross each link
    assert one["comm_seconds"] == pytest.approx((16 * params * 8) * 7 / 8 / 450e9)
    slow = plan(config, "llama_embed_nemotron_8b", 1, 8, bandwidth_gbps=400.0)["options"]
    assert next(
        o for o in slow if o is not None and o["micro_batch"] == 1 and o["checkpointing"] and o["offload"] == "none"
    )["comm_seconds"] == pytest.approx(one["comm_seconds"] * 9)


def test_training_flops_is_the_sum_over_sequences_for_every_family():
    """Shape.training_flops (the loop's MFU, plan and tools/bench.py) equals the sum over sequences of
    n x flops_per_token(n), with the attention width heads x head_dim (2 x hidden for Qwen3-0.6B,
    where the hidden size would undercount it), with and without LoRA."""
    lengths = [7, 130, 512, 33]
    for name in ("llama-3.2-1b", "qwen3-0.6b"):
        shape = Shape(**SHAPES[name])
        for lora in (None, LORA_DEFAULTS):
            want = sum(n * shape.flops_per_token(n, lora) for n in lengths)
            got = shape.training_flops(sum(lengths), sum(n * n for n in lengths), lora)
            assert got == pytest.approx(want, rel=1e-12)
    qwen = Shape(**SHAPES["qwen3-0.6b"])
    assert qwen.attention_width == 2 * qwen.hidden_size


def test_checkpoint_size_estimate_matches_a_written_checkpoint(tiny_trained):
    """plan's checkpoint bytes (12 per trained parameter) against the optimizer-state files of the
    tiny recipe's real checkpoint (the model states files are small under ZeRO-3); and the line
    that compares the save time with the templates' grace period."""
    from embedtrain.plan import format_save_time

    result = plan(load_config("tiny"), "tiny", 1, 1)
    latest = tiny_trained / "run" / "checkpoints" / "latest"
    written = sum(p.stat().st_size for p in (latest.parent / latest.read_text().strip()).glob("*_optim_states.pt"))
    assert abs(result["checkpoint_bytes"] - written) / written < 0.02  # the rest: pickle framing
    line = format_save_time(dict(result, checkpoint_bytes=600e9, nodes=1))  # 600 s at 1 GB/s
    assert "about 600 s to save" in line and "LONGER than the 300 s" in line
