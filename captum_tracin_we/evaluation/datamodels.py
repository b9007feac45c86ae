r"""
The linear datamodeling score (LDS; Park et al., TRAK, 2023), the ground truth
for training-data attribution that TRAK, dattri, Kronfluence and Quanda report.

Draw M random subsets of a fraction alpha of the training set, retrain on each
and record every test example's output (by default the log-probability margin
of its label, `label_margin`). An attribution method predicts the output of a
subset as the sum of its scores over the subset's examples; its LDS for a test
example is the Spearman correlation, over the M subsets, between predicted and
actual outputs, and its LDS is the mean over test examples, with a 95% bootstrap
interval. Subsets are seeded, so every method is judged on the same ones, and
retrainings are cached on disk by subset (and by the settings you name), so
adding a method retrains nothing.

Like `case_deletion`, this takes plain `(n_test, n_train)` score matrices and a
retraining function you pass, so it judges any method of this package, Captum's,
or any other.
"""

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from captum_tracin_we._utils.values import check_int, check_number
from captum_tracin_we.evaluation.metrics import mean_and_interval, spearman

# f(kept, seed) -> the output of each test example after training on `kept` from `seed`
RetrainAndOutput = Callable[[List[int], int], Tensor]


@dataclass
class DatamodelingScore:
    r"""
    One method's linear datamodeling score.

    Attributes:

        mean (float): The mean over test examples of the Spearman correlations
                (test examples whose outputs or predictions do not vary over the
                subsets, where the correlation is undefined, left out).
        ci_low, ci_high (float): A 95% percentile-bootstrap interval of `mean`
                over the test examples.
        per_test (Tensor): Each test example's correlation (NaN where undefined).
    """

    mean: float
    ci_low: float
    ci_high: float
    per_test: Tensor


def draw_subsets(n_train: int, num_subsets: int = 64, fraction: float = 0.5, seed: int = 0) -> Tensor:
    r"""
    `num_subsets` random subsets of `round(fraction * n_train)` training
    examples each, drawn without replacement from a seeded generator, as a
    `(num_subsets, n_train)` boolean mask: the same arguments give the same subsets.
    """
    n_train, num_subsets, seed = check_int(n_train, "n_train"), check_int(num_subsets, "num_subsets"), check_int(
        seed, "seed", minimum=0
    )
    fraction = check_number(fraction, "fraction", 0.0, " and < 1", strict=True)
    size = round(fraction * n_train)
    if not 0 < size < n_train:
        raise ValueError(
            f"`fraction` {fraction} of {n_train} training examples keeps {size}; a subset must keep at "
            "least one example and leave out at least one."
        )
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(num_subsets, n_train, dtype=torch.bool)
    for m in range(num_subsets):
        masks[m, torch.randperm(n_train, generator=generator)[:size]] = True
    return masks


def linear_datamodeling_score(
    scores: Tensor, subsets: Tensor, outputs: Tensor, bootstrap_samples: int = 2000
) -> DatamodelingScore:
    r"""
    The LDS of `scores` (n_test, n_train) on `subsets` (M, n_train, boolean)
    whose retrained `outputs` are (M, n_test): per test example, the Spearman
    correlation over the subsets between `subsets @ scores[i]` and the outputs.
    Invariant to any positive rescaling of the scores.
    """
    scores, subsets, outputs = (torch.as_tensor(t).detach().cpu() for t in (scores, subsets, outputs))
    if scores.dim() != 2 or subsets.dim() != 2 or outputs.dim() != 2:
        raise ValueError("`scores` (n_test, n_train), `subsets` (M, n_train) and `outputs` (M, n_test) are matrices.")
    if subsets.shape[1] != scores.shape[1] or outputs.shape != (subsets.shape[0], scores.shape[0]):
        raise ValueError(
            f"Shapes do not fit: `scores` {tuple(scores.shape)} is (n_test, n_train), `subsets` "
            f"{tuple(subsets.shape)} must be (M, n_train) and `outputs` {tuple(outputs.shape)} (M, n_test)."
        )
    predicted = subsets.double() @ scores.double().T  # (M, n_test)
    per_test = torch.tensor(
        [spearman(predicted[:, i], outputs[:, i].double()) for i in range(scores.shape[0])], dtype=torch.float64
    )
    defined = per_test[~per_test.isnan()]
    if not defined.numel():
        nan = float("nan")
        return DatamodelingScore(nan, nan, nan, per_test)
    return DatamodelingScore(*mean_and_interval(defined, bootstrap_samples), per_test)


