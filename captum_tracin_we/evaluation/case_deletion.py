r"""
Case deletion: the test of an influence method that retrains without the
training examples it ranks highest. Removing a test example's top-k proponents
should lower the predicted probability of its label (DEL+, the drop), and
removing its top-k opponents should raise it (DEL-, the rise); a better method
gives larger values of both. Random deletion is the control.

The retraining is a function you pass, so any model, trainer and Captum
influence method can be evaluated; `case_deletion` only chooses what to delete,
calls it, and summarises the changes with bootstrap confidence intervals.
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.data import Sampler
from tqdm.auto import tqdm

from captum_tracin_we._utils.values import is_int
from captum_tracin_we.evaluation.metrics import mean_and_interval

RANDOM = "random"
PROPONENTS = "proponents"
OPPONENTS = "opponents"

# (training indices kept, seed) -> probability of each test example's label, shape (n_test,)
RetrainAndPredict = Callable[[List[int], int], Tensor]


@dataclass
class DeletionEffect:
    r"""
    What deleting one method's top-k proponents (or opponents) did.

    Attributes:

        method (str): The method that ranked the training examples.
        k (int): How many were deleted, per test example.
        deleted (str): "proponents" (DEL+) or "opponents" (DEL-).
        changes (Tensor): `(len(test_indices), len(seeds))`: for proponents the drop
                `p_full - p_deleted` of the probability of the test example's
                label, for opponents the rise `p_deleted - p_full`; each pair of
                models trained from the same seed. Larger is better for both.
        mean (float): The mean over test examples of their mean over seeds.
        ci_low, ci_high (float): A 95% bootstrap confidence interval of `mean`,
                resampling test examples.
    """

    method: str
    k: int
    deleted: str
    changes: Tensor
    mean: float
    ci_low: float
    ci_high: float


@dataclass
class CaseDeletionResults:
    r"""All `DeletionEffect`s of a `case_deletion` run, and its settings."""

    effects: List[DeletionEffect]
    test_indices: List[int]
    ks: List[int]
    seeds: List[int]
    retrains: int = 0
    full_probabilities: Dict[int, Tensor] = field(default_factory=dict)

    def effect(self, method: str, k: int, deleted: str) -> DeletionEffect:
        for effect in self.effects:
            if (effect.method, effect.k, effect.deleted) == (method, k, deleted):
                return effect
        raise KeyError(f"No effect for method {method!r}, k={k}, deleted={deleted!r}.")

    @property
    def methods(self) -> List[str]:
        return list(dict.fromkeys(effect.method for effect in self.effects))

    def table(self) -> str:
        r"""A markdown table: per method and k, DEL+ and DEL- with their 95% intervals."""
        lines = [
            "| method | k | DEL+ (drop, higher is better) | DEL- (rise, higher is better) |",
            "|---|---:|---|---|",
        ]
        for method in self.methods:
            for k in self.ks:
                cells = [_interval(self.effect(method, k, kind)) for kind in (PROPONENTS, OPPONENTS)]
                lines.append(f"| {method} | {k} | {cells[0]} | {cells[1]} |")
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, object]:
        r"""Plain lists and numbers (e.g. for JSON)."""
        return {
            "test_indices": self.test_indices, "ks": self.ks, "seeds": self.seeds,
            "retrains": self.retrains,
            "effects": [
                {"method": e.method, "k": e.k, "deleted": e.deleted, "mean": e.mean,
                 "ci_low": e.ci_low, "ci_high": e.ci_high, "changes": e.changes.tolist()}
                for e in self.effects
            ],
        }

    @classmethod
    def from_dict(cls, saved: Dict[str, object]) -> "CaseDeletionResults":
        r"""The results `to_dict` gave (e.g. read back from JSON); `full_probabilities` are not saved."""
        effects = [
            DeletionEffect(e["method"], e["k"], e["deleted"], torch.tensor(e["changes"], dtype=torch.float64),
                           e["mean"], e["ci_low"], e["ci_high"])
            for e in saved["effects"]  # type: ignore[union-attr]
        ]
        return cls(effects, list(saved["test_indices"]), list(saved["ks"]), list(saved["seeds"]),  # type: ignore
                   retrains=int(saved["retrains"]))  # type: ignore[call-overload]


class SameOrderSampler(Sampler[int]):
    r"""
    Visits the training examples `kept` in the order a seeded shuffle gives the
    whole training set, with the others left out: every epoch draws a
    permutation of all `num_examples` indices from `(seed, epoch)` and drops the
    deleted ones. Models retrained after a deletion then see the remaining
    examples in the same order as the full model, so the difference between the
    two measures the deletion rather than a new shuffle.

    Args:

            kept (list[int]): The indices to train on.
            num_examples (int): The size of the full training set.
            seed (int): Seed of the shuffles.
    """

    def __init__(self, kept: Sequence[int], num_examples: int, seed: int) -> None:
        self.keep = torch.zeros(num_examples, dtype=torch.bool)
        self.keep[torch.as_tensor(list(kept), dtype=torch.long)] = True
        self.seed, self.epoch = seed, 0

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        self.epoch += 1
        order = torch.randperm(self.keep.numel(), generator=generator)
        return iter(order[self.keep[order]].tolist())

    def __len__(self) -> int:
        return int(self.keep.sum())


def top_k_training_indices(scores: Tensor, k: int, proponents: bool = True) -> Tensor:
    r"""
    Per test example (row of `scores`, `(n_test, n_train)`), the indices of its
    `k` highest-scoring (proponents) or lowest-scoring (opponents) training
    examples, `(n_test, k)`; ties go to the smaller index.
    """
    if k > scores.shape[1]:
        raise ValueError(f"`k`={k} exceeds the {scores.shape[1]} training examples.")
    signed = scores if proponents else -scores
    order = torch.argsort(-signed.double(), dim=1, stable=True)
    return order[:, :k]


def case_deletion(
    retrain_and_predict: RetrainAndPredict,
    scores: Dict[str, Tensor],
    ks: Sequence[int] = (10, 20, 50),
    seeds: Sequence[int] = (0, 1, 2),
    random_control: bool = True,
    test_indices: Optional[Sequence[int]] = None,
    bootstrap_samples: int = 2000,
    show_progress: bool = True,
) -> CaseDeletionResults:
    r"""
    Runs case deletion for several influence methods on the same test examples.

    For every seed, the model is trained once on all the training data; then,
    for every test example, method, k, and proponents and opponents, once more
    without that test example's top-k training examples by that method, from
    the same seed. Identical deletion sets are retrained only once per seed.

    Args:

            retrain_and_predict (Callable): `f(kept, seed)` trains a fresh model
                    from `seed` on the training examples whose indices are in
                    `kept` (sorted), and returns the probability of each test
                    example's label, a 1D tensor with one entry per test example
                    (in the order of the rows of `scores`). It must be
                    deterministic: the same `kept` and `seed` give the same model.
            scores (dict[str, Tensor]): Per method name, its influence scores
                    `(n_test, n_train)` (e.g. `TracInWE.influence(test_batch)`).
                    Every method must score the same examples.
            ks (list[int], optional): Numbers of training examples deleted.
                    Default: (10, 20, 50)
            seeds (list[int], optional): Training seeds. Default: (0, 1, 2)
            random_control (bool, optional): Add the method "random", which
                    ranks the training examples of each test example by a seeded
                    random score: its top k (or bottom k) are deleted, so its
                    sets differ per test example and sign, and grow with k like
                    every method's. Default: True
            test_indices (list[int], optional): The rows of `scores` to evaluate
                    (distinct); None evaluates all. Default: None
            bootstrap_samples (int, optional): Resamples of the confidence
                    intervals (seeded, so results repeat). Default: 2000
            show_progress (bool, optional): A progress bar over retrainings.
                    Default: True

    Returns:
        results (CaseDeletionResults): one `DeletionEffect` per method, k and
        sign, with the number of retrainings run.
    """
    scores = _checked_scores(scores)
    n_test, n_train = next(iter(scores.values())).shape
    if random_control:
        if RANDOM in scores:
            raise ValueError(f'`scores` already has a method named "{RANDOM}"; rename it or pass random_control=False.')
        scores[RANDOM] = torch.rand(n_test, n_train, generator=torch.Generator().manual_seed(0))
    ks, seeds = _checked_ints(ks, "ks", 1), _checked_ints(seeds, "seeds", 0)
    if ks[-1] >= n_train:
        raise ValueError(f"`ks` must be below the {n_train} training examples, got {ks[-1]}.")
    rows = list(range(n_test)) if test_indices is None else _checked_ints(test_indices, "test_indices", 0, sort=False)
    if any(row >= n_test for row in rows) or len(set(rows)) != len(rows):
        raise ValueError(f"`test_indices` must be distinct rows of `scores` (below {n_test}), got {rows}.")

    # what to delete: per (method, k, sign, test row) a sorted tuple of indices
    deletions: Dict[Tuple[str, int, str, int], Tuple[int, ...]] = {}
    for method, matrix in scores.items():
        for kind in (PROPONENTS, OPPONENTS):
            top = top_k_training_indices(matrix, ks[-1], proponents=kind == PROPONENTS)
            for k in ks:
                for row in rows:
                    deletions[(method, k, kind, row)] = tuple(sorted(top[row, :k].tolist()))

    unique_sets = sorted(set(deletions.values()))
    probabilities: Dict[Tuple[Tuple[int, ...], int], Tensor] = {}
    with tqdm(total=len(seeds) * (1 + len(unique_sets)), desc="Case deletion",
              disable=not show_progress) as bar:
        for seed in seeds:
            for deleted in [()] + unique_sets:
                removed = set(deleted)
                kept = [i for i in range(n_train) if i not in removed]
                predicted = torch.as_tensor(retrain_and_predict(kept, seed)).detach().reshape(-1)
                if predicted.numel() != n_test:
                    raise ValueError(
                        f"`retrain_and_predict` returned {predicted.numel()} probabilities; "
                        f"it must return one per test example ({n_test})."
                    )
                probabilities[(deleted, seed)] = predicted.double().cpu()
                bar.update(1)

    effects = []
    for method in scores:
        for k in ks:
            for kind in (PROPONENTS, OPPONENTS):
                sign = 1.0 if kind == PROPONENTS else -1.0
                changes = torch.tensor([
                    [sign * (probabilities[((), seed)][row]
                             - probabilities[(deletions[(method, k, kind, row)], seed)][row]).item()
                     for seed in seeds]
                    for row in rows
                ], dtype=torch.float64)
                effects.append(DeletionEffect(method, k, kind, changes, *mean_and_interval(
                    changes.mean(dim=1), bootstrap_samples)))
    return CaseDeletionResults(
        effects, rows, ks, seeds, retrains=len(probabilities),
        full_probabilities={seed: probabilities[((), seed)] for seed in seeds},
    )


def _checked_scores(scores: Dict[str, Tensor]) -> Dict[str, Tensor]:
    if not scores:
        raise ValueError("`scores` is empty: give at least one method's influence scores.")
    checked = {name: torch.as_tensor(matrix).detach().cpu() for name, matrix in scores.items()}
    shapes = {name: tuple(matrix.shape) for name, matrix in checked.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
        raise ValueError(
            f"Every method's scores must be one (n_test, n_train) matrix of the same shape; got {shapes}."
        )
    return checked


def _checked_ints(values: Sequence[int], name: str, minimum: int, sort: bool = True) -> List[int]:
    items = list(values)
    if not items or not all(is_int(v, minimum) for v in items):
        raise ValueError(f"`{name}` must be a non-empty list of ints >= {minimum}, got {items!r}.")
    items = [int(v) for v in items]
    return sorted(set(items)) if sort else items


def _interval(effect: DeletionEffect) -> str:
    return f"{effect.mean:+.3f} [{effect.ci_low:+.3f}, {effect.ci_high:+.3f}]"
