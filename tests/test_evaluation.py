"""Tests of captum_tracin_we.evaluation: mislabel-detection metrics and the cancellation ratio."""

import itertools

import pytest
import torch

from captum_tracin_we.evaluation import (
    cancellation_ratio,
    flip_labels,
    fraction_found,
    roc_auc,
    roc_curve,
)


def pairwise_auc(scores, positives):
    """The oracle: P(positive scores above negative), ties one half."""
    positives = set(positives)
    pos = [float(s) for i, s in enumerate(scores) if i in positives]
    neg = [float(s) for i, s in enumerate(scores) if i not in positives]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_flip_labels_changes_exactly_the_reported_fraction():
    labels = [i % 4 for i in range(50)]
    noisy, flipped = flip_labels(labels, 0.2, num_labels=4, seed=3)
    assert len(flipped) == 10 and flipped == sorted(set(flipped))
    changed = [i for i, (a, b) in enumerate(zip(labels, noisy)) if a != b]
    assert changed == flipped
    assert all(0 <= label < 4 for label in noisy)
    assert flip_labels(labels, 0.2, 4, seed=3) == (noisy, flipped)
    assert flip_labels(labels, 0.2, 4, seed=4) != (noisy, flipped)
    binary, flipped = flip_labels([0, 1] * 10, 0.5, 2)
    assert all(binary[i] == 1 - [0, 1][i % 2] for i in flipped)
    assert flip_labels(labels, 0.0, 4) == (labels, [])


def test_flip_labels_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"`num_labels` must be at least 2"):
        flip_labels([0, 0], 0.5, 1)
    with pytest.raises(ValueError, match=r"`fraction` must be between 0 and 1, got 1.5"):
        flip_labels([0, 1], 1.5, 2)
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 2\)"):
        flip_labels([0, 2], 0.5, 2)


def test_auc_of_perfect_reversed_and_tied_rankings():
    scores = torch.tensor([0.9, 0.8, 0.1, 0.2, 0.3])
    assert roc_auc(scores, [0, 1]) == 1.0
    assert roc_auc(-scores, [0, 1]) == 0.0
    assert roc_auc(torch.ones(6), [1, 4]) == 0.5
    fpr, tpr = roc_curve(scores, [0, 1])
    assert fpr.tolist() == [0.0, 0.0, 0.0, 1 / 3, 2 / 3, 1.0]
    assert tpr.tolist() == [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]


def test_auc_equals_the_pairwise_oracle_with_ties():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        scores = torch.randint(0, 6, (30,), generator=g).double()  # many ties
        positives = torch.randperm(30, generator=g)[: 3 + trial % 10].tolist()
        assert roc_auc(scores, positives) == pytest.approx(pairwise_auc(scores, positives))
        fpr, tpr = roc_curve(scores, positives)
        assert (fpr.diff() >= 0).all() and (tpr.diff() >= 0).all()


def test_fraction_found():
    scores = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0])
    positives = [0, 2, 9]
    assert fraction_found(scores, positives, [0.0, 0.1, 0.2, 0.3, 0.9, 1.0]) == pytest.approx(
        [0.0, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 1.0]
    )
    assert fraction_found(scores, positives, [0.25]) == pytest.approx([2 / 3])  # ceil(2.5) = 3
    with pytest.raises(ValueError, match=r"`inspected` fractions must be between 0 and 1"):
        fraction_found(scores, positives, [1.2])


def test_rankings_reject_undefined_inputs():
    with pytest.raises(ValueError, match=r"`scores` is empty"):
        roc_auc(torch.zeros(0), [])
    with pytest.raises(ValueError, match=r"at least one and not all"):
        roc_auc(torch.zeros(3), [])
    with pytest.raises(ValueError, match=r"at least one and not all"):
        roc_curve(torch.zeros(2), [0, 1])
    with pytest.raises(ValueError, match=r"`positives` must be indices into `scores` \(0 to 2\)"):
        fraction_found(torch.zeros(3), [3], [0.5])


def test_cancellation_ratio():
    positive = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, 4.0]], dtype=torch.float64)
    assert torch.equal(cancellation_ratio(positive), torch.ones(2, dtype=torch.float64))
    assert torch.equal(cancellation_ratio(-positive), torch.ones(2, dtype=torch.float64))
    mixed = torch.tensor([3.0, -1.0, 2.0, -2.0])
    assert cancellation_ratio(mixed).item() == pytest.approx(8.0 / 2.0)
    assert cancellation_ratio(torch.tensor([1.0, -1.0])).item() == float("inf")
    assert cancellation_ratio(torch.zeros(3)).item() == 1.0
    g = torch.Generator().manual_seed(0)
    random = torch.randn(50, 40, generator=g, dtype=torch.float64)
    ratios = cancellation_ratio(random)
    assert ratios.shape == (50,)
    assert (ratios >= 1).all()
