"""Training sparse (SPLADE) models (model.kind=sparse): the FLOPS regulariser and its warm-up against
hand computations; gradient parity of InfoNCE + FLOPS (2 ranks with the global pool equal 1 rank at
the same global batch, GradCache equal to the plain step; fp32, relative 1e-5), where FLOPS over the
rank's own vectors under `global` is caught; model.sparse's config errors; `plan`'s vocabulary
logits; and the tiny_sparse recipe's log (non-zero terms per query and document, FLOPS term at the
loop's step of the warm-up)."""

import math

import pytest
import torch

from conftest import shared_scenarios
from embedtrain.autoconfig import GIB
from embedtrain.config import SPARSE_DEFAULTS, load_config, resolve_sparse
from embedtrain.errors import ConfigError
from embedtrain.losses import flops_regularizer, flops_warmup, nonzero_terms
from embedtrain.plan import placeholder_paths, plan
from embedtrain.train.sparse_loss import flops_weights

TOLERANCE = 1e-5
SPARSE = ["--sparse", "--negatives", "global", "--micro", "2"]
TWO_RANKS = {
    "global, tied LM head": [*SPARSE, "--tied-head"],
    "global, query negatives, GradCache": [*SPARSE, "--query-negatives", "--grad-cache", "1"],
    "global, FLOPS of the rank only": [*SPARSE, "--rank-flops"],
    "global, inference-free queries, GradCache": [*SPARSE, "--inference-free", "--grad-cache", "1"],
}
shared_scenarios(__name__, 2, "grad_parity.py", TWO_RANKS)


def test_flops_regularizer_matches_a_hand_computation():
    weights = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 2.0]], requires_grad=True)
    # term means over the 2 texts: 1.5, 0.5, 2.0 -> 2.25 + 0.25 + 4.0
    flops = flops_regularizer(weights)
    assert flops.item() == pytest.approx(6.5)
    flops.backward()  # d/dw_ij = 2 mean_j sign(w_ij) / B: 0 where a weight is 0
    assert torch.allclose(weights.grad, torch.tensor([[0.0, 0.5, 2.0], [1.5, 0.0, 2.0]]))
    assert nonzero_terms(weights).item() == 2.0


def test_flops_weight_warms_up_quadratically_then_stays():
    assert [flops_warmup(0.8, step, 4) for step in (1, 2, 4, 9)] == pytest.approx([0.05, 0.2, 0.8, 0.8])
    assert flops_warmup(0.8, 1, 0) == 0.8  # no warm-up
    settings = {**SPARSE_DEFAULTS, "flops_query_weight": 0.3, "flops_document_weight": 0.6, "flops_warmup_steps": 10}
    assert flops_weights(settings, 5) == pytest.approx((0.075, 0.15))


@pytest.fixture(scope="module")
def parity(scenario_launch):
    """This file's 2-rank grad_parity.py --sparse scenarios (the session's shared launch): {key: result}."""
    return scenario_launch(__name__, 2)


@pytest.mark.parametrize(
    "key, head",
    [
        ("global, tied LM head", "backbone.embed_tokens.weight"),
        ("global, query negatives, GradCache", "lm_head.weight"),
    ],
)
def test_sparse_gradients_on_two_ranks_match_the_plain_step_on_one(parity, key, head):
    """DeepSpeed (ZeRO-3, checkpointing) through the sparse kind's backward on 2 ranks (an LM head
    tied to the input embeddings, as Llama 3.2 1B's; the checkpoint's own head with query negatives
    and GradCache chunks of 1 query) against one plain PyTorch step over the whole global batch on
    1 rank; the FLOPS terms are a real part of the loss."""
    result = parity[key]
    assert result["world"] == 2
    assert abs(result["ds_loss"] - result["ref_loss"]) <= TOLERANCE * abs(result["ref_loss"]), result
    assert result["max_rel_error"] < TOLERANCE, result
    assert head in result["parameters"] and ("lm_head.weight" in result["parameters"]) == (head == "lm_head.weight")
    terms = result["loss_terms"][0]
    assert terms["flops_loss"] > 0.1 * result["ds_loss"], terms  # the FLOPS gradient is not negligible
    assert result["replay_error"] == 0.0