def datamodel_outputs(
    retrain_and_output: RetrainAndOutput,
    subsets: Tensor,
    seed: int = 0,
    cache_dir: Optional[str] = None,
    show_progress: bool = True,
    cache_settings: Optional[Dict[str, Any]] = None,
    test_labels: Optional[Tensor] = None,
) -> Tensor:
    r"""
    The `(M, n_test)` outputs of the models retrained on each subset from
    `seed`, by `retrain_and_output(kept, seed)` (`kept`: the sorted training
    indices of the subset).

    With `test_labels` (the default output): `retrain_and_output` returns the
    retrained model's `(n_test, n_classes)` logits (or log-probabilities) of
    the test examples, and each test example's output is the log-probability
    margin of its label (`label_margin`). Without: it returns one output per
    test example, whatever it is.

    With `cache_dir`, each subset's outputs are kept in a `.npy` file named by
    the sha256 of its indices and seed, and read back instead of retraining.
    The files lie in a folder of `cache_dir` named by the hash of
    `cache_settings` (written beside them as `settings.json`): give there
    everything else that decides what `retrain_and_output` returns (the data,
    the model, the training options, the library versions), so that a cache
    is never read for other retrainings; runs with other settings can share
    `cache_dir`.
    """
    labels = None
    if test_labels is not None:
        labels = torch.as_tensor(test_labels).detach().cpu().long().flatten()
        # the margins of these labels are other outputs than the callback's own: another cache folder
        digest = hashlib.sha256(",".join(map(str, labels.tolist())).encode()).hexdigest()
        cache_settings = dict(cache_settings or {}, recorded_output=f"label_margin of labels {digest}")
    folder = None if cache_dir is None else _settings_folder(cache_dir, cache_settings)
    rows = []
    for mask in tqdm(subsets, desc="Retraining on subsets", disable=not show_progress):
        kept = mask.nonzero().flatten().tolist()
        path = None
        if folder is not None:
            path = os.path.join(folder, f"{subset_key(kept, seed)}.npy")
            if os.path.isfile(path):
                rows.append(torch.from_numpy(np.load(path, allow_pickle=False)))
                continue
        output = torch.as_tensor(retrain_and_output(kept, seed)).detach().cpu().double()
        output = (output if labels is None else _margins(output, labels)).flatten()
        if path is not None:
            np.save(path + ".tmp.npy", output.numpy(), allow_pickle=False)
            os.replace(path + ".tmp.npy", path)  # a whole file or none
        rows.append(output)
    lengths = {row.numel() for row in rows}
    if len(lengths) != 1:
        raise ValueError(f"`retrain_and_output` returned outputs of different lengths {sorted(lengths)}.")
    return torch.stack(rows)


def _margins(logits: Tensor, labels: Tensor) -> Tensor:
    if logits.dim() != 2 or logits.shape[0] != labels.numel() or logits.shape[1] < 2:
        raise ValueError(
            f"With `test_labels`, `retrain_and_output` must return the (n_test, n_classes) logits of the "
            f"{labels.numel()} test examples (n_classes >= 2); got shape {tuple(logits.shape)}."
        )
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"`test_labels` must lie in [0, {logits.shape[1]}) for these logits, got {labels.tolist()}.")
    return label_margin(logits, labels)


def subset_key(kept: List[int], seed: int) -> str:
    r"""The sha256 hex digest naming a retraining on the sorted training indices `kept` from `seed`."""
    return hashlib.sha256(f"{seed}:{','.join(map(str, kept))}".encode()).hexdigest()


def _settings_folder(cache_dir: str, settings: Optional[Dict[str, Any]]) -> str:
    r"""The folder of `cache_dir` for retrainings with `settings`, made with its `settings.json` if new."""
    try:
        text = json.dumps(settings or {}, sort_keys=True, indent=1)
    except TypeError as error:
        raise ValueError(
            f"`cache_settings` must be JSON-able (str, numbers, bools, None, lists and dicts of them): {error}."
        ) from None
    folder = os.path.join(cache_dir, hashlib.sha256(text.encode()).hexdigest()[:16])
    if not os.path.isfile(os.path.join(folder, "settings.json")):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "settings.json.tmp"), "w") as f:
            f.write(text + "\n")
        os.replace(os.path.join(folder, "settings.json.tmp"), os.path.join(folder, "settings.json"))
    return folder


def datamodeling_scores(
    retrain_and_output: RetrainAndOutput,
    scores: Dict[str, Tensor],
    num_subsets: int = 64,
    fraction: float = 0.5,
    seed: int = 0,
    cache_dir: Optional[str] = None,
    show_progress: bool = True,
    cache_settings: Optional[Dict[str, Any]] = None,
    test_labels: Optional[Tensor] = None,
) -> Dict[str, DatamodelingScore]:
    r"""
    The LDS of every method in `scores` (name -> `(n_test, n_train)`), on the
    same `num_subsets` seeded subsets of a `fraction` of the training set
    (`draw_subsets`), each retrained once (`datamodel_outputs`, cached in
    `cache_dir` if given, apart for each `cache_settings`). With `test_labels`,
    `retrain_and_output` returns the test logits and the output is each test
    example's label margin (the default output); without, it returns the
    outputs itself.
    """
    if not scores:
        raise ValueError("`scores` is empty: give at least one method's influence scores.")
    shapes = {name: tuple(torch.as_tensor(matrix).shape) for name, matrix in scores.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
        raise ValueError(f"Every method's scores must be one (n_test, n_train) matrix of the same shape; got {shapes}.")
    n_test, n_train = next(iter(shapes.values()))
    subsets = draw_subsets(n_train, num_subsets, fraction, seed)
    outputs = datamodel_outputs(
        retrain_and_output, subsets, seed, cache_dir, show_progress, cache_settings, test_labels
    )
    if outputs.shape[1] != n_test:
        raise ValueError(
            f"`retrain_and_output` returned {outputs.shape[1]} outputs per model, but the scores have "
            f"{n_test} test examples; return one output per test example, in the scores' row order."
        )
    return {name: linear_datamodeling_score(matrix, subsets, outputs) for name, matrix in scores.items()}


def label_margin(logits: Tensor, labels: Tensor) -> Tensor:
    r"""
    Each example's log-probability margin of its label, `logit_y - logsumexp
    of the other logits` (= log p_y - log(1 - p_y)), TRAK's default output.
    """
    logits = torch.as_tensor(logits).double()
    labels = torch.as_tensor(labels).long()
    own = logits.gather(1, labels.unsqueeze(1)).squeeze(1)
    others = logits.scatter(1, labels.unsqueeze(1), float("-inf")).logsumexp(dim=1)
    return own - others
