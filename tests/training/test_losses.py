"""Each loss's value and gradient on inputs small enough to check by hand; the PK sampler's batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.training import CenterLoss, Mining, PKSampler, contrastive_loss, semi_hard_negatives, triplet_loss
from app.training.losses import pairwise_squared_distances


def grad(t: torch.Tensor) -> torch.Tensor:
    """The gradient backward() left on a leaf tensor."""
    assert t.grad is not None
    return t.grad


def points(*xs: float) -> torch.Tensor:
    """1-d embeddings at the given positions (distances are then (xi - xj)^2)."""
    return torch.tensor([[x] for x in xs], dtype=torch.float64, requires_grad=True)


# ------------------------------------------------------------------------------------------------- triplet


@pytest.mark.parametrize("mining", list(Mining))
def test_triplet_is_zero_with_zero_gradient_when_the_negative_is_beyond_the_margin(mining: Mining) -> None:
    # a=0, p=0.1 (d_ap = 0.01), n=1 (d_an = 1): 0.01 - 1 + 0.2 < 0 for every anchor
    x = points(0.0, 0.1, 1.0)
    loss = triplet_loss(x, torch.tensor([0, 0, 1]), margin=0.2, mining=mining)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(grad(x)) == 0


def test_triplet_value_and_gradient_of_one_violating_triplet() -> None:
    # a=0, p=0.5, n=0.6: d_ap = 0.25, d_an = 0.36; anchor a: 0.25 - 0.36 + 0.2 = 0.09 > 0.
    # anchor p: d(p,a) = 0.25, d(p,n) = 0.01: 0.25 - 0.01 + 0.2 = 0.44. Only anchors with a negative count.
    x = points(0.0, 0.5, 0.6)
    labels = torch.tensor([0, 0, 1])
    loss = triplet_loss(x, labels, margin=0.2, mining=Mining.batch_all)
    assert loss.item() == pytest.approx((0.09 + 0.44) / 2)
    loss.backward()
    # d/da [(a-p)^2 - (a-n)^2] = 2(a-p) - 2(a-n) = 2(n-p) = 0.2 (anchor a's triplet);
    # from anchor p's triplet, a is the positive: d/da (p-a)^2 = -2(p-a) = -1.0; halved by the mean.
    assert float(grad(x)[0, 0]) == pytest.approx((0.2 - 1.0) / 2)


def test_batch_all_averages_only_the_triplets_that_violate_the_margin() -> None:
    # class 0 at 0 and 0.1; class 1 at 0.3 (close) and 5 (far): some triplets active, some not
    x = points(0.0, 0.1, 0.3, 5.0)
    labels = torch.tensor([0, 0, 1, 1])
    d = pairwise_squared_distances(x.detach())
    expected = []
    for a in range(4):
        for p in range(4):
            for n in range(4):
                if a != p and labels[a] == labels[p] and labels[a] != labels[n]:
                    value = float(d[a, p] - d[a, n] + 0.2)
                    if value > 0:
                        expected.append(value)
    assert 0 < len(expected) < 8  # a mix
    assert triplet_loss(x, labels, margin=0.2, mining="batch_all").item() == pytest.approx(np.mean(expected))


def test_batch_hard_uses_each_anchors_farthest_positive_and_nearest_negative() -> None:
    # class 0 at 0, 0.1, 0.4; class 1 at 0.5 and 3
    x = points(0.0, 0.1, 0.4, 0.5, 3.0)
    labels = torch.tensor([0, 0, 0, 1, 1])
    d = pairwise_squared_distances(x.detach()).numpy()
    expected = []
    for a in range(5):
        pos = [d[a, p] for p in range(5) if p != a and labels[p] == labels[a]]
        neg = [d[a, n] for n in range(5) if labels[n] != labels[a]]
        expected.append(max(0.0, max(pos) - min(neg) + 0.2))
    loss = triplet_loss(x, labels, margin=0.2, mining="batch_hard")
    assert loss.item() == pytest.approx(np.mean(expected))
    # anchor 0: farthest positive 0.4 (d 0.16), nearest negative 0.5 (d 0.25): 0.16 - 0.25 + 0.2 = 0.11
    assert expected[0] == pytest.approx(0.11)
    loss.backward()
    # the same triplets written out by hand give the same gradient
    y = x.detach().clone().requires_grad_(True)
    hand = []
    for a in range(5):
        far = max((p for p in range(5) if p != a and labels[p] == labels[a]), key=lambda p: d[a, p])
        near = min((n for n in range(5) if labels[n] != labels[a]), key=lambda n: d[a, n])
        hand.append(torch.relu((y[a] - y[far]) ** 2 - (y[a] - y[near]) ** 2 + 0.2).sum())
    torch.stack(hand).mean().backward()
    assert torch.allclose(grad(x), grad(y))


def test_semi_hard_picks_the_nearest_negative_farther_than_the_positive() -> None:
    # anchor 0 at 0, positive at 0.3 (d 0.09). Negatives: 0.2 (d 0.04, harder than the positive: not semi-hard),
    # 0.4 (d 0.16, semi-hard: within margin 0.2 of 0.09), 0.45 (d 0.2025, semi-hard but farther), 2 (d 4, easy).
    x = points(0.0, 0.3, 0.2, 0.4, 0.45, 2.0)
    labels = torch.tensor([0, 0, 1, 1, 1, 1])
    d = pairwise_squared_distances(x.detach())
    chosen = semi_hard_negatives(d, labels, torch.tensor([0]), torch.tensor([1]))
    assert chosen.tolist() == [3]  # farther than the positive, within the margin, the nearest such
    assert d[0, 1] < d[0, 3] < d[0, 1] + 0.2


def test_semi_hard_falls_back_to_the_farthest_negative_when_all_are_harder() -> None:
    x = points(0.0, 1.0, 0.1, 0.2)  # positive at d 1, negatives at d 0.01 and 0.04: none farther
    labels = torch.tensor([0, 0, 1, 1])
    d = pairwise_squared_distances(x.detach())
    assert semi_hard_negatives(d, labels, torch.tensor([0]), torch.tensor([1])).tolist() == [3]


def test_semi_hard_loss_value_and_gradient() -> None:
    # anchor 0 at 0, positive 0.3; negatives 0.4 and 2. Anchor 0 -> n=0.4: 0.09 - 0.16 + 0.2 = 0.13.
    # anchor 1 (0.3) -> positive 0 (d 0.09); negatives 0.4 (d 0.01, harder) and 2 (d 2.89, farther): 2 is chosen,
    # 0.09 - 2.89 + 0.2 < 0 -> 0. Loss = mean(0.13, 0) = 0.065.
    x = points(0.0, 0.3, 0.4, 2.0)
    labels = torch.tensor([0, 0, 1, 1])
    loss = triplet_loss(x, labels, margin=0.2, mining="semi_hard")
    # anchors 2 and 3 (class 1): 2 -> p 3 (d 2.56), negatives 0 (0.16), 0.3 (0.01): none farther -> farthest (0):
    # 2.56 - 0.16 + 0.2 = 2.6; 3 -> p 2 (2.56), negatives d 4 and 2.89: nearest farther is 0.3 (2.89):
    # 2.56 - 2.89 + 0.2 = -0.13 -> 0.
    assert loss.item() == pytest.approx((0.13 + 0.0 + 2.6 + 0.0) / 4)
    loss.backward()
    # only the triplets (0,1,2) and (2,3,0) are active: d/dx0 = [2(x0-x1) - 2(x0-x2)] + [-(-2)(x2-x0)... computed:
    # triplet (a=0,p=1,n=2): d/dx0 = 2(x0 - x1) - 2(x0 - x2) = 2(x2 - x1) = 0.2
    # triplet (a=2,p=3,n=0): x0 is the negative: d/dx0 of -(x2 - x0)^2 = 2(x2 - x0) = 0.8
    assert float(grad(x)[0, 0]) == pytest.approx((0.2 + 0.8) / 4)


# ---------------------------------------------------------------------------------------------- contrastive


def test_contrastive_value_and_gradient() -> None:
    # pairs: (0,1) same at d=0.5 -> 0.25; (0,2) different at d=0.8 -> (1-0.8)^2 = 0.04; (1,2) different at d=0.3
    # -> 0.49. Loss = 0.5 * mean = 0.5 * 0.78 / 3 = 0.13
    x = points(0.0, 0.5, 0.8)
    loss = contrastive_loss(x, torch.tensor([0, 0, 1]), margin=1.0)
    assert loss.item() == pytest.approx(0.5 * (0.25 + 0.04 + 0.49) / 3)
    loss.backward()
    # d/dx0: same pair (x0-x1)^2 -> 2(x0-x1) = -1; different (0,2): (1 - (x2-x0))^2 -> 2(1 - 0.8) * 1 = 0.4
    assert float(grad(x)[0, 0]) == pytest.approx(0.5 * (-1.0 + 0.4) / 3)


def test_contrastive_ignores_different_pairs_beyond_the_margin() -> None:
    x = points(0.0, 0.0, 3.0)
    loss = contrastive_loss(x, torch.tensor([0, 0, 1]), margin=1.0)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(grad(x)) == 0


# ------------------------------------------------------------------------------------------------- center


def test_center_loss_pulls_each_embedding_to_its_centre() -> None:
    center = CenterLoss(2, 1)
    with torch.no_grad():
        center.centers.copy_(torch.tensor([[0.0], [1.0]]))
    x = points(0.5, 1.5, 1.0)
    labels = torch.tensor([0, 1, 1])
    loss = center(x, labels)
    assert loss.item() == pytest.approx(0.5 * (0.25 + 0.25 + 0.0) / 3)
    loss.backward()
    # the gradient points away from the centre, so a descent step moves each embedding toward it
    assert grad(x)[:, 0].tolist() == pytest.approx([0.5 / 3, 0.5 / 3, 0.0])
    assert grad(center.centers)[:, 0].tolist() == pytest.approx([-0.5 / 3, -0.5 / 3])
    with torch.no_grad():
        moved = x - 0.5 * grad(x)
    assert center(moved, labels).item() < loss.item()


def test_center_init_puts_each_centre_at_its_identitys_mean() -> None:
    center = CenterLoss(2, 1)
    center.init_centers(torch.tensor([[0.0], [2.0], [5.0]]), torch.tensor([0, 0, 1]))
    assert center.centers[:, 0].tolist() == [1.0, 5.0]


# ------------------------------------------------------------------------------------------------ sampler


def test_pk_batches_have_p_identities_of_k_faces_and_repeat_with_the_seed() -> None:
    labels = np.repeat(np.arange(10), [5, 5, 5, 5, 3, 2, 6, 4, 1, 8])  # identity 8 has one face: never sampled
    sampler = PKSampler(labels, p=4, k=3, seed=7)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2  # 9 eligible identities: groups of 4, 4 and a dropped single one
    seen = set()
    for batch in batches:
        ids, counts = np.unique(labels[batch], return_counts=True)
        assert len(ids) == 4 and set(counts.tolist()) == {3}
        seen |= set(ids.tolist())
        for i in ids:  # faces of an identity with >= K faces are distinct
            rows = batch[labels[batch] == i]
            if np.count_nonzero(labels == i) >= 3:
                assert len(set(rows.tolist())) == 3
    assert 8 not in seen
    again = list(PKSampler(labels, p=4, k=3, seed=7))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(batches, PKSampler(labels, p=4, k=3, seed=8), strict=False))


def test_pk_sampler_refuses_what_cannot_make_triplets() -> None:
    with pytest.raises(ValueError):
        PKSampler(np.array([0, 0, 1]), p=2, k=2)  # one identity with 2 faces
    with pytest.raises(ValueError):
        PKSampler(np.array([0, 0, 1, 1]), p=1, k=2)
