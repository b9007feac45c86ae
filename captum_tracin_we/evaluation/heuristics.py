r"""
Quanda's heuristic metrics of training-data attribution (Hanawa et al. 2021;
Barshan et al. 2020; Adebayo et al. 2018), computed from plain `(n_test,
n_train)` score matrices, so they judge any method:

- `identical_class`: how often a test example's top proponent has its label;
- `top_k_cardinality`: how many distinct training examples the top-k lists of
  all test examples hold, over their total size (1: every test example has its
  own; low: the same few examples explain everything);
- `randomization_correlation`: the mean Spearman correlation, per test example,
  between the scores of the trained model and of `randomized_model(model)`, one
  with re-initialised weights (an attribution that does not depend on what the
  model learnt keeps a high correlation; lower is better).
"""

import copy

import torch
from torch import Tensor
from torch.nn import Module

from captum_tracin_we._utils.values import check_int
from captum_tracin_we.evaluation.metrics import spearman


def identical_class(scores: Tensor, train_labels: Tensor, test_labels: Tensor) -> float:
    r"""The fraction of test examples whose highest-scored training example has the test example's label."""
    scores = _matrix(scores)
    train_labels, test_labels = torch.as_tensor(train_labels).flatten(), torch.as_tensor(test_labels).flatten()
    if train_labels.numel() != scores.shape[1] or test_labels.numel() != scores.shape[0]:
        raise ValueError(
            f"`scores` is {tuple(scores.shape)} (n_test, n_train), but there are {test_labels.numel()} test and "
            f"{train_labels.numel()} training labels."
        )
    top = scores.argmax(dim=1)
    return float((train_labels[top] == test_labels).double().mean())


def top_k_cardinality(scores: Tensor, k: int = 1) -> float:
    r"""
    The number of distinct training examples among every test example's `k`
    proponents, over `n_test * k` (at most 1).
    """
    scores = _matrix(scores)
    k = min(check_int(k, "k"), scores.shape[1])
    top = scores.topk(k, dim=1).indices
    return torch.unique(top).numel() / top.numel()


def randomization_correlation(scores: Tensor, randomized_scores: Tensor) -> float:
    r"""
    The mean over test examples of the Spearman correlation between a row of
    `scores` and the same row of `randomized_scores` (the same method on a
    model with re-initialised weights); rows where it is undefined are left out.
    """
    scores, randomized_scores = _matrix(scores), _matrix(randomized_scores, "randomized_scores")
    if scores.shape != randomized_scores.shape:
        raise ValueError(
            f"`scores` {tuple(scores.shape)} and `randomized_scores` {tuple(randomized_scores.shape)} must score "
            "the same test and training examples."
        )
    correlations = torch.tensor([spearman(a, b) for a, b in zip(scores, randomized_scores)], dtype=torch.float64)
    return float(correlations[~correlations.isnan()].mean())


def randomized_model(model: Module, seed: int = 0) -> Module:
    r"""
    A copy of `model` whose every submodule with a `reset_parameters` method
    (linear layers, embeddings, norms, convolutions) is re-initialised from
    `seed`; `model` itself is left as it is.
    """
    randomized = copy.deepcopy(model)
    state = torch.random.get_rng_state()
    torch.manual_seed(check_int(seed, "seed", minimum=0))
    try:
        for module in randomized.modules():
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
    finally:
        torch.random.set_rng_state(state)
    return randomized


def _matrix(scores: Tensor, name: str = "scores") -> Tensor:
    scores = torch.as_tensor(scores).detach().cpu().double()
    if scores.dim() != 2 or not scores.numel():
        raise ValueError(f"`{name}` must be a non-empty (n_test, n_train) matrix, got shape {tuple(scores.shape)}.")
    return scores
