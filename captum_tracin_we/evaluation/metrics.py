r"""
Metrics of influence scores: mislabel detection by self-influence (label
flipping, ROC curve and AUC, the fraction of flipped examples found in the top
x% of a ranking) and the cancellation ratio. Plain tensors in, numbers out.
"""

from typing import List, Sequence, Tuple

import torch
from torch import Tensor


def flip_labels(
    labels: Sequence[int], fraction: float, num_labels: int, seed: int = 0
) -> Tuple[List[int], List[int]]:
    r"""
    Mislabels a random `fraction` of `labels`: each chosen label is replaced by
    a different label drawn uniformly from the other `num_labels - 1`.

    Args:

            labels (list[int]): The true labels, in `[0, num_labels)`.
            fraction (float): The fraction flipped, in `[0, 1]`; the number
                    flipped is `round(fraction * len(labels))`.
            num_labels (int): The number of classes (at least 2).
            seed (int, optional): Seed of the choice. Default: 0

    Returns:
        (noisy_labels, flipped): the new labels, and the sorted indices of the
        examples whose label was changed.
    """
    if num_labels < 2:
        raise ValueError(f"`num_labels` must be at least 2 to flip a label, got {num_labels}.")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"`fraction` must be between 0 and 1, got {fraction}.")
    labels = [int(label) for label in labels]
    bad = [label for label in labels if not 0 <= label < num_labels]
    if bad:
        raise ValueError(
            f"`labels` must lie in [0, {num_labels}) for `num_labels`={num_labels}; got {bad[0]}."
        )
    generator = torch.Generator().manual_seed(seed)
    count = round(fraction * len(labels))
    flipped = sorted(torch.randperm(len(labels), generator=generator)[:count].tolist())
    noisy = list(labels)
    for i in flipped:
        # a shift of 1..num_labels-1 classes always lands on another label
        shift = int(torch.randint(1, num_labels, (1,), generator=generator))
        noisy[i] = (labels[i] + shift) % num_labels
    return noisy, flipped


def _ranked_hits(scores: Tensor, positives: Sequence[int]) -> Tuple[Tensor, Tensor]:
    r"""Per rank (highest score first): 1 if that example is a positive, and its score."""
    scores = torch.as_tensor(scores).detach().reshape(-1).double()
    if scores.numel() == 0:
        raise ValueError("`scores` is empty: there is nothing to rank.")
    hits = torch.zeros(scores.numel(), dtype=torch.float64)
    positives = [int(i) for i in positives]
    if any(not 0 <= i < scores.numel() for i in positives):
        raise ValueError(
            f"`positives` must be indices into `scores` (0 to {scores.numel() - 1})."
        )
    hits[positives] = 1.0
    if not 0 < hits.sum() < scores.numel():
        raise ValueError(
            "`positives` must hold at least one and not all of the examples, "
            "or the ROC curve is undefined."
        )
    order = torch.argsort(scores, descending=True, stable=True)
    return hits[order], scores[order]


def roc_curve(scores: Tensor, positives: Sequence[int]) -> Tuple[Tensor, Tensor]:
    r"""
    The ROC curve of ranking examples by `scores` (highest first) to find the
    examples `positives` (e.g. the mislabelled ones, ranked by self-influence).
    Tied scores form one step, so the curve does not depend on their order.

    Args:

            scores (Tensor): One score per example, `(n,)`.
            positives (list[int]): The indices of the positive examples.

    Returns:
        (false_positive_rate, true_positive_rate): two float64 tensors, from
        (0, 0) to (1, 1), one point per distinct score.
    """
    hits, ranked = _ranked_hits(scores, positives)
    # the last position of each run of equal scores closes a step
    last = torch.ones_like(ranked, dtype=torch.bool)
    last[:-1] = ranked[1:] != ranked[:-1]
    true_positives = torch.cumsum(hits, 0)[last]
    false_positives = torch.cumsum(1 - hits, 0)[last]
    zero = torch.zeros(1, dtype=torch.float64)
    return (
        torch.cat([zero, false_positives / false_positives[-1]]),
        torch.cat([zero, true_positives / true_positives[-1]]),
    )


