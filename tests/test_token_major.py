"""TokenMajorGradients: the rows of a TokenGradients grouped by token id, as an index stores its chunks."""

import pickle

import pytest
import torch

from captum_tracin_we import TokenGradients, TokenMajorGradients, TokenPostings
from captum_tracin_we._core.products import diagonal_products, influence_scores

D = 3


def rows(scaled=False):
    ids = torch.tensor([[4, 1, 7, 1], [7, 2, 4, 4], [1, 1, 1, 1], [9, 4, 2, 7]])
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[2] = False  # an example without rows
    g = torch.Generator().manual_seed(0)
    gradients = TokenGradients.from_positions(ids, torch.randn(4, 4, D, generator=g, dtype=torch.float64), keep)
    if not scaled:
        return gradients
    scales = torch.rand(gradients.token_ids.numel(), generator=g, dtype=torch.float64) + 0.5
    return TokenGradients(gradients.offsets, gradients.token_ids, gradients.grads.half(), row_scales=scales)


def test_rows_are_grouped_by_token_and_each_token_is_a_range():
    example_major = rows()
    by_token = TokenMajorGradients.of(example_major)
    postings = by_token.postings()
    assert torch.equal(postings.rows, torch.arange(example_major.token_ids.numel()))
    assert torch.equal(postings.vocab, torch.tensor([1, 2, 4, 7, 9]))
    for i, token in enumerate(postings.vocab.tolist()):
        start, stop = postings.starts[i], postings.starts[i + 1]
        mine = example_major.token_ids == token
        # the token's rows, of its examples in ascending order, with those examples' indices
        assert torch.equal(by_token.grads[start:stop], example_major.grads[mine])
        assert torch.equal(by_token.example_index[start:stop], example_major.example_index[mine])
    assert by_token.num_examples == 4 and by_token.dtype == torch.float64


@pytest.mark.parametrize("scaled", [False, True])
def test_back_to_example_major_and_selections_equal_the_original(scaled):
    example_major = rows(scaled)
    by_token = TokenMajorGradients.of(example_major)
    back = by_token.by_example()
    assert torch.equal(back.offsets, example_major.offsets) and torch.equal(back.token_ids, example_major.token_ids)
    assert torch.equal(back.grads, example_major.grads)
    assert (back.row_scales is None) == (not scaled)
    if scaled:
        assert torch.equal(back.row_scales, example_major.row_scales)
        assert by_token.dtype == torch.float64  # float16 rows times float64 scales
    for wanted in ([3, 0], [2], [1, 1, 2, 0]):
        picked, expected = by_token.select(wanted), example_major.select(wanted)
        assert torch.equal(picked.offsets, expected.offsets) and torch.equal(picked.token_ids, expected.token_ids)
        assert torch.equal(picked.grads, expected.grads)


def test_moves_and_pickles_with_its_layout():
    by_token = TokenMajorGradients.of(rows(scaled=True))
    assert by_token.to(torch.device("cpu")) is by_token  # already there: its cached views kept
    copy = pickle.loads(pickle.dumps(by_token))
    assert torch.equal(copy.by_example().grads, by_token.by_example().grads)


def test_rows_that_do_not_match_the_layout_are_refused_by_name():
    example_major = rows()
    postings = example_major.postings()
    n = example_major.token_ids.numel()
    with pytest.raises(ValueError, match=(
        rf"`grads` and `by_token.rows` must have one row per token id \({n}\); got `grads` of shape "
        rf"\({n - 1}, {D}\) and {n} rows in `by_token`\."
    )):
        TokenMajorGradients(example_major.offsets, example_major.token_ids, postings, example_major.grads[1:])
    short = TokenPostings(postings.vocab, postings.starts, postings.rows[1:])
    with pytest.raises(ValueError, match=rf"and {n - 1} rows in `by_token`\."):
        TokenMajorGradients(example_major.offsets, example_major.token_ids, short, example_major.grads)
    with pytest.raises(ValueError, match=rf"`row_scales` must hold one scale per row, shape \({n},\); got \(2,\)\."):
        TokenMajorGradients(example_major.offsets, example_major.token_ids, postings, example_major.grads,
                            torch.ones(2))


def test_postings_that_are_not_those_of_the_token_ids_are_refused():
    """Hand-built postings that would pair rows of different tokens: refused, not scored."""
    example_major = rows()
    by_token = TokenMajorGradients.of(example_major)
    vocab, starts, order = by_token.by_token.vocab, by_token.by_token.starts, by_token.by_token.rows
    message = r"`by_token` must be the postings of `token_ids` \(`TokenPostings.of\(token_ids\)`, or an index's\)"
    shifted = starts.clone()
    shifted[1] += 1  # the first token's range takes a row of the second
    beyond = order.clone()
    beyond[0] = order.numel()
    for bad in (TokenPostings(vocab, shifted, order), TokenPostings(vocab, starts[:-1], order),
                TokenPostings(vocab.flip(0), starts, order), TokenPostings(vocab, starts, beyond)):
        with pytest.raises(ValueError, match=message):
            TokenMajorGradients(example_major.offsets, example_major.token_ids, bad, by_token.grads)
    # the example-major layout is checked as in TokenGradients
    with pytest.raises(ValueError, match=r"`offsets` must be a 1D torch.long tensor, got 1D torch.int32"):
        TokenMajorGradients(example_major.offsets.int(), example_major.token_ids, by_token.by_token, by_token.grads)
    with pytest.raises(ValueError, match=r"`offsets` must rise from 0 to len\(token_ids\) = 10"):
        TokenMajorGradients(torch.tensor([0, 2, 12]), example_major.token_ids, by_token.by_token, by_token.grads)
    # its own postings pass, and scores equal the example-major rows'
    rebuilt = TokenMajorGradients(example_major.offsets, example_major.token_ids, by_token.by_token, by_token.grads)
    assert torch.equal(influence_scores(rebuilt, rebuilt), influence_scores(example_major, example_major))


def test_example_level_products_take_the_token_major_layout():
    example_major = rows()
    by_token = TokenMajorGradients.of(example_major)
    expected = example_major.squared_norms()
    assert torch.equal(diagonal_products(by_token, by_token), expected)
    assert torch.equal(diagonal_products(by_token, example_major), expected)
