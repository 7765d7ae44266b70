"""`embedtrain plan`: parameter counts match the real model, model-state memory matches DeepSpeed's
own estimator, and the recommendation is one that fits."""

import pytest
import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from transformers import LlamaConfig, LlamaModel

from embedtrain.config import load_config
from embedtrain.plan import SHAPES, Shape, memory_per_gpu, plan
from test_cli import embedtrain


def test_parameter_count_matches_a_built_model():
    dims = dict(vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=8,
                num_key_value_heads=2)
    model = LlamaModel(LlamaConfig(**dims))
    assert Shape(**dims).params == sum(p.numel() for p in model.parameters())


def test_8b_shape_is_the_published_size():
    assert abs(Shape(**SHAPES["llama-3.1-8b"]).params - 7.50e9) < 0.01e9  # Llama-3.1-8B without lm_head
    flops = Shape(**SHAPES["llama-3.2-1b"]).flops_per_token(512)
    assert abs(flops - 6.04e9) < 0.01e9  # docs/benchmarks.md, plain baselines on one H100 80GB


@pytest.mark.parametrize("gpus, offload, ds_flags", [(8, "none", (False, False)), (64, "none", (False, False)),
                                                      (8, "optimizer", (True, False)), (8, "optimizer+params", (True, True))])
def test_model_states_match_deepspeed_estimator(gpus, offload, ds_flags):
    shape = Shape(**SHAPES["llama-3.1-8b"])
    parts = memory_per_gpu(shape, gpus, 1, 512 * 5, 5, True, offload, False)
    _, ds_gpu, _ = estimate_zero3_model_states_mem_needs(shape.params, shape.largest_layer_params, gpus, 1,
                                                         cpu_offload=ds_flags[0], cpu_offload_params=ds_flags[1])
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


def test_plan_accounts_for_sequence_length_and_attention():
    """Memory grows with passage length, linearly under sdpa and quadratically under eager; the
    1B recipe at 8,192-token passages fits one 80 GB GPU with micro-batch 1 and checkpointing."""
    def option(length, attn, micro=1, checkpointing=True, extra=()):
        config = load_config("llama3_2_1b", ["model.path=unset", "data.path=unset",
                                             f"data.passage_max_length={length}", f"model.attn_implementation={attn}",
                                             *extra])
        result = plan(config, "llama3_2_1b", 1, 1)
        return next(o for o in result["options"] if o["micro_batch"] == micro and o["checkpointing"] == checkpointing
                    and o["offload"] == "none")
    sdpa = [option(n, "sdpa")["parts_gib"]["activations"] for n in (2048, 4096, 8192)]
    assert sdpa[1] / sdpa[0] == pytest.approx(2, rel=0.05) and sdpa[2] / sdpa[1] == pytest.approx(2, rel=0.05)
    eager = [option(n, "eager")["parts_gib"]["attention scores"] for n in (2048, 8192)]
    assert eager[1] / eager[0] == pytest.approx(16, rel=0.05)
    long = option(8192, "sdpa")
    assert long["fits"] and long["memory_gib"] < 0.9 * 80, long
    cached = option(512, "sdpa", micro=32, extra=["train.grad_cache_chunk_size=4"])
    plain = option(512, "sdpa", micro=32)
    assert cached["held"] == 4 and cached["parts_gib"]["activations"] < plain["parts_gib"]["activations"] / 4
    assert cached["step_seconds"] == pytest.approx(plain["step_seconds"] * 5 / 4)
