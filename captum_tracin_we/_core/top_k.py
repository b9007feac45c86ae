r"""
A running top-k over blocks of columns: the k most influential training examples
per test example without the whole ``(n_test, n_train)`` matrix (DESIGN.md
section 9). It holds at most ``n_test x (k + block)`` scores, and blocks may come
in any order (training chunks, shards of an index), with the same result.

Ties are broken by the smaller training index, so the result is that of a stable
sort of the whole matrix, whatever the blocks: ``torch.topk`` alone leaves the
order of ties to its implementation, and a streamed top-k built on it would
depend on where the blocks split.
"""

from typing import Optional, Tuple, Union

import torch
from torch import Tensor


class RunningTopK:
    r"""
    The `k` largest scores per row (or smallest, with ``proponents=False``) over
    the blocks given to `add`, with their column indices.

    Args:
        k (int): Scores kept per row; fewer while fewer columns have been added.
        proponents (bool, optional): The largest scores if True, the smallest
                otherwise.
                Default: True
    """

    def __init__(self, k: int, proponents: bool = True) -> None:
        self.k = k
        self.sign = 1.0 if proponents else -1.0
        self.values: Optional[Tensor] = None  # sign * scores, best first
        self.indices: Optional[Tensor] = None

    def add(self, scores: Tensor, columns: Union[int, Tensor]) -> None:
        r"""
        Merges a block of scores, shape ``(rows, m)``: its column indices are
        `columns`, a 1D tensor of m indices (or of shape ``(rows, m)``), or,
        as an int, the first of m consecutive ones.
        """
        if isinstance(columns, int):
            columns = torch.arange(columns, columns + scores.shape[1], device=scores.device)
        columns = columns.to(scores.device).expand(scores.shape)
        if not torch.isfinite(scores).all():
            raise ValueError(
                "RunningTopK: the scores hold NaN or infinite values, which have no rank; "
                "check the method that gave them."
            )
        values = self.sign * scores
        if self.values is not None:
            values = torch.cat([self.values, values.to(self.values.dtype)], dim=1)
            columns = torch.cat([self.indices, columns], dim=1)
        self.values, self.indices = _best(values, columns, self.k)

    def result(self) -> Tuple[Tensor, Tensor]:
        r"""``(indices, scores)``, each ``(rows, min(k, columns added))``, best first."""
        if self.values is None:
            raise ValueError("RunningTopK has no scores: `add` at least one block first.")
        return self.indices, self.sign * self.values


def top_k(scores: Tensor, k: int, proponents: bool = True) -> Tuple[Tensor, Tensor]:
    r"""``(indices, scores)`` of the `k` best scores of each row of a whole matrix, with `RunningTopK`'s order."""
    running = RunningTopK(k, proponents)
    running.add(scores, 0)
    return running.result()


def _best(values: Tensor, columns: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    r"""
    Per row, the `k` largest values, the smaller column first among equal ones,
    sorted best first: ``torch.topk`` finds the k-th value, the entries above it
    are all kept, and of those equal to it the ones of the smallest columns.
    """
    rows, width = values.shape
    k = min(k, width)
    if k == 0 or rows == 0:
        return values[:, :k], columns[:, :k]
    threshold = torch.topk(values, k, dim=1).values[:, -1:]
    above, tied = values > threshold, values == threshold
    need = k - above.sum(dim=1, keepdim=True)  # >= 1: the threshold's own entry
    largest = torch.iinfo(columns.dtype).max
    tie_columns = torch.where(tied, columns, largest)
    smallest = torch.topk(tie_columns, int(need.max()), dim=1, largest=False).values
    cutoff = smallest.gather(1, need - 1)  # the need-th smallest tied column of each row
    chosen = above | (tied & (tie_columns <= cutoff))  # k per row: columns are distinct
    kept_values, kept_columns = values[chosen].view(rows, k), columns[chosen].view(rows, k)
    # best first, ties by column: a stable sort by value of the entries sorted by column
    by_column = torch.argsort(kept_columns, dim=1)
    kept_values, kept_columns = kept_values.gather(1, by_column), kept_columns.gather(1, by_column)
    order = torch.sort(kept_values, dim=1, descending=True, stable=True).indices
    return kept_values.gather(1, order), kept_columns.gather(1, order)
