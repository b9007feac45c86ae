r"""
Further training, the final-model-only gold standard of training-data
attribution: from the final model, train on for t steps with the full data, and
again with training example i removed (or down-weighted), from the same seed and
in the same order; the change of each test example's loss is i's gold score
(positive: i was a proponent, its absence raises the test loss). Each method is
judged by the Spearman correlation, per test example, between its scores and
the gold scores over a sample of training examples, at several t.
"""

import copy
from typing import Any, Callable, Dict, Sequence

import torch
from torch import Tensor
from torch.nn import Module
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from captum_tracin_we._utils.values import check_int, check_number
from captum_tracin_we.evaluation.metrics import mean_and_interval, spearman

# f(weights, steps, seed) -> each test example's loss after `steps` further steps with per-example loss `weights`
TrainFurther = Callable[[Tensor, int, int], Tensor]
MODES = ("remove", "downweight")


def further_train(
    model: Module,
    train_dataset: Dataset,
    test_batch: Sequence[Any],
    loss_fn: Module,
    weights: Tensor,
    steps: int,
    seed: int = 0,
    learning_rate: float = 1e-3,
    batch_size: int = 16,
    first: Sequence[int] = (),
) -> Tensor:
    r"""
    Trains a copy of `model` for `steps` SGD steps on batches of
    `train_dataset` drawn in a seeded order (the same for every `weights`),
    each example's loss (a per-example copy of `loss_fn`) times its entry of
    `weights`, summed over the batch and divided by the batch size; returns
    each test example's loss afterwards (`test_batch`: `(*inputs, labels)`).
    A weight of 0 leaves the example out without changing the order or the
    batches of the others.

    `first` (training indices) opens the order, the rest of the first pass
    following in its seeded order: pass the examples whose removal you measure
    (`further_training_gold`'s `sample`), or those that t steps do not reach
    have a gold score of exactly 0.
    """
    steps, batch_size = check_int(steps, "steps", minimum=0), check_int(batch_size, "batch_size")
    learning_rate = check_number(learning_rate, "learning_rate", 0.0, strict=True)
    n = len(train_dataset)  # type: ignore[arg-type]
    weights = torch.as_tensor(weights, dtype=torch.float64)
    if weights.shape != (n,):
        raise ValueError(
            f"`weights` must hold one weight per training example ({n}), got shape {tuple(weights.shape)}."
        )
    per_example = copy.copy(loss_fn)
    per_example.reduction = "none"
    trained = copy.deepcopy(model)
    trained.eval()  # deterministic: no dropout, as the influence methods see it
    optimizer = torch.optim.SGD(trained.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(check_int(seed, "seed", minimum=0))
    passes = [torch.randperm(n, generator=generator) for _ in range(-(-steps * batch_size // n))]
    if passes and len(first):
        opening = _checked_first(first, n)
        passes[0] = torch.cat([opening, passes[0][~torch.isin(passes[0], opening)]])
    order = torch.cat(passes) if passes else torch.zeros(0, dtype=torch.long)
    for step in range(steps):
        picked = order[step * batch_size:(step + 1) * batch_size].tolist()
        items = [train_dataset[i] for i in picked]
        batch = [torch.stack([item[k] for item in items]) for k in range(len(items[0]))]
        losses = per_example(trained(*batch[:-1]), batch[-1])
        loss = (losses.reshape(len(picked), -1).sum(1) * weights[picked].to(losses.dtype)).sum() / len(picked)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        test_losses = per_example(trained(*test_batch[:-1]), test_batch[-1])
    return test_losses.reshape(test_losses.shape[0], -1).sum(1).double()


def _checked_first(first: Sequence[int], n: int) -> Tensor:
    indices = [check_int(i, "first", minimum=0) for i in first]
    if max(indices) >= n or len(set(indices)) < len(indices):
        raise ValueError(f"`first` must hold distinct training indices from 0 to {n - 1}, got {list(first)!r}.")
    return torch.tensor(indices, dtype=torch.long)


def further_training_gold(
    train_further: TrainFurther,
    n_train: int,
    sample: Sequence[int],
    steps: Sequence[int],
    mode: str = "remove",
    seed: int = 0,
    show_progress: bool = True,
) -> Tensor:
    r"""
    The gold scores `(len(steps), n_test, len(sample))`: for each number of
    further steps t and each sampled training example i, the change of every
    test example's loss when i is removed (weight 0) or, with
    `mode="downweight"`, its loss scaled by `1 - 1/n_train`, against the full
    run with the same seed; by `train_further(weights, t, seed)`, e.g.
    `functools.partial(further_train, model, train, test, loss_fn, first=sample)`
    (with `first`, every sampled example is in the first steps, so none scores
    0 for want of being visited).
    """
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {list(MODES)}, got {mode!r}.")
    sample = [check_int(i, "sample", minimum=0) for i in sample]
    if not sample or max(sample) >= n_train:
        raise ValueError(f"`sample` must hold training indices from 0 to {n_train - 1}, got {sample!r}.")
    gold = []
    runs = tqdm(total=len(steps) * (len(sample) + 1), desc="Further training", disable=not show_progress)
    for t in steps:
        full = torch.as_tensor(train_further(torch.ones(n_train, dtype=torch.float64), t, seed)).double()
        runs.update()
        changes = []
        for i in sample:
            weights = torch.ones(n_train, dtype=torch.float64)
            weights[i] = 0.0 if mode == "remove" else 1.0 - 1.0 / n_train
            changes.append(torch.as_tensor(train_further(weights, t, seed)).double() - full)
            runs.update()
        gold.append(torch.stack(changes, dim=1))  # (n_test, len(sample))
    runs.close()
    return torch.stack(gold)


def further_training_correlation(
    scores: Dict[str, Tensor], gold: Tensor, sample: Sequence[int], steps: Sequence[int]
) -> Dict[str, Dict[int, Dict[str, float]]]:
    r"""
    Per method and number of further steps, the mean over test examples of
    the Spearman correlation between its scores of the sampled training
    examples and their gold scores, with a 95% bootstrap interval.
    """
    sample = list(sample)
    results: Dict[str, Dict[int, Dict[str, float]]] = {}
    for name, matrix in scores.items():
        matrix = torch.as_tensor(matrix).detach().cpu().double()[:, sample]
        per_step = {}
        for t, changes in zip(steps, gold):
            correlations = torch.tensor([spearman(a, b) for a, b in zip(matrix, changes)], dtype=torch.float64)
            defined = correlations[~correlations.isnan()]
            mean, low, high = mean_and_interval(defined) if defined.numel() else (float("nan"),) * 3
            per_step[int(t)] = {"mean": mean, "ci_low": low, "ci_high": high}
        results[name] = per_step
    return results

