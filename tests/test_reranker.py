"""The reranker (model.kind=reranker): config checks, the pair collator, the group loss, and
gradient parity of a ZeRO-3 step on 2 ranks with a plain PyTorch step (fp32, relative 1e-5)."""

import pytest
import torch

from conftest import shared_scenarios
from embedtrain.config import ConfigError, load_config
from embedtrain.data.collate import PairCollator
from embedtrain.data.nemotron import Example
from embedtrain.losses import group_cross_entropy
from embedtrain.model.encoder import load_tokenizer

TOLERANCE = 1e-5


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.negatives=global", "a reranker .* set loss.negatives=group"),
        ("loss.query_negatives=true", "loss.query_negatives applies to embedding models"),
        ("data.pair_template=question:{query}", "must contain {query} and {passage}"),
        ("data.pair_template={query} {passage} {extra}", "only {query} and {passage} may be used"),
        ("model.kind=cross", "model.kind: 'cross' is not one of embedding, reranker"),
    ],
)
def test_bad_reranker_configs_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny_reranker", [override])


def test_pairs_follow_the_template_query_by_query(tiny_llama):
    config = load_config("tiny_reranker", ["data.packing=false", "data.pair_max_length=12"])
    tokenizer = load_tokenizer(tiny_llama)
    collator = PairCollator(tokenizer, config.data, {"S": {"query_instruction": "", "passage_instruction": ""}})
    examples = [
        Example("S", f"query {i}", [f"positive {i}", f"negative {i}", "a much longer negative " * 5]) for i in range(2)
    ]
    batch = collator(examples)
    ids, mask = batch["inputs"].input_ids, batch["inputs"].attention_mask
    assert batch["group_size"] == 3 and ids.shape[0] == 6
    expected = tokenizer("question:query 1 \n \n passage:positive 1", max_length=12, truncation=True)["input_ids"]
    assert ids[3][mask[3].bool()].tolist() == expected
    assert int(mask[2].sum()) == 12  # truncated to data.pair_max_length
    chunked = PairCollator(tokenizer, config.data, {"S": {}}, chunk_size=1)(examples)
    assert [part["num_pairs"] for part in chunked["chunks"]] == [3, 3]


def test_group_cross_entropy_by_hand():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 0.0]])
    loss, stats = group_cross_entropy(logits)
    by_hand = (-(2.0 - torch.logsumexp(logits[0], 0)) - (0.0 - torch.logsumexp(logits[1], 0))) / 2
    assert torch.isclose(loss, by_hand)
    assert stats["accuracy"] == 0.5
    assert torch.isclose(stats["margin"], torch.tensor(((2.0 - 1.0) + (0.0 - 3.0)) / 2))


RERANKER_PARITY = {"plain": [], "chunked-accumulated": ["--chunk", "1", "--accumulation", "2"]}


shared_scenarios(__name__, 2, "reranker_parity.py", RERANKER_PARITY)


@pytest.fixture(scope="module")
def two_ranks(scenario_launch):
    """Both reranker_parity.py scenarios (2 ranks, the session's shared launch)."""
    return scenario_launch(__name__, 2)


@pytest.mark.parametrize("name", list(RERANKER_PARITY))
def test_zero3_reranker_on_two_ranks_matches_plain_pytorch(two_ranks, name):
    result = two_ranks[name]
    assert result["world"] == 2
    assert abs(result["ds_loss"] - result["ref_loss"]) <= TOLERANCE * abs(result["ref_loss"])
    assert result["head_grad_norm"] > 0 and result["head_rel_error"] < TOLERANCE, result
    assert result["max_rel_error"] < TOLERANCE, result