def roc_auc(scores: Tensor, positives: Sequence[int]) -> float:
    r"""
    The area under `roc_curve(scores, positives)`: the probability that a
    random positive example scores above a random negative one (ties count
    one half). 1 for a perfect ranking, 0 for a reversed one, 0.5 for chance.
    """
    fpr, tpr = roc_curve(scores, positives)
    return float(torch.trapezoid(tpr, fpr))


def fraction_found(
    scores: Tensor, positives: Sequence[int], inspected: Sequence[float]
) -> List[float]:
    r"""
    For each fraction in `inspected`, the fraction of `positives` among the
    top `ceil(fraction * n)` examples ranked by `scores` (highest first): how
    many mislabelled examples a person finds by checking that share of the data.

    Args:

            scores (Tensor): One score per example, `(n,)`.
            positives (list[int]): The indices of the positive examples.
            inspected (list[float]): Fractions of the data inspected, in [0, 1].

    Returns:
        One fraction of the positives found per entry of `inspected`.
    """
    hits, _ = _ranked_hits(scores, positives)
    found = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(hits, 0)])
    result = []
    for share in inspected:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"`inspected` fractions must be between 0 and 1, got {share}.")
        count = int(torch.ceil(torch.tensor(share * hits.numel() - 1e-9)).clamp(min=0))
        result.append(float(found[count] / found[-1]))
    return result


def cancellation_ratio(scores: Tensor) -> Tensor:
    r"""
    The cancellation ratio `sum_j |I_j| / |sum_j I_j|` of each test example's
    influence scores over the training examples (the last dimension).

    It is 1 when all scores of a test example share one sign, and grows when
    positive and negative scores cancel in their sum (the cancellation effect
    that makes last-layer TracIn scores favour a few examples with large
    gradients). It is always >= 1; it is `inf` when the scores sum to exactly
    zero, and 1 for an all-zero row.

    Args:

            scores (Tensor): Influence scores, `(n_train,)` or `(n_test, n_train)`.

    Returns:
        ratios (Tensor): one ratio per test example, of shape `scores.shape[:-1]`.
    """
    total = scores.abs().sum(dim=-1)
    ratio = total / scores.sum(dim=-1).abs()
    return torch.where(total == 0, torch.ones_like(ratio), ratio)


def ranks(values: Tensor) -> Tensor:
    r"""The ranks of `values` (1D), from 1, ties given their average rank."""
    values = torch.as_tensor(values).double().flatten()
    order = torch.argsort(values, stable=True)
    ranked = torch.empty_like(values)
    ranked[order] = torch.arange(1, values.numel() + 1, dtype=torch.float64)
    unique, inverse = torch.unique(values, return_inverse=True)
    sums = torch.zeros(unique.numel(), dtype=torch.float64).index_add_(0, inverse, ranked)
    counts = torch.bincount(inverse, minlength=unique.numel()).double()
    return (sums / counts)[inverse]


def spearman(x: Tensor, y: Tensor) -> float:
    r"""
    Spearman's rank correlation of two 1D tensors (the Pearson correlation of
    their average ranks); NaN if either is constant, where it is undefined.
    """
    rx, ry = ranks(x), ranks(y)
    if rx.numel() != ry.numel():
        raise ValueError(f"`x` and `y` must have the same length, got {rx.numel()} and {ry.numel()}.")
    rx, ry = rx - rx.mean(), ry - ry.mean()
    norm = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / norm if norm > 0 else float("nan")


def mean_and_interval(values: Tensor, samples: int = 2000) -> Tuple[float, float, float]:
    r"""The mean of `values` and a 95% percentile-bootstrap interval of it (seeded, so results repeat)."""
    generator = torch.Generator().manual_seed(0)
    picks = torch.randint(0, values.numel(), (samples, values.numel()), generator=generator)
    means = values[picks].mean(dim=1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=means.dtype)).tolist()
    return values.mean().item(), low, high
