r"""
The rows of a `TokenGradients` stored grouped by token id: the layout of an
index's chunks.

`TokenGradients` keeps each example's rows together, which its example-level
operations need. A join needs each token's rows together: a frequent token's
training rows are then one slice, a GEMM operand read in place rather than
gathered, and a rare token's rows lie side by side, so that a sampled product
reads memory in runs rather than row by row at random (DESIGN.md section 9).
`TokenMajorGradients` holds the same rows in the order of their postings,
with the example-major layout beside them for the example-level operations
(`select`, `by_example`).
"""

from dataclasses import dataclass, field, InitVar
from functools import cached_property
from typing import Iterable, Optional

import torch
from torch import Tensor

from captum_tracin_we._core.token_gradients import (
    _check_layout,
    _check_scales,
    _example_index,
    _offsets_from_counts,
    _rows_of,
    ScaledRows,
    TokenGradients,
    TokenPostings,
)


@dataclass(frozen=True, eq=False)  # tensors have no truth value: objects compare by identity
class TokenMajorGradients(ScaledRows):
    r"""
    The gradients of a `TokenGradients` with its rows grouped by token id.

    Args:
        offsets (Tensor): The example-major layout's offsets (see `TokenGradients`).
        token_ids (Tensor): The example-major layout's token ids.
        by_token (TokenPostings): The postings of that layout: row j here is
                its row ``by_token.rows[j]``, and token ``by_token.vocab[i]``
                owns rows ``by_token.starts[i]:by_token.starts[i + 1]`` here.
        grads (Tensor): 2D, the rows in that order.
        row_scales (Tensor, optional): One scale per row, in that order
                (see `TokenGradients`).
        check (bool, optional): Check that `by_token` is the postings of
                `token_ids` (at the ends of each token's range). False only
                for arrays known to be so: `of` builds them, and an index's
                are verified by their sha256 when it is opened.
                Default: True

    Its fields are not to be edited in place: the views a join asks for are
    computed once (as `TokenGradients`' postings and example index are).
    """

    offsets: Tensor
    token_ids: Tensor
    by_token: TokenPostings
    grads: Tensor
    row_scales: Optional[Tensor] = field(default=None, compare=False, repr=False)
    check: InitVar[bool] = True

    def __post_init__(self, check: bool) -> None:
        _check_layout(self.offsets, self.token_ids)
        nnz = self.token_ids.numel()
        if self.grads.dim() != 2 or self.grads.shape[0] != nnz or self.by_token.rows.numel() != nnz:
            raise ValueError(
                f"`grads` and `by_token.rows` must have one row per token id ({nnz}); got `grads` of shape "
                f"{tuple(self.grads.shape)} and {self.by_token.rows.numel()} rows in `by_token`."
            )
        _check_scales(self.row_scales, nnz)
        if not check:
            return
        # the postings must be those of `token_ids`, or the joins would pair rows of different tokens: the
        # ranges checked at their ends, O(vocabulary)
        vocab, starts, rows = self.by_token.vocab, self.by_token.starts, self.by_token.rows
        counts = starts[1:] - starts[:-1]
        if starts.numel() != vocab.numel() + 1 or int(starts[0]) != 0 or int(starts[-1]) != nnz or bool(
            (counts <= 0).any()
        ) or (nnz and not 0 <= int(rows.min()) <= int(rows.max()) < nnz) or not (
            torch.equal(self.token_ids[rows[starts[:-1]]], vocab)
            and torch.equal(self.token_ids[rows[starts[1:] - 1]], vocab)
            and bool((vocab[1:] > vocab[:-1]).all())
        ):
            raise ValueError(
                "`by_token` must be the postings of `token_ids` (`TokenPostings.of(token_ids)`, or an index's): "
                "build these gradients with `TokenMajorGradients.of(gradients)`."
            )

    @classmethod
    def of(cls, gradients: TokenGradients) -> "TokenMajorGradients":
        r"""The rows of `gradients` regrouped by token id (one copy of them)."""
        postings = gradients.postings()
        scales = gradients.row_scales
        return cls(
            gradients.offsets, gradients.token_ids, postings, gradients.grads[postings.rows],
            None if scales is None else scales[postings.rows], check=False,
        )

    @property
    def num_examples(self) -> int:
        return self.offsets.numel() - 1

    def products(self, other: "TokenGradients | TokenMajorGradients", join: str = "auto") -> Tensor:
        r"""The gradient dot products with `other`, as `TokenGradients.products` (either layout on either side)."""
        from captum_tracin_we._core.products import influence_scores  # products build on this module

        return influence_scores(self, other, join)

    @cached_property  # a join asks for it several times per block; the fields never change
    def example_index(self) -> Tensor:
        r"""The example each row (in this order) belongs to."""
        return _example_index(self.offsets)[self.by_token.rows]

    @cached_property
    def _postings(self) -> TokenPostings:
        return TokenPostings(
            self.by_token.vocab, self.by_token.starts, torch.arange(self.grads.shape[0], device=self.grads.device)
        )

    def postings(self) -> TokenPostings:
        r"""The rows grouped by token id, as `TokenGradients.postings` gives them: here each token's are a range."""
        return self._postings

    @cached_property
    def _position(self) -> Tensor:
        r"""Where each row of the example-major layout lies here (the inverse of ``by_token.rows``)."""
        rows = self.by_token.rows
        return torch.empty_like(rows).index_put_((rows,), torch.arange(rows.numel(), device=rows.device))

    def select(self, examples: Iterable[int]) -> TokenGradients:
        r"""The given examples, in the given order, example-major (reading only their rows), scaled."""
        counts, rows = _rows_of(self.offsets, examples)
        return TokenGradients(_offsets_from_counts(counts), self.token_ids[rows], self.rows(self._position[rows]))

    def by_example(self) -> TokenGradients:
        r"""The same gradients in the example-major layout (one copy of the rows), scales kept beside them."""
        position = self._position
        scales = None if self.row_scales is None else self.row_scales[position]
        return TokenGradients(self.offsets, self.token_ids, self.grads[position], self.by_token, scales)

    def to(self, device: torch.device) -> "TokenMajorGradients":
        r"""The same gradients on `device` (itself if they are there: its cached views kept)."""
        if self.grads.device == torch.device(device):
            return self
        return TokenMajorGradients(
            self.offsets.to(device), self.token_ids.to(device), self.by_token.to(device), self.grads.to(device),
            None if self.row_scales is None else self.row_scales.to(device), check=False,
        )


def example_major(rows: "TokenGradients | TokenMajorGradients") -> TokenGradients:
    r"""`rows` in the example-major layout (a copy of a token-major one), for the example-level operations."""
    return rows.by_example() if isinstance(rows, TokenMajorGradients) else rows