def test_inference_free_query_table_gradients_on_two_ranks_match_one(parity):
    """Inference-free queries (model.sparse.inference_free_queries): the queries weighed by the learned
    table through the kind's collator and backward, GradCache chunks of 1 query, FLOPS on the table's
    output and the documents (weights 0.1 each), ZeRO-3 on 2 ranks against the plain step on 1 rank:
    the table's gradient (and every backbone weight's) is the same."""
    result = parity["global, inference-free queries, GradCache"]
    assert abs(result["ds_loss"] - result["ref_loss"]) <= TOLERANCE * abs(result["ref_loss"]), result
    assert result["max_rel_error"] < TOLERANCE, result
    assert result["grad_norms"]["query_weights.weight"] > 0, result  # the table learns
    terms = result["loss_terms"][0]
    assert terms["flops_query"] > 0 and terms["flops_loss"] > 0.1 * result["ds_loss"], terms
    assert result["replay_error"] == 0.0


def test_flops_over_the_rank_only_under_the_global_pool_fails_parity(parity):
    """SPLADE computes FLOPS per batch; here the batch is the gathered one. Over each rank's own
    vectors instead, 2 ranks no longer equal 1 rank: the parity check can fail."""
    result = parity["global, FLOPS of the rank only"]
    assert result["max_rel_error"] > 100 * TOLERANCE, result


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.sparse.flops_weight=1"], "model.sparse.flops_weight: unknown key"),
        (["model.sparse.flops_query_weight=-1"], "model.sparse.flops_query_weight must be >= 0"),
        (["model.sparse.flops_warmup_steps=-2"], "model.sparse.flops_warmup_steps must be >= 0"),
        (
            ["model.sparse.inference_free_queries=true", "loss.query_negatives=true"],
            "loss.query_negatives=true with model.sparse.inference_free_queries=true",
        ),
        (["model.sparse.inference_free_queries=maybe"], "model.sparse.inference_free_queries"),
        (["model.sparse.query_table_lr=0.01"], "model.sparse.query_table_lr applies to inference-free queries"),
        (
            ["model.sparse.inference_free_queries=true", "model.sparse.query_table_lr=0"],
            "model.sparse.query_table_lr must be > 0",
        ),
        (["model.kind=embedding"], "model.sparse applies to model.kind=sparse"),
        (["loss.matryoshka_dims=[16]"], "loss.matryoshka_dims is not supported for sparse models"),
        (["loss.distill.teacher_cache=cache"], "loss.distill is not supported for sparse models"),
    ],
)
def test_sparse_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny_sparse", overrides)


def test_sparse_settings_default_to_splade_and_warm_up_over_a_third_of_training():
    config = load_config("tiny_sparse", ["model.sparse={}", "train.max_steps=90"])
    assert config.model.sparse == {**SPARSE_DEFAULTS, "flops_warmup_steps": 30}
    assert resolve_sparse({})["flops_warmup_steps"] is None  # no max_steps to take the third of
    # inference-free queries: no query FLOPS unless asked for (the table's output cannot be sparsified)
    assert resolve_sparse({"inference_free_queries": True})["flops_query_weight"] == 0.0
    assert resolve_sparse({"inference_free_queries": True})["query_table_lr"] == 1e-3
    assert resolve_sparse({"inference_free_queries": True, "flops_query_weight": 0.5})["flops_query_weight"] == 0.5
    assert resolve_sparse(resolve_sparse({"inference_free_queries": True})) == resolve_sparse(  # a resume's re-read
        {"inference_free_queries": True}
    )


def test_plan_counts_the_vocabulary_logits():
    """Every option of the 1B sparse recipe on 8 GPUs: the logits of one forward's tokens (query and
    5 passages of 512 tokens per query), x 2 for their gradient, in bf16, over Llama 3.2's 128,256
    terms; the LM head's matmul is in the step's compute."""
    config = load_config("llama3_2_1b_sparse", placeholder_paths("llama3_2_1b_sparse", []))
    result = plan(config, "llama3_2_1b_sparse", 1, 8)
    for option in result["options"]:
        expected = 2 * 2 * option["queries_per_forward"] * 6 * 512 * 128_256
        assert math.isclose(option["parts_gib"]["vocabulary logits"] * GIB, expected), option
    dense = plan(load_config("llama3_2_1b", placeholder_paths("llama3_2_1b", [])), "llama3_2_1b", 1, 8)
    assert "vocabulary logits" not in dense["options"][0]["parts_gib"]
    assert result["options"][0]["compute_seconds"] > dense["options"][0]["compute_seconds"]


