r"""
Sparse-sparse products of ``TokenGradients``, joined on token id.

Two examples only interact through the tokens they share, so every product is a
sum, over the shared tokens w, of ``T_w @ R_w.T``: the test rows holding w
against the training rows holding w. How each token's block is computed
depends on its size (DESIGN.md section 9), decided per call:

- *dense*: each token held by a large share of both sides ([CLS], [SEP],
  "the") is one GEMM of an ``(examples, d)`` matrix per side (its rows, zeros
  for examples without it);
- *per-token GEMM*: tokens with many pairs but not dense enough for that;
- *sampled*: the rest (most tokens of a Zipf vocabulary, a few pairs each) as
  the dot products of their pairs of rows only, where the rows lie (a sampled
  dense product, ``torch.sparse.sampled_addmm``), on CPU in float32 and
  float64; otherwise, and with ``join="gather"``, by gathering each pair's two
  rows, in chunks so memory stays bounded.

``join="gather"`` computes every token by gathered pairs: the reference the
others are tested against. Only training rows of shared tokens are ever read.
Either side may be a `TokenMajorGradients` (rows grouped by token id, as an
index stores its chunks and a query its test rows): a token's rows are then a
slice, which the GEMMs read in place instead of gathering them, and a rare
token's rows lie side by side.
"""

import warnings
from typing import Iterator, List, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from captum_tracin_we._core.token_gradients import _ranges, TokenGradients, TokenPostings
from captum_tracin_we._core.token_major import example_major, TokenMajorGradients

# either side of a join, in either layout (a token-major side's rows of a token are read in place)
Side = Union[TokenGradients, TokenMajorGradients]

# gathered (pair, embedding-dim) elements processed at once: small enough to stay in cache
_CHUNK_ELEMENTS = 1 << 18
# a token is joined in the dense GEMM when its pairs are at least this share of all (test, train) pairs
_DENSE_SHARE = 0.25
# ... and by its own GEMM when it has at least this many pairs
_GEMM_PAIRS = 512
# elements of the per-token GEMMs' gathered rows and products per batch, which one scatter adds:
# a few MB, so that the buffers are reused rather than mapped afresh (page faults cost more than the copy)
_GEMM_BATCH = 1 << 20
# pairs of rows in one sampled product (each pair holds about 30 bytes of indices and values)
_SAMPLED_PAIRS = 1 << 21
JOINS = ("auto", "gather")


class SharedTokenTerms(NamedTuple):
    r"""
    One entry per (test example, train example, shared token): the token's
    term in the influence of that train example on that test example.
    """

    test_example: Tensor
    train_example: Tensor
    token_id: Tensor
    score: Tensor


class _SharedTokens(NamedTuple):
    r"""Per token both sides hold: where its rows start in each side's postings, how many, and its id."""

    test_first: Tensor
    test_count: Tensor
    train_first: Tensor
    train_count: Tensor
    token: Tensor

    def subset(self, mask: Tensor) -> "_SharedTokens":
        return _SharedTokens(*(column[mask] for column in self))

    @property
    def pairs(self) -> Tensor:
        return self.test_count * self.train_count


def _shared_tokens(test: TokenPostings, train: TokenPostings) -> _SharedTokens:
    first, count = train.lookup(test.vocab)
    found = count > 0
    test_count = test.starts[1:] - test.starts[:-1]
    return _SharedTokens(test.starts[:-1][found], test_count[found], first[found], count[found], test.vocab[found])


def shared_token_pairs(
    test: Side, train: Side
) -> Tuple[Tensor, Tensor]:
    r"""
    Row indices ``(test_rows, train_rows)`` of every pair of a test row and a
    train row with the same token id (of each side's `grads`: a token-major
    side's positions).
    """
    test_postings, train_postings = test.postings(), train.postings()
    return _pairs(test_postings, train_postings, _shared_tokens(test_postings, train_postings))


