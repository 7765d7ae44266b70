"""Each pooling mode against a hand-computed reference, under left and right padding."""

import pytest
import torch

from embedtrain.model.pooling import pool, truncate

# Two sequences of real lengths 3 and 2 in a batch of length 4.
REAL = [[[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]], [[2.0, 0.0], [4.0, 6.0]]]
EXPECTED = {
    "avg": [[3.0, 5.0], [3.0, 3.0]],
    "cls": [[1.0, 2.0], [2.0, 0.0]],
    "last": [[5.0, 9.0], [4.0, 6.0]],
    # weights 1/6, 2/6, 3/6 and 1/3, 2/3
    "weighted_avg": [[(1 + 6 + 15) / 6, (2 + 8 + 27) / 6], [(2 + 8) / 3, (0 + 12) / 3]],
}


def padded_batch(side):
    hidden, mask = [], []
    for rows in REAL:
        pad = [[99.0, -99.0]] * (4 - len(rows))  # garbage that must never leak into the pool
        hidden.append(rows + pad if side == "right" else pad + rows)
        ones, zeros = [1] * len(rows), [0] * (4 - len(rows))
        mask.append(ones + zeros if side == "right" else zeros + ones)
    return torch.tensor(hidden), torch.tensor(mask)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("mode", sorted(EXPECTED))
def test_pooling_matches_hand_computed(mode, side):
    hidden, mask = padded_batch(side)
    pooled = pool(hidden, mask, mode)
    assert pooled.dtype == torch.float32
    torch.testing.assert_close(pooled, torch.tensor(EXPECTED[mode]), rtol=0, atol=1e-6)


def test_pooling_is_fp32_for_bf16_states():
    hidden, mask = padded_batch("right")
    assert pool(hidden.bfloat16(), mask, "avg").dtype == torch.float32


def test_weighted_avg_is_a_weighted_mean_not_a_sum():
    hidden = torch.ones(1, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    torch.testing.assert_close(pool(hidden, mask, "weighted_avg"), torch.ones(1, 3))


def test_unknown_mode_is_an_error():
    hidden, mask = padded_batch("right")
    with pytest.raises(ValueError, match="unknown pooling mode 'max'"):
        pool(hidden, mask, "max")


def test_matryoshka_truncation_renormalises():
    vectors = torch.tensor([[3.0, 4.0, 12.0]])
    torch.testing.assert_close(truncate(vectors, 2), torch.tensor([[0.6, 0.8]]))
