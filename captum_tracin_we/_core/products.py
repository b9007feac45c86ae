r"""
Sparse-sparse products of ``TokenGradients``, joined on token id.

Two examples only interact through the tokens they share, so every product is a
sum, over (test row, train row) pairs holding the same token id, of the rows'
dot products. The pairs are found by looking each test token up in the training
rows' inverted view (`TokenPostings`, stored in an index or sorted on the fly),
then reduced in chunks so memory stays bounded: only training rows of shared
tokens are ever read.
"""

from typing import Iterator, NamedTuple, Tuple

import torch
from torch import Tensor

from captum_tracin_we._core.token_gradients import _ranges, TokenGradients

# number of gathered (pair, embedding-dim) elements processed at once
_CHUNK_ELEMENTS = 1 << 22


class SharedTokenTerms(NamedTuple):
    r"""
    One entry per (test example, train example, shared token): the token's
    term in the influence of that train example on that test example.
    """

    test_example: Tensor
    train_example: Tensor
    token_id: Tensor
    score: Tensor


def shared_token_pairs(
    test: TokenGradients, train: TokenGradients
) -> Tuple[Tensor, Tensor]:
    r"""
    Row indices ``(test_rows, train_rows)`` of every pair of a test row and a
    train row with the same token id.
    """
    postings = train.postings()
    first, counts = postings.lookup(test.token_ids)
    test_rows = torch.repeat_interleave(
        torch.arange(test.token_ids.numel(), device=counts.device), counts
    )
    return test_rows, postings.rows[_ranges(first, counts)]


def _pair_dots(
    test: TokenGradients, train: TokenGradients
) -> Iterator[Tuple[Tensor, Tensor, Tensor]]:
    r"""Yields ``(test_rows, train_rows, dot products)`` chunk by chunk."""
    test_rows, train_rows = shared_token_pairs(test, train)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, test.grads.shape[1]))
    for start in range(0, test_rows.numel(), chunk):
        t = test_rows[start : start + chunk]
        r = train_rows[start : start + chunk]
        yield t, r, (test.grads[t] * train.grads[r]).sum(dim=1)


def influence_scores(test: TokenGradients, train: TokenGradients) -> Tensor:
    r"""
    The ``(test.num_examples, train.num_examples)`` matrix of gradient dot
    products, summed over shared tokens.
    """
    n_train = train.num_examples
    scores = test.grads.new_zeros(test.num_examples * n_train)
    test_example, train_example = test.example_index, train.example_index
    for t, r, dots in _pair_dots(test, train):
        # rows stored in another dtype (an index) are promoted in the products
        scores.index_add_(0, test_example[t] * n_train + train_example[r], dots.to(scores.dtype))
    return scores.view(test.num_examples, n_train)


def shared_token_terms(test: TokenGradients, train: TokenGradients) -> SharedTokenTerms:
    r"""
    The per-token terms of ``influence_scores(test, train)``: summing ``score``
    over entries with the same (test_example, train_example) gives that score.
    """
    test_example, train_example = test.example_index, train.example_index
    parts = [
        (test_example[t], train_example[r], test.token_ids[t], dots)
        for t, r, dots in _pair_dots(test, train)
    ]
    if not parts:
        empty = test.token_ids.new_zeros(0)
        return SharedTokenTerms(empty, empty, empty, test.grads.new_zeros(0))
    return SharedTokenTerms(*(torch.cat(column) for column in zip(*parts)))


def diagonal_products(a: TokenGradients, b: TokenGradients) -> Tensor:
    r"""
    Per example i, the product of example i of `a` with example i of `b`,
    summed over the tokens they share (the diagonal of `influence_scores(a, b)`
    without the rest of the matrix): squared norms when `a` is `b`.
    """
    if a.num_examples != b.num_examples:
        raise ValueError(f"{a.num_examples} examples against {b.num_examples}: the diagonal needs as many.")
    if a is b or (torch.equal(a.offsets, b.offsets) and torch.equal(a.token_ids, b.token_ids)):
        per_row = (a.grads * b.grads.to(a.grads.dtype)).sum(dim=1)  # the same rows: no join
        return per_row.new_zeros(a.num_examples).index_add_(0, a.example_index, per_row)
    # rows are sorted by (example, token id) in both: look a's keys up in b's
    if not a.token_ids.numel() or not b.token_ids.numel():
        return a.grads.new_zeros(a.num_examples)
    stride = int(max(a.token_ids.max(), b.token_ids.max()).item()) + 1
    a_keys, b_keys = a.example_index * stride + a.token_ids, b.example_index * stride + b.token_ids
    position = torch.searchsorted(b_keys, a_keys).clamp_(max=b_keys.numel() - 1)
    found = b_keys[position] == a_keys
    dots = a.grads.new_zeros(a_keys.numel())
    dots[found] = (a.grads[found] * b.grads[position[found]].to(a.grads.dtype)).sum(dim=1)
    return dots.new_zeros(a.num_examples).index_add_(0, a.example_index, dots)
