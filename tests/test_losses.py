"""InfoNCE against hand-computed references; logits stay fp32 for bf16 embeddings."""

import math

import pytest
import torch
import torch.nn.functional as F

from embedtrain.config import LossConfig
from embedtrain.losses import (
    duplicate_positive_mask,
    group_cross_entropy,
    group_info_nce,
    group_positive_mask,
    matryoshka,
    pooled_info_nce,
    positive_targets,
    scores,
)
from embedtrain.train.step import distill_loss, negatives_loss, reranker_backward, reranker_loss


def unit(rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


QUERIES = unit([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
# two passages per query: positive, then one hard negative
PASSAGES = unit([[1.0, 0.2, 0.0], [0.0, 1.0, 0.3], [0.1, 1.0, 0.0], [1.0, 0.0, 0.5]])
TAU = 0.5  # large enough that every term of the reference matters


def dot(a, b):
    return sum(x * y for x, y in zip(a.tolist(), b.tolist()))


def reference_loss(candidates, queries=QUERIES, passages=PASSAGES):
    """-log softmax of the first candidate (passage indices), averaged over queries, in plain Python."""
    total = 0.0
    for i, cands in enumerate(candidates):
        logits = [dot(queries[i], passages[j]) / TAU for j in cands]
        total += -(logits[0] - math.log(sum(math.exp(x) for x in logits)))
    return total / len(candidates)


def test_group_loss_matches_hand_computed():
    loss, logits = group_info_nce(QUERIES, PASSAGES, TAU)
    assert logits.shape == (2, 2)
    assert math.isclose(loss.item(), reference_loss([[0, 1], [2, 3]]), rel_tol=1e-6)


def test_local_pool_loss_matches_hand_computed():
    targets = positive_targets(2, 2)
    loss, _ = pooled_info_nce(QUERIES, PASSAGES, targets, TAU)
    # every passage of the micro-batch is a candidate; positive first in the reference ordering
    assert math.isclose(loss.item(), reference_loss([[0, 1, 2, 3], [2, 0, 1, 3]]), rel_tol=1e-6)


def test_duplicates_of_the_positive_are_masked_but_the_positive_is_not():
    targets = positive_targets(2, 2)
    pool_hash = torch.tensor([10, 11, 20, 10])  # passage 3 has the same text as query 0's positive
    masked = duplicate_positive_mask(torch.tensor([10, 20]), pool_hash, targets)
    assert masked.tolist() == [[False, False, False, True], [False, False, False, False]]
    loss, _ = pooled_info_nce(QUERIES, PASSAGES, targets, TAU, masked)
    assert math.isclose(loss.item(), reference_loss([[0, 1, 2], [2, 0, 1, 3]]), rel_tol=1e-6)


def test_sibling_positives_are_masked_for_their_own_query_only():
    """Three queries, two passages each. Query 0 knows positives 10 and 11; its sibling 11 sits in
    query 1's group (a hard negative there). Query 2's two known positives are 30 and its padding
    repeat. Each query's target is never masked, even when its text is another query's positive."""
    targets = positive_targets(3, 2)  # [0, 2, 4]
    pool_hash = torch.tensor([10, 12, 20, 11, 30, 10])
    positive_hash = torch.tensor([[10, 11], [20, 20], [30, 30]])
    masked = duplicate_positive_mask(positive_hash, pool_hash, targets)
    assert masked.tolist() == [
        [False, False, False, True, False, True],  # the sibling 11 (query 1's group) and a copy of 10
        [False, False, False, False, False, False],  # 11 and 10 are plain negatives for query 1
        [False, False, False, False, False, False],
    ]
    # a (Q,) tensor is one known positive per query: the sibling is then a negative again
    masked_one = duplicate_positive_mask(positive_hash[:, 0], pool_hash, targets)
    assert masked_one[0].tolist() == [False, False, False, False, False, True]
    # the target itself stays, even if it repeats another positive of the same query
    masked_swapped = duplicate_positive_mask(
        torch.tensor([[11, 10], [20, 20], [30, 30]]), pool_hash, torch.tensor([3, 2, 4])
    )
    assert masked_swapped[0].tolist() == [True, False, False, False, False, True]


def test_logits_are_fp32_for_bf16_embeddings():
    q, p = QUERIES.bfloat16(), PASSAGES.bfloat16()
    assert scores(q, p, TAU).dtype == torch.float32
    loss, logits = group_info_nce(q, p, TAU)
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32
    loss, logits = pooled_info_nce(q, p, positive_targets(2, 2), TAU)
    assert logits.dtype == torch.float32


def test_gradient_flows_to_queries_and_passages():
    q, p = QUERIES.clone().requires_grad_(), PASSAGES.clone().requires_grad_()
    group_info_nce(q, p, TAU)[0].backward()
    assert q.grad.abs().sum() > 0 and p.grad.abs().sum() > 0


def test_matryoshka_sums_a_loss_over_its_truncations_with_their_weights():
    seen = []

    def loss_at_dim(dim):
        seen.append(dim)
        return torch.tensor(float(dim or 100))

    total, losses = matryoshka(loss_at_dim, [8, 32], [0.25, 2.0])
    assert seen == [8, 32] and [t.item() for t in losses] == [8.0, 32.0] and total.item() == 0.25 * 8 + 2.0 * 32
    total, losses = matryoshka(loss_at_dim, [8, 32])  # weights default to 1 each
    assert total.item() == 40.0
    total, losses = matryoshka(loss_at_dim, None)  # no dims: the full embedding alone, weight 1
    assert seen[-1] is None and len(losses) == 1 and total.item() == 100.0


# Query 0's group holds a copy of its positive (same text: same hash, same embedding) and a sibling
# positive (another of its known positives, mined as a "hard negative"); query 1's group is clean.
MASK_QUERIES = unit([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
MASK_PASSAGES = unit(
    [[1.0, 0.2, 0.0], [1.0, 0.2, 0.0], [0.9, 0.0, 0.4], [0.3, 0.3, 1.0]]
    + [[0.0, 1.0, 0.3], [0.1, 1.0, 0.0], [1.0, 0.0, 0.5], [0.2, 0.5, 1.0]]
)
MASK_POSITIVES = torch.tensor([[10, 12], [20, 20]])  # (Q, K) known positives, target first, padded by repeat
MASK_HASHES = torch.tensor([10, 10, 12, 13, 20, 21, 22, 23])
ALL = list(range(8))


def pool_reference(candidates):
    """reference_loss over the masking example's queries and pool."""
    return reference_loss(candidates, MASK_QUERIES, MASK_PASSAGES)


def test_group_positive_mask_marks_copies_and_siblings_in_their_own_group_only():
    mask = group_positive_mask(MASK_POSITIVES, MASK_HASHES)
    assert mask.tolist() == [[False, True, True, False], [False] * 4]
    # a (Q,) hash vector is K = 1: only copies of the target
    assert group_positive_mask(MASK_POSITIVES[:, 0], MASK_HASHES).tolist() == [[False, True, False, False], [False] * 4]


@pytest.mark.parametrize(
    "pool, masked, unmasked",
    [
        ("group", [[0, 3], [4, 5, 6, 7]], [[0, 1, 2, 3], [4, 5, 6, 7]]),
        ("local", [[0, 3, 4, 5, 6, 7], [4, 0, 1, 2, 3, 5, 6, 7]], [ALL, [4, 0, 1, 2, 3, 5, 6, 7]]),
        ("global", [[0, 3, 4, 5, 6, 7], [4, 0, 1, 2, 3, 5, 6, 7]], [ALL, [4, 0, 1, 2, 3, 5, 6, 7]]),
    ],
)
def test_every_pool_masks_negatives_equal_to_a_positive(pool, masked, unmasked):
    """Each pool's loss (one process: `global` pools this rank's passages) equals InfoNCE with the
    copy and the sibling removed from query 0's candidates, and differs from the loss with them."""
    config = LossConfig(negatives=pool, hard_negatives=3, temperature=TAU)
    loss, _ = negatives_loss(MASK_QUERIES, MASK_PASSAGES, MASK_POSITIVES, MASK_HASHES, config)
    assert abs(loss.item() - pool_reference(masked)) < 1e-6
    assert abs(loss.item() - pool_reference(unmasked)) > 1e-2  # the mask matters in this data


def test_reranker_loss_masks_pairs_equal_to_a_positive():
    """A cross-encoder's negatives that are one of the query's positives leave the loss and stats."""
    logits = torch.tensor([[2.0, 2.0, 1.5, 0.5], [1.0, 0.5, -1.0, 0.0]])  # query 0: a copy, a sibling, a negative
    loss, stats = group_cross_entropy(logits, group_positive_mask(MASK_POSITIVES, MASK_HASHES))
    kept = F.cross_entropy(logits[:1, [0, 3]], torch.tensor([0])) + F.cross_entropy(logits[1:], torch.tensor([0]))
    expected = kept / 2
    assert abs(loss.item() - expected.item()) < 1e-6
    assert stats["accuracy"].item() == 1.0 and abs(stats["margin"].item() - 1.0) < 1e-6  # (1.5 + 0.5) / 2
    assert abs(group_cross_entropy(logits)[0].item() - expected.item()) > 1e-2


def test_distillation_kl_under_the_group_pool_drops_the_same_negatives():
    """loss.distill's KL term under `group` has the contrastive term's candidates: the masked ones go."""
    weights = {"teacher_cache": "unused", "contrastive": 0.0, "cosine": 0.0, "mse": 0.0, "kl": 1.0}
    weights["kl_temperature"] = TAU
    config = LossConfig(negatives="group", hard_negatives=3, temperature=TAU, distill=weights)
    teacher_q = F.normalize(MASK_QUERIES + 0.3, dim=-1)  # another embedding space; copies stay copies
    teacher_p = F.normalize(MASK_PASSAGES**2 + 0.1, dim=-1)
    batch = {
        "teacher_query": teacher_q,
        "teacher_passage": teacher_p,
        "positive_hash": MASK_POSITIVES,
        "passage_hash": MASK_HASHES,
    }
    queries, passages = torch.cat([MASK_QUERIES, teacher_q], -1), torch.cat([MASK_PASSAGES, teacher_p], -1)
    total, stats = distill_loss(queries, passages, batch, config, "cpu")

    def kl(candidates):
        result = 0.0
        for i, cands in enumerate(candidates):
            s = F.softmax(torch.tensor([dot(MASK_QUERIES[i], MASK_PASSAGES[j]) / TAU for j in cands]), -1)
            t = F.softmax(torch.tensor([dot(teacher_q[i], teacher_p[j]) / TAU for j in cands]), -1)
            result += (t * (t.log() - s.log())).sum().item() / len(candidates)
        return result

    assert abs(stats["distill_kl"].item() - kl([[0, 3], [4, 5, 6, 7]])) < 1e-6
    assert abs(stats["distill_kl"].item() - kl([[0, 1, 2, 3], [4, 5, 6, 7]])) > 1e-3


def test_chunked_reranker_backward_masks_each_chunk_with_its_own_queries():
    """Under train.grad_cache_chunk_size each chunk of queries gets its own rows of the mask: the
    chunked loss equals the masked loss of the whole micro-batch."""
    logits = torch.tensor([2.0, 2.0, 1.5, 0.5, 1.0, 0.5, -1.0, 0.0])

    class Engine:  # a DeepSpeed engine's surface: the pair logits are the inputs themselves
        device = "cpu"

        def __call__(self, inputs):
            return inputs

        def backward(self, loss, scale_wrt_gas):
            pass

        def step(self):
            pass

    batch = {
        "group_size": 4,
        "positive_hash": MASK_POSITIVES,
        "passage_hash": MASK_HASHES,
        "chunks": [{"inputs": logits[:4], "num_pairs": 4}, {"inputs": logits[4:], "num_pairs": 4}],
    }
    loss, _ = reranker_backward(Engine(), batch, accumulation=1)
    whole, _ = group_cross_entropy(logits.view(2, 4), group_positive_mask(MASK_POSITIVES, MASK_HASHES))
    assert abs(loss.item() - whole.item()) < 1e-6
    assert abs(loss.item() - reranker_loss(Engine(), batch, "cpu")[0].item()) < 1e-6
