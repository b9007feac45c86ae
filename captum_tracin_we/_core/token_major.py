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

from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterable, Optional

import torch
from torch import Tensor

from captum_tracin_we._core.token_gradients import (
    _offsets_from_counts,
    _ranges,
    ScaledRows,
    TokenGradients,
    TokenPostings,
)


@dataclass(frozen=True)
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
    """

    offsets: Tensor
    token_ids: Tensor
    by_token: TokenPostings
    grads: Tensor
    row_scales: Optional[Tensor] = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        nnz = self.token_ids.numel()
        if self.grads.dim() != 2 or self.grads.shape[0] != nnz or self.by_token.rows.numel() != nnz:
            raise ValueError(
                f"`grads` and `by_token.rows` must have one row per token id ({nnz}); got `grads` of shape "
                f"{tuple(self.grads.shape)} and {self.by_token.rows.numel()} rows in `by_token`."
            )
        if self.row_scales is not None and self.row_scales.shape != (nnz,):
            raise ValueError(
                f"`row_scales` must hold one scale per row, shape ({nnz},); got {tuple(self.row_scales.shape)}."
            )

    @classmethod
    def of(cls, gradients: TokenGradients) -> "TokenMajorGradients":
        r"""The rows of `gradients` regrouped by token id (one copy of them)."""
        postings = gradients.postings()
        scales = gradients.row_scales
        return cls(
            gradients.offsets, gradients.token_ids, postings, gradients.grads[postings.rows],
            None if scales is None else scales[postings.rows],
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
        counts = self.offsets[1:] - self.offsets[:-1]
        example = torch.repeat_interleave(torch.arange(self.num_examples, device=counts.device), counts)
        return example[self.by_token.rows]

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
        examples = torch.as_tensor(list(examples), dtype=torch.long).to(self.offsets.device)
        starts = self.offsets[examples]
        counts = self.offsets[examples + 1] - starts
        rows = _ranges(starts, counts)
        return TokenGradients(_offsets_from_counts(counts), self.token_ids[rows], self.rows(self._position[rows]))

    def by_example(self) -> TokenGradients:
        r"""The same gradients in the example-major layout (one copy of the rows), scales kept beside them."""
        position = self._position
        scales = None if self.row_scales is None else self.row_scales[position]
        return TokenGradients(self.offsets, self.token_ids, self.grads[position], self.by_token, scales)

    def to(self, device: torch.device) -> "TokenMajorGradients":
        r"""The same gradients on `device`."""
        return TokenMajorGradients(
            self.offsets.to(device), self.token_ids.to(device), self.by_token.to(device), self.grads.to(device),
            None if self.row_scales is None else self.row_scales.to(device),
        )
