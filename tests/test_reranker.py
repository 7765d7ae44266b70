"""The reranker (model.kind=reranker): config checks, the pair collator and its in-batch negatives,
the group and in-batch losses, and gradient parity of a ZeRO-3 step on 2 ranks with a plain PyTorch
step (fp32, relative 1e-5), with and without in-batch negatives."""

import pytest
import torch

from conftest import shared_scenarios
from embedtrain.config import ConfigError, load_config
from embedtrain.data.collate import PairCollator
from embedtrain.data.nemotron import Example, content_hash
from embedtrain.losses import group_cross_entropy, inbatch_cross_entropy
from embedtrain.model.encoder import load_tokenizer
from embedtrain.train.step import reranker_mask

TOLERANCE = 1e-5


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.negatives=global", "a reranker .* set loss.negatives=group or local"),
        ("loss.query_negatives=true", "loss.query_negatives applies to embedding models"),
        ("data.pair_template=question:{query}", "must contain {query} and {passage}"),
        ("data.pair_template={query} {passage} {extra}", "only {query} and {passage} may be used"),
        ("model.kind=cross", "model.kind: 'cross' is not one of embedding, reranker"),
        ("loss.inbatch_negatives=2", "loss.inbatch_negatives=2 needs loss.negatives=local"),
        ("loss.inbatch_negatives=-1", "loss.inbatch_negatives must be an integer >= 0"),
    ],
)
def test_bad_reranker_configs_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny_reranker", [override])


def test_inbatch_negatives_config():
    """local resolves 0 to the default (4); a micro-batch of one query has no other positives; an
    embedding model's pools already hold the batch's passages."""
    assert load_config("tiny_reranker", ["loss.negatives=local"]).loss.inbatch_negatives == 4
    assert (
        load_config("tiny_reranker", ["loss.negatives=local", "loss.inbatch_negatives=2"]).loss.inbatch_negatives == 2
    )
    with pytest.raises(ConfigError, match="train.micro_batch_size=1 must be >= 2"):
        load_config("tiny_reranker", ["loss.negatives=local", "train.micro_batch_size=1", "train.global_batch_size=2"])
    with pytest.raises(ConfigError, match="loss.inbatch_negatives applies to rerankers"):
        load_config("tiny", ["loss.negatives=local", "loss.inbatch_negatives=2"])


def inbatch_examples():
    """q0 lists q1's positive as a sibling positive; q2's positive is a copy of q0's; q3, q4 plain."""
    sibling = [content_hash("pos A"), content_hash("pos B")]
    rows = [("pos A", sibling), ("pos B", []), ("pos A", []), ("pos D", []), ("pos E", [])]
    return [Example("S", f"query {i}", [text, f"neg {i}"], f"q{i}", known) for i, (text, known) in enumerate(rows)]


def test_a_known_positive_is_never_an_inbatch_negative(tiny_llama):
    """With 4 slots every allowed donor is drawn and the free slots are masked repeats of the query's
    own positive; with 2, two of the allowed ones, varying with the seed (the question ids), and the
    same again for the same micro-batch, chunked or not."""
    config = load_config("tiny_reranker", ["data.pair_max_length=16"])
    tokenizer = load_tokenizer(tiny_llama)
    names = {content_hash(text): text for text in ("pos A", "pos B", "pos D", "pos E")}
    allowed = {0: {"pos D", "pos E"}, 1: {"pos A", "pos D", "pos E"}, 2: {"pos B", "pos D", "pos E"}}
    allowed.update({3: {"pos A", "pos B", "pos E"}, 4: {"pos A", "pos B", "pos D"}})  # q2 repeats q0's
    draws = set()
    for count in (4, 2):
        collator = PairCollator(tokenizer, config.data, {"S": {}}, inbatch_negatives=count)
        chunked = PairCollator(tokenizer, config.data, {"S": {}}, chunk_size=1, inbatch_negatives=count)
        for seed in range(6):
            examples = inbatch_examples()
            for e in examples:
                e.question_id += f"-{seed}"
            batch = collator(examples)
            assert batch["group_size"] == 2 + count and batch["inbatch_negatives"] == count
            hash_QG, masked_QG = batch["passage_hash"].view(5, -1), reranker_mask(batch, "cpu")
            for query in range(5):
                pairs = list(zip(hash_QG[query, 2:].tolist(), masked_QG[query, 2:].tolist()))
                drawn = [names[h] for h, masked in pairs if not masked]
                assert set(drawn) <= allowed[query] and len(set(drawn)) == len(drawn) == min(count, len(allowed[query]))
                assert all(h == hash_QG[query, 0] for h, masked in pairs if masked)  # fillers: its own positive
                draws.add((count, query, tuple(drawn)))
            again = chunked(examples)  # the same micro-batch cut into chunks draws the same pairs
            assert torch.equal(again["passage_hash"], batch["passage_hash"])
            assert [part["num_pairs"] for part in again["chunks"]] == [2 + count] * 5
            assert torch.equal(collator(examples)["passage_hash"], batch["passage_hash"])
    assert len({d for d in draws if d[0] == 2 and d[1] == 1}) > 1  # the seed does change the draw


def test_inbatch_cross_entropy_by_hand():
    """Columns: positive, 1 hard negative, 2 in-batch negatives; query 1's last pair masked."""
    logits = torch.tensor([[2.0, 0.5, 1.0, 3.0], [1.0, 2.0, -1.0, 9.0]])
    masked = torch.tensor([[False, False, False, False], [False, False, False, True]])
    loss, stats = inbatch_cross_entropy(logits, 2, masked)
    q0 = -2.0 + torch.log(torch.exp(torch.tensor([2.0, 0.5, 1.0, 3.0])).sum())
    q1 = -1.0 + torch.log(torch.exp(torch.tensor([1.0, 2.0, -1.0])).sum())
    assert torch.isclose(loss, (q0 + q1) / 2)
    assert stats["accuracy"] == 0.0  # q0 loses to an in-batch pair, q1 to its hard negative
    assert stats["accuracy_hard"] == 0.5 and stats["accuracy_inbatch"] == 0.5
    assert torch.isclose(stats["margin"], torch.tensor(((2.0 - 3.0) + (1.0 - 2.0)) / 2))
    assert torch.isclose(group_cross_entropy(logits[:, :2])[0], inbatch_cross_entropy(logits[:, :2], 0)[0])


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


INBATCH = ["--micro", "4", "--inbatch", "2"]  # loss.negatives=local, 2 other positives per query
RERANKER_PARITY = {
    "plain": [],
    "chunked-accumulated": ["--chunk", "1", "--accumulation", "2"],
    "inbatch": INBATCH,
    "inbatch-chunked-accumulated": [*INBATCH, "--chunk", "2", "--accumulation", "2"],
}


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
    group = 1 + 3 + (2 if name.startswith("inbatch") else 0)  # tiny_reranker: 3 hard negatives
    assert set(result["group_sizes"]) == {group}, result
