r"""
The one data structure of the package: per-example, per-token gradients of the
word-embedding matrix, stored ragged (CSR-like).

For an example z and a token id w, the gradient of the loss with respect to row w
of the embedding matrix E is the sum, over the positions p where z holds w, of the
gradient at the embedding module's output e_p. Only the rows of tokens that occur
in z are non-zero, so a batch is stored as:

- ``offsets`` (n + 1,): example i owns rows ``offsets[i]:offsets[i + 1]``;
- ``token_ids`` (nnz,): the token id of each row, ascending within an example;
- ``grads`` (nnz, d): the gradient rows.

A V x d tensor is never built. `TokenPostings` is the inverted view of the same
rows, grouped by token id, which products with other examples look tokens up in;
`TokenMajorGradients` (token_major.py) holds the rows themselves in that order,
as an index stores them.
"""

from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterable, Optional, Sequence, Tuple, TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # the token-major layout builds on this module
    from captum_tracin_we._core.token_major import TokenMajorGradients


class ScaledRows:
    r"""
    Gradient rows ``grads``, each times its entry of ``row_scales`` if there
    are scales (a float16 index's rows, read lazily): what a join reads of
    either layout (`TokenGradients`, `TokenMajorGradients`).
    """

    grads: Tensor
    row_scales: Optional[Tensor]

    @property
    def dtype(self) -> torch.dtype:
        r"""The dtype of the gradient values (of the rows times their scales)."""
        if self.row_scales is None:
            return self.grads.dtype
        return torch.promote_types(self.grads.dtype, self.row_scales.dtype)

    def rows(self, index: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
        r"""The gradient rows `index` (times their scales), in `dtype` (default: `self.dtype`)."""
        dtype = self.dtype if dtype is None else dtype
        rows = self.grads.index_select(0, index).to(dtype)
        if self.row_scales is None:
            return rows
        return rows * self.row_scales.index_select(0, index).to(dtype).unsqueeze(1)


@dataclass(frozen=True)
class TokenGradients(ScaledRows):
    r"""
    Sparse word-embedding gradients of a batch of examples, one CSR row block
    per example (see the module docstring for the layout).

    Args:
        offsets (Tensor): 1D long tensor of length ``num_examples + 1``.
        token_ids (Tensor): 1D long tensor, the token id of each gradient row,
                sorted ascending within each example.
        grads (Tensor): 2D tensor of shape ``(len(token_ids), embedding_dim)``.
        inverted (TokenPostings, optional): The inverted view of these rows,
                if already known (e.g. read from an index); computed on demand
                by `postings()` otherwise.
        row_scales (Tensor, optional): One scale per row: row i's gradient is
                ``grads[i] * row_scales[i]`` (a float16 index's rows, read
                lazily; see `rows` and `scaled`). None: `grads` as they are.
    """

    offsets: Tensor
    token_ids: Tensor
    grads: Tensor
    inverted: Optional["TokenPostings"] = field(default=None, compare=False, repr=False)
    # a float16 index's rows are stored divided by their largest entry: row i is grads[i] * row_scales[i],
    # kept apart so that a product reads and scales only the rows it uses (`rows`); None: grads as they are
    row_scales: Optional[Tensor] = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        # shapes, dtypes and the offsets (never the rows, so it costs next to nothing per batch): the joins
        # index with these tensors and would otherwise fail deep inside, or drop rows silently
        _check_layout(self.offsets, self.token_ids)
        if self.grads.dim() != 2 or self.grads.shape[0] != self.token_ids.numel():
            raise ValueError(
                f"`grads` must be 2D with one row per token id, shape ({self.token_ids.numel()}, d); "
                f"got {tuple(self.grads.shape)}."
            )
        _check_scales(self.row_scales, self.token_ids.numel())

    def scaled(self) -> "TokenGradients":
        r"""The same gradients with every row times its scale (itself if there are none)."""
        if self.row_scales is None:
            return self
        grads = self.grads.to(self.dtype) * self.row_scales.to(self.dtype).unsqueeze(1)
        return TokenGradients(self.offsets, self.token_ids, grads, self.inverted)

    @property
    def num_examples(self) -> int:
        return self.offsets.numel() - 1

    @cached_property  # a join asks for it several times per block; the fields never change
    def example_index(self) -> Tensor:
        r"""The example each row belongs to, a 1D long tensor of length nnz."""
        return _example_index(self.offsets)

    def products(self, other: "TokenGradients | TokenMajorGradients", join: str = "auto") -> Tensor:
        r"""
        The ``(self.num_examples, other.num_examples)`` matrix of gradient dot
        products, summed over the tokens each pair shares: TracIn's scores of
        `other` (training rows, in either layout: an index's chunks are
        `TokenMajorGradients`, read in place) for `self` (test rows) at one
        checkpoint, before the learning rate. `join` is "auto" (GEMMs for the
        frequent tokens, gathered pairs for the rest) or "gather" (every token
        by gathered pairs: the reference, slower).
        """
        from captum_tracin_we._core.products import influence_scores  # products build on this module

        return influence_scores(self, other, join)

    def postings(self) -> "TokenPostings":
        r"""The rows grouped by token id (see `TokenPostings`)."""
        return self.inverted if self.inverted is not None else self._own_postings

    @cached_property  # a query meets every training block with the same rows: sorted once
    def _own_postings(self) -> "TokenPostings":
        return TokenPostings.of(self.token_ids)

    @classmethod
    def from_positions(
        cls,
        token_ids: Tensor,
        position_grads: Tensor,
        keep: Optional[Tensor] = None,
    ) -> "TokenGradients":
        r"""
        Sums position gradients into one row per (example, token id).

        Args:
            token_ids (Tensor): integer tensor of shape ``(batch, positions)``.
            position_grads (Tensor): gradient at the embedding output, of shape
                    ``(batch, positions, embedding_dim)``.
            keep (Tensor, optional): boolean tensor shaped like ``token_ids``;
                    positions where it is False are dropped (excluded tokens).
        """
        batch_size = token_ids.shape[0]
        dim = position_grads.shape[-1]
        example = torch.arange(batch_size, device=token_ids.device)
        example = example.unsqueeze(1).expand_as(token_ids)
        ids = token_ids.long()
        grads = position_grads.reshape(*token_ids.shape, dim)
        if keep is None:
            keep = torch.ones_like(ids, dtype=torch.bool)
        return cls._aggregate(example[keep], ids[keep], grads[keep], batch_size)

    @classmethod
    def _aggregate(
        cls, example: Tensor, token_ids: Tensor, grads: Tensor, num_examples: int
    ) -> "TokenGradients":
        r"""Sums the rows that share an (example, token id) pair."""
        # one key per (example, token): unique() sorts by example, then token id; the ids' ranks, not the ids,
        # so that no id (negative, or near 2**63) makes keys of two examples collide or overflow
        vocab, rank = torch.unique(token_ids, return_inverse=True)
        stride = max(1, vocab.numel())
        keys, inverse = torch.unique(example * stride + rank, return_inverse=True)
        rows = grads.new_zeros(keys.numel(), grads.shape[1]).index_add_(0, inverse, grads)
        counts = torch.bincount(keys // stride, minlength=num_examples)
        return cls(_offsets_from_counts(counts), vocab[keys % stride], rows)

    def canonical(self) -> "TokenGradients":
        r"""
        The same gradients with one row per (example, token id), ids ascending
        within each example (the rows of a token repeated in an example summed):
        itself if already so, as every gradient this package computes is. Rows
        built by hand may repeat or reorder ids; the joins accept them as they
        are, and products that pair rows up one to one canonicalise first.
        """
        ids = self.token_ids
        ascending = ids[1:] > ids[:-1]
        # an example's first row need not exceed the previous example's last
        starts = self.offsets[1:-1]
        starts = starts[(starts > 0) & (starts < ids.numel())]
        ascending[starts - 1] = True
        if bool(ascending.all()):
            return self
        return self._aggregate(self.example_index, ids, self.scaled().grads, self.num_examples)

    def summed(self) -> "TokenGradients":
        r"""One example whose gradient is the sum of all examples' gradients."""
        if self.row_scales is not None:
            return self.scaled().summed()
        example = torch.zeros_like(self.token_ids)
        return self._aggregate(example, self.token_ids, self.grads, 1)

    @classmethod
    def concat(cls, parts: Sequence["TokenGradients"]) -> "TokenGradients":
        r"""Stacks the examples of several batches, in order."""
        if len(parts) == 1:
            return parts[0]
        parts = [part.scaled() for part in parts]
        counts = torch.cat([p.offsets[1:] - p.offsets[:-1] for p in parts])
        return cls(
            _offsets_from_counts(counts),
            torch.cat([p.token_ids for p in parts]),
            torch.cat([p.grads for p in parts]),
        )

    def select(self, examples: Iterable[int]) -> "TokenGradients":
        r"""The given examples, in the given order."""
        if self.row_scales is not None:
            return self.scaled().select(examples)
        counts, rows = _rows_of(self.offsets, examples)
        return TokenGradients(
            _offsets_from_counts(counts), self.token_ids[rows], self.grads[rows]
        )

    def top_k_tokens(self, k: int) -> "TokenGradients":
        r"""
        Keeps, per example, the ``k`` rows with the largest gradient norm
        (TracIn-WE-TopK). Ties are broken by the smaller token id.
        """
        if self.row_scales is not None:
            return self.scaled().top_k_tokens(k)
        norms = self.grads.norm(dim=1)
        example = self.example_index
        # order rows by example, then by decreasing norm; rank within example
        by_norm = torch.argsort(norms, descending=True, stable=True)
        order = by_norm[torch.argsort(example[by_norm], stable=True)]
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=order.device) - self.offsets[
            example[order]
        ]
        kept = rank < k
        counts = torch.bincount(example[kept], minlength=self.num_examples)
        return TokenGradients(
            _offsets_from_counts(counts), self.token_ids[kept], self.grads[kept]
        )

    def squared_norms(self) -> Tensor:
        r"""Per example, the squared Frobenius norm of its embedding gradient."""
        if self.row_scales is not None:
            return self.scaled().squared_norms()
        canonical = self.canonical()
        if canonical is not self:  # a repeated token's rows summed before squaring
            return canonical.squared_norms()
        per_row = (self.grads * self.grads).sum(dim=1)
        return per_row.new_zeros(self.num_examples).index_add_(
            0, self.example_index, per_row
        )

    def to(self, device: torch.device) -> "TokenGradients":
        r"""The same gradients on `device`."""
        return TokenGradients(
            self.offsets.to(device), self.token_ids.to(device), self.grads.to(device),
            None if self.inverted is None else self.inverted.to(device),
            None if self.row_scales is None else self.row_scales.to(device),
        )

    def project(self, matrix: Tensor) -> "TokenGradients":
        r"""The same rows multiplied by ``matrix`` (``embedding_dim x p``)."""
        if self.row_scales is not None:
            return self.scaled().project(matrix)
        matrix = matrix.to(device=self.grads.device, dtype=self.grads.dtype)
        return TokenGradients(self.offsets, self.token_ids, self.grads @ matrix)

    def to_dense(self, vocab_size: int) -> Tensor:
        r"""
        The dense ``(num_examples, vocab_size, embedding_dim)`` gradients. Meant
        for tests and small vocabularies only.
        """
        if self.row_scales is not None:
            return self.scaled().to_dense(vocab_size)
        dense = self.grads.new_zeros(self.num_examples, vocab_size, self.grads.shape[1])
        dense[self.example_index, self.token_ids] = self.grads
        return dense


@dataclass(frozen=True)
class TokenPostings:
    r"""
    An inverted view of the rows of a `TokenGradients`, by token id: the rows
    holding token ``vocab[i]`` are ``rows[starts[i]:starts[i + 1]]``.

    Args:
        vocab (Tensor): 1D long tensor, the distinct token ids, ascending.
        starts (Tensor): 1D long tensor of length ``len(vocab) + 1``.
        rows (Tensor): 1D long tensor, a permutation of the row indices, grouped
                by token id (stable: rows of one token keep their order).
    """

    vocab: Tensor
    starts: Tensor
    rows: Tensor

    @classmethod
    def of(cls, token_ids: Tensor) -> "TokenPostings":
        rows = torch.argsort(token_ids, stable=True)
        vocab, counts = torch.unique_consecutive(token_ids[rows], return_counts=True)
        return cls(vocab, _offsets_from_counts(counts), rows)

    def lookup(self, token_ids: Tensor) -> Tuple[Tensor, Tensor]:
        r"""
        For each token id, where its rows start in ``rows`` and how many there
        are (0 for a token id absent from these rows).
        """
        if self.vocab.numel() == 0:
            zeros = torch.zeros_like(token_ids)
            return zeros, zeros
        position = torch.searchsorted(self.vocab, token_ids).clamp_(max=self.vocab.numel() - 1)
        found = self.vocab[position] == token_ids
        first = self.starts[position]
        return first, (self.starts[position + 1] - first) * found

    def to(self, device: torch.device) -> "TokenPostings":
        return TokenPostings(self.vocab.to(device), self.starts.to(device), self.rows.to(device))


def _check_layout(offsets: Tensor, token_ids: Tensor) -> None:
    r"""
    Refuses a ragged layout the joins would misread: `offsets` and `token_ids`
    1D long, and `offsets` rising from 0 to ``len(token_ids)``. Shapes, dtypes
    and n + 1 integers only (never the rows), so it costs next to nothing per batch.
    """
    for name, value in (("offsets", offsets), ("token_ids", token_ids)):
        if value.dtype != torch.int64 or value.dim() != 1:
            fix = f"`{name}.long()`" if value.dim() == 1 else f"a flat tensor, e.g. `{name}.reshape(-1).long()`"
            raise ValueError(
                f"`{name}` must be a 1D torch.long tensor, got {value.dim()}D {value.dtype}: pass {fix}."
            )
    if offsets.numel() < 1:
        raise ValueError("`offsets` must have num_examples + 1 entries, starting at 0; got an empty tensor.")
    # n + 1 integers: rows beyond or short of `grads` would be dropped or misread without an error
    first, last = offsets[[0, -1]].tolist()
    decreasing = bool((offsets[1:] < offsets[:-1]).any())
    if first != 0 or last != token_ids.numel() or decreasing:
        raise ValueError(
            f"`offsets` must rise from 0 to len(token_ids) = {token_ids.numel()} (example i owns rows "
            f"offsets[i]:offsets[i + 1]); got offsets[0] = {first}, offsets[-1] = {last}"
            + (", decreasing somewhere." if decreasing else ".")
        )


def _check_scales(row_scales: Optional[Tensor], rows: int) -> None:
    if row_scales is not None and row_scales.shape != (rows,):
        raise ValueError(
            f"`row_scales` must hold one scale per row, shape ({rows},); got {tuple(row_scales.shape)}."
        )


def _example_index(offsets: Tensor) -> Tensor:
    r"""The example each row of a ragged layout belongs to."""
    counts = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)


def _rows_of(offsets: Tensor, examples: Iterable[int]) -> Tuple[Tensor, Tensor]:
    r"""Per given example, its number of rows, and all their rows, example after example in the given order."""
    examples = torch.as_tensor(list(examples), dtype=torch.long).to(offsets.device)
    starts = offsets[examples]
    counts = offsets[examples + 1] - starts
    return counts, _ranges(starts, counts)


def _offsets_from_counts(counts: Tensor) -> Tensor:
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


def _ranges(starts: Tensor, counts: Tensor) -> Tensor:
    r"""Concatenation of ``arange(s, s + c)`` for each start s and count c."""
    total = int(counts.sum().item())
    group_start = torch.cumsum(counts, 0) - counts
    within = torch.arange(total, device=starts.device) - torch.repeat_interleave(
        group_start, counts
    )
    return torch.repeat_interleave(starts, counts) + within