def test_tiny_sparse_log_shows_non_zero_terms_and_the_flops_term(tiny_sparse_trained):
    """Every log line of the few-step run carries the mean non-zero terms per query and document
    and the weighted FLOPS term, which grows from step to step with the warm-up's (step / T)^2."""
    lines = [line for line in (tiny_sparse_trained / "train.log").read_text().splitlines() if "] step " in line]
    assert len(lines) == 4, lines
    values = [dict(zip(("q", "d", "flops"), parse_sparsity(line))) for line in lines]
    assert all(0 < v["q"] <= 1024 and 0 < v["d"] <= 1024 for v in values), values
    assert all(later["flops"] > earlier["flops"] > 0 for earlier, later in zip(values, values[1:])), values


def parse_sparsity(line):
    words = line.split()
    return [float(words[words.index(name) + offset]) for name, offset in (("nnz", 2), ("d", 1), ("flops", 1))]


def test_the_trained_query_table_is_checkpointed_and_exported_for_sentence_transformers(tiny_sparse_trained):
    """The few-step inference-free run: its query table learned (moved off its initial ones), the
    checkpoint holds it, and `embedtrain export` wrote exactly that table as the SparseStaticEmbedding
    of the Router layout, which sentence-transformers' SparseEncoder loads and weighs queries by."""
    from safetensors.torch import load_file
    from sentence_transformers import SparseEncoder

    from embedtrain.export import checkpoint_parameters

    step = tiny_sparse_trained / "run" / "checkpoints" / "step_4"
    trained = dict(checkpoint_parameters(step))["query_weights.weight"].detach()
    # trained at model.sparse.query_table_lr (1e-3), not train.lr (3e-4): Adam moves a parameter by
    # about lr x the warm-up multiplier per step, (1 + 2 + 3 + 4) / 10 = 1 over the 4 steps, so at
    # train.lr no weight could have moved 3e-4
    assert float((trained - 1).abs().max()) > 3e-4
    model = tiny_sparse_trained / "model"
    exported = load_file(model / "query_0_SparseStaticEmbedding" / "model.safetensors")["weight"]
    assert torch.equal(exported, trained)
    st = SparseEncoder(str(model), trust_remote_code=True, device="cpu")
    query = st.encode_query(["a claim about a chemist"], convert_to_tensor=True).to_dense()[0]
    present = query.nonzero()[:, 0]
    torch.testing.assert_close(query[present], trained[present])


def test_the_query_table_trains_in_a_parameter_group_of_its_own_learning_rate():
    """engine.parameter_groups with the sparse kind's learning_rates: the inference-free table alone
    in a group at model.sparse.query_table_lr (1-D: no decay); the rest as before, in the same order."""
    from embedtrain.kinds import kind_of
    from embedtrain.train.engine import parameter_groups

    config = load_config(
        "tiny_sparse", ["model.sparse.inference_free_queries=true", "model.sparse.query_table_lr=0.02"]
    )
    model = torch.nn.Module()
    model.backbone = torch.nn.Linear(3, 2)
    model.query_weights = torch.nn.Embedding(5, 1)
    model.query_weights.weight = torch.nn.Parameter(torch.ones(5))
    groups = parameter_groups(model, 0.1, kind_of(config).learning_rates(config))
    assert [(len(g["params"]), g["weight_decay"], g.get("lr")) for g in groups] == [
        (1, 0.1, None),
        (1, 0.0, None),
        (1, 0.0, 0.02),
    ]
    assert groups[2]["params"][0] is model.query_weights.weight
    plain = load_config("tiny_sparse", [])
    assert kind_of(plain).learning_rates(plain) == {}


def test_sparse_models_are_refused_for_families_without_a_fill_mask_export():
    """A stock-export family (Qwen3 ...) would train, then fail at export: refused when the backbone loads."""
    from embedtrain.kinds import kind_named
    from embedtrain.model.families import family_of

    config = load_config("tiny_sparse", [])
    kind_named("sparse").check_family(family_of("llama"), config)
    with pytest.raises(ConfigError, match="model.kind=sparse: not supported for the qwen3 family"):
        kind_named("sparse").check_family(family_of("qwen3"), config)