def _pairs(test: TokenPostings, train: TokenPostings, shared: _SharedTokens) -> Tuple[Tensor, Tensor]:
    r"""The (test row, train row) pairs of the `shared` tokens."""
    test_rows = test.rows[_ranges(shared.test_first, shared.test_count)]
    # each test row meets every train row of its token
    first = torch.repeat_interleave(shared.train_first, shared.test_count)
    count = torch.repeat_interleave(shared.train_count, shared.test_count)
    return torch.repeat_interleave(test_rows, count), train.rows[_ranges(first, count)]


def _pair_dots(
    test: Side, train: Side, test_rows: Tensor, train_rows: Tensor
) -> Iterator[Tuple[Tensor, Tensor, Tensor]]:
    r"""Yields ``(test_rows, train_rows, dot products)`` chunk by chunk."""
    chunk = max(1, _CHUNK_ELEMENTS // max(1, test.grads.shape[1]))
    for start in range(0, test_rows.numel(), chunk):
        t = test_rows[start : start + chunk]
        r = train_rows[start : start + chunk]
        # rows stored in another dtype (an index) are promoted to the test rows'; only these are scaled
        a = test.rows(t)
        yield t, r, torch.linalg.vecdot(a, train.rows(r, a.dtype))


def _sampled_dots(
    test: Side, train: Side, test_postings: TokenPostings,
    train_postings: TokenPostings, shared: _SharedTokens,
) -> Iterator[Tuple[Tensor, Tensor, Tensor]]:
    r"""
    The pairs of `shared`'s rows as `_pair_dots` gives them, by a sampled dense
    product (``torch.sparse.sampled_addmm``): each pair's dot product is taken
    where the rows lie, so no row is copied per pair. Pairs are grouped by test
    row, in slices of at most `_SAMPLED_PAIRS`.
    """
    # the pairs' training rows are `train_rows` at positions found below; the product's columns are those
    # rows of the chunk, or, for rows to be scaled or promoted, of the shared tokens' rows gathered once each
    # (the postings list each token's rows once), which the positions then index
    train_rows, train_first, train_grads, gathered = train_postings.rows, shared.train_first, train.grads, False
    if train.row_scales is not None or train_grads.dtype != test.dtype:
        train_rows = train_postings.rows[_ranges(shared.train_first, shared.train_count)]
        train_grads, gathered = train.rows(train_rows, test.dtype), True
        train_first = torch.cumsum(shared.train_count, 0) - shared.train_count
    # per test row (in row order): where its token's training rows start, and how many
    held = (test_postings.rows[_ranges(shared.test_first, shared.test_count)],)
    first = torch.zeros_like(test.token_ids).index_put_(held, train_first.repeat_interleave(shared.test_count))
    count = torch.zeros_like(test.token_ids).index_put_(held, shared.train_count.repeat_interleave(shared.test_count))
    ends = torch.cumsum(count, 0)
    start = 0
    while start < count.numel():
        # test rows start:stop hold at most _SAMPLED_PAIRS pairs (or one row, if it alone holds more)
        before = int(ends[start - 1]) if start else 0
        stop = max(start + 1, int(torch.searchsorted(ends, before + _SAMPLED_PAIRS, right=True)))
        t_count = count[start:stop]
        positions = _ranges(first[start:stop], t_count)
        if positions.numel():
            rows = train_rows[positions]
            columns = positions if gathered else rows
            crow = torch.cat([t_count.new_zeros(1), torch.cumsum(t_count, 0)])
            with warnings.catch_warnings():  # "sparse CSR support is in beta": sampled_addmm is all we use
                warnings.simplefilter("ignore", UserWarning)
                mask = torch.sparse_csr_tensor(crow, columns, test.grads.new_zeros(columns.numel()),
                                               size=(stop - start, train_grads.shape[0]), check_invariants=False)
            dots = torch.sparse.sampled_addmm(mask, test.grads[start:stop], train_grads.T, beta=0.0).values()
            test_rows = torch.repeat_interleave(torch.arange(start, stop, device=count.device), t_count)
            yield test_rows, rows, dots
        start = stop


def _samples(test: Side) -> bool:
    r"""Whether the sampled product serves these test rows (a CPU kernel, float32 and float64 only)."""
    cpu = test.grads.device.type == "cpu"
    return cpu and test.row_scales is None and test.dtype in (torch.float32, torch.float64)


class _Join:
    r"""The shared tokens of one test and one train block, split by how they are computed."""

    def __init__(self, test: Side, train: Side, join: str, dense: bool) -> None:
        if join not in JOINS:
            raise ValueError(f"`join` must be one of {JOINS}, got {join!r}.")
        if torch.is_grad_enabled() and any(side.grads.requires_grad for side in (test, train)):
            join = "gather"  # the per-token GEMMs write into buffers (out=), which autograd cannot follow
        self.test, self.train, self.join = test, train, join
        self.test_postings, self.train_postings = test.postings(), train.postings()
        shared = _shared_tokens(self.test_postings, self.train_postings)
        pairs = shared.pairs
        if join == "gather":
            none = torch.zeros_like(pairs, dtype=torch.bool)
            self.dense, self.gemm, self.gather = shared.subset(none), shared.subset(none), shared
            return
        all_pairs = test.num_examples * train.num_examples
        in_dense = pairs >= _DENSE_SHARE * all_pairs if dense else torch.zeros_like(pairs, dtype=torch.bool)
        in_gemm = ~in_dense & (pairs >= _GEMM_PAIRS)
        self.dense, self.gemm = shared.subset(in_dense), shared.subset(in_gemm)
        self.gather = shared.subset(~in_dense & ~in_gemm)

    def gathered(self) -> Iterator[Tuple[Tensor, Tensor, Tensor]]:
        r"""``(test rows, train rows, dot products)`` of the gathered tokens, in chunks."""
        if self.join == "auto" and _samples(self.test):
            return _sampled_dots(self.test, self.train, self.test_postings, self.train_postings, self.gather)
        test_rows, train_rows = _pairs(self.test_postings, self.train_postings, self.gather)
        return _pair_dots(self.test, self.train, test_rows, train_rows)

    def token_products(self, with_tokens: bool = False) -> Iterator[Tuple[Tensor, Tensor, Optional[Tensor]]]:
        r"""
        ``(keys, products, token ids)`` of the per-token-GEMM tokens, flat, in
        batches: for each pair of rows of a token, ``test_example * n_train +
        train_example`` and its entry of ``T_w @ R_w.T``, so that one scatter
        adds a whole batch; token ids only if `with_tokens` (None otherwise). A
        batch's rows are gathered at once and its products written in place, at
        most `_GEMM_BATCH` rows and products (or one token's, if more), since
        small operations per token cost more than their arithmetic here.
        """
        test, train, gemm = self.test, self.train, self.gemm
        dtype, n_train, dim = test.dtype, train.num_examples, test.grads.shape[1]
        tp, rp = self.test_postings, self.train_postings
        # per row of each side's postings: the offset of its example in the flat scores
        test_offset = test.example_index[tp.rows] * n_train
        train_offset = train.example_index[rp.rows]
        t_first, t_count, r_first, r_count = (column.tolist() for column in gemm[:4])
        pairs, rows = gemm.pairs.tolist(), (gemm.test_count + gemm.train_count).tolist()
        token = 0
        while token < len(pairs):
            last, n_pairs, n_rows = token + 1, pairs[token], rows[token]
            while last < len(pairs) and n_pairs + pairs[last] + (n_rows + rows[last]) * dim <= _GEMM_BATCH:
                n_pairs, n_rows = n_pairs + pairs[last], n_rows + rows[last]
                last += 1
            batch = gemm.subset(slice(token, last))
            a, a_starts = _batch_rows(test, tp, batch.test_first, batch.test_count, dtype)
            b, b_starts = _batch_rows(train, rp, batch.train_first, batch.train_count, dtype)
            keys, products = test_offset.new_empty(n_pairs), a.new_empty(n_pairs)
            at = 0
            columns = (t_first, t_count, r_first, r_count)
            for t0, tn, r0, rn, a_at, b_at in zip(*(column[token:last] for column in columns), a_starts, b_starts):
                torch.mm(a[a_at : a_at + tn], b[b_at : b_at + rn].T, out=products[at : at + tn * rn].view(tn, rn))
                torch.add(test_offset[t0 : t0 + tn].unsqueeze(1), train_offset[r0 : r0 + rn].unsqueeze(0),
                          out=keys[at : at + tn * rn].view(tn, rn))
                at += tn * rn
            tokens = None
            if with_tokens:
                tokens = torch.repeat_interleave(batch.token, batch.pairs)
            yield keys, products, tokens
            token = last

    def dense_scores(self) -> Tensor:
        r"""
        The ``(n_test, n_train)`` products over the dense tokens, one GEMM per
        token; asked for before `token_products`, which takes the dense tokens
        over if their rows are not all finite.
        """
        test, train, dense = self.test, self.train, self.dense
        scores = None
        for t_first, t_count, r_first, r_count in zip(*(column.tolist() for column in dense[:4])):
            a = _spread(test, self.test_postings, t_first, t_count, test.dtype)
            b = _spread(train, self.train_postings, r_first, r_count, test.dtype)
            if not bool(torch.isfinite(a.sum() + b.sum())):  # so is any inf or NaN (cheaper than isfinite(a))
                # inf or NaN times the zeros of an absent token would reach pairs that do not share it:
                # these tokens go to the per-token GEMMs, which multiply only rows that hold them (a sum that
                # overflows sends finite rows there too, which is exact, only slower)
                self.gemm = _SharedTokens(*(torch.cat(columns) for columns in zip(dense, self.gemm)))
                self.dense = dense.subset(slice(0, 0))
                return self.dense_scores()
            scores = a @ b.T if scores is None else scores.addmm_(a, b.T)  # the first written, not added to zeros
        if scores is None:
            return test.grads.new_zeros(test.num_examples, train.num_examples, dtype=test.dtype)
        return scores


def _in_place(rows: Side, dtype: torch.dtype) -> bool:
    r"""Whether each token's rows of `rows` are a slice of its `grads`, usable as they are in `dtype`."""
    return isinstance(rows, TokenMajorGradients) and rows.row_scales is None and rows.grads.dtype == dtype


def _batch_rows(
    side: Side, postings: TokenPostings, first: Tensor, count: Tensor, dtype: torch.dtype
) -> Tuple[Tensor, List[int]]:
    r"""
    The rows of a batch of tokens (postings positions ``first[j]:first[j] +
    count[j]``) and where each token's begin in them: a token-major side's own
    rows, read in place, or else the batch's rows gathered, token after token.
    """
    if _in_place(side, dtype):
        return side.grads, first.tolist()
    return side.rows(postings.rows[_ranges(first, count)], dtype), (torch.cumsum(count, 0) - count).tolist()


def _spread(rows: Side, postings: TokenPostings, first: int, count: int, dtype: torch.dtype) -> Tensor:
    r"""
    The ``(num_examples, d)`` matrix of one token's rows (postings positions
    ``first:first + count``), each in its example's row, zeros elsewhere.
    """
    n = rows.num_examples
    which = postings.rows[first : first + count]
    example = rows.example_index[which]
    if count == n and torch.equal(example, torch.arange(n, device=example.device)):
        # every example holds the token once ([CLS], [SEP]): its rows as they are, in place where they can be
        if _in_place(rows, dtype):
            return rows.grads[first : first + count]
        return rows.rows(which, dtype)
    # added, not assigned: rows built by hand may hold a token twice in one example (the package's never do)
    return rows.grads.new_zeros(n, rows.grads.shape[1], dtype=dtype).index_add_(0, example, rows.rows(which, dtype))


def influence_scores(test: Side, train: Side, join: str = "auto") -> Tensor:
    r"""
    The ``(test.num_examples, train.num_examples)`` matrix of gradient dot
    products, summed over shared tokens. `join` is "auto" (dense, per-token
    GEMMs and gathers, by token; see the module docstring) or "gather" (the
    reference: every token by gathered pairs).
    """
    plan = _Join(test, train, join, dense=True)
    n_train = train.num_examples
    scores = plan.dense_scores().view(-1)
    for keys, products, _ in plan.token_products():
        scores.put_(keys, products, accumulate=True)  # the same sums as index_add_, a third faster here
    test_example, train_example = test.example_index, train.example_index
    for t, r, dots in plan.gathered():
        scores.index_add_(0, test_example[t] * n_train + train_example[r], dots)
    return scores.view(test.num_examples, n_train)


def shared_token_terms(test: Side, train: Side, join: str = "auto") -> SharedTokenTerms:
    r"""
    The per-token terms of ``influence_scores(test, train)``: summing ``score``
    over entries with the same (test_example, train_example) gives that score.
    Tokens of many pairs are computed by their own GEMM, the rest by gathers.
    """
    test = example_major(test)  # the terms name the token of each test row
    plan = _Join(test, train, join, dense=False)  # a dense GEMM sums tokens: no terms
    test_example, train_example = test.example_index, train.example_index
    n_train = train.num_examples
    parts: List[Tuple[Tensor, ...]] = []
    for keys, products, tokens in plan.token_products(with_tokens=True):
        parts.append((keys // n_train, keys % n_train, tokens, products))
    for t, r, dots in plan.gathered():
        parts.append((test_example[t], train_example[r], test.token_ids[t], dots))
    if not parts:
        empty = test.token_ids.new_zeros(0)
        return SharedTokenTerms(empty, empty, empty, test.grads.new_zeros(0))
    return SharedTokenTerms(*(torch.cat(column) for column in zip(*parts)))


def diagonal_products(a: Side, b: Side) -> Tensor:
    r"""
    Per example i, the product of example i of `a` with example i of `b`,
    summed over the tokens they share (the diagonal of `influence_scores(a, b)`
    without the rest of the matrix): squared norms when `a` is `b`.
    """
    if a.num_examples != b.num_examples:
        raise ValueError(f"{a.num_examples} examples against {b.num_examples}: the diagonal needs as many.")
    # one row per (example, token id), ascending (hand-built rows may repeat or reorder ids): rows pair up one to one
    same = a is b
    a = example_major(a).scaled().canonical()
    b = a if same else example_major(b).scaled().canonical()
    if a is b or (torch.equal(a.offsets, b.offsets) and torch.equal(a.token_ids, b.token_ids)):
        per_row = (a.grads * b.grads.to(a.grads.dtype)).sum(dim=1)  # the same rows: no join
        return per_row.new_zeros(a.num_examples).index_add_(0, a.example_index, per_row)
    # look a's (example, token) keys up in b's, sorted; of the ids' ranks, so that no id makes keys collide
    if not a.token_ids.numel() or not b.token_ids.numel():
        return a.grads.new_zeros(a.num_examples)
    vocab, rank = torch.unique(torch.cat([a.token_ids, b.token_ids]), return_inverse=True)
    stride = vocab.numel()
    a_keys = a.example_index * stride + rank[: a.token_ids.numel()]
    b_keys = b.example_index * stride + rank[a.token_ids.numel():]
    position = torch.searchsorted(b_keys, a_keys).clamp_(max=b_keys.numel() - 1)
    found = b_keys[position] == a_keys
    dots = a.grads.new_zeros(a_keys.numel())
    dots[found] = (a.grads[found] * b.grads[position[found]].to(a.grads.dtype)).sum(dim=1)
    return dots.new_zeros(a.num_examples).index_add_(0, a.example_index, dots)
