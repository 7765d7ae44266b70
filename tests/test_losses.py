"""InfoNCE against hand-computed references; logits stay fp32 for bf16 embeddings."""

import math

import torch
import torch.nn.functional as F

from embedtrain.losses import (
    duplicate_positive_mask,
    group_info_nce,
    matryoshka,
    pooled_info_nce,
    positive_targets,
    scores,
)


def unit(rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


QUERIES = unit([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
# two passages per query: positive, then one hard negative
PASSAGES = unit([[1.0, 0.2, 0.0], [0.0, 1.0, 0.3], [0.1, 1.0, 0.0], [1.0, 0.0, 0.5]])
TAU = 0.5  # large enough that every term of the reference matters


def dot(a, b):
    return sum(x * y for x, y in zip(a.tolist(), b.tolist()))


def reference_loss(candidates):
    """-log softmax of the first candidate, averaged over queries, in plain Python."""
    total = 0.0
    for i, cands in enumerate(candidates):
        logits = [dot(QUERIES[i], PASSAGES[j]) / TAU for j in cands]
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
