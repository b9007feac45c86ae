"""The ragged token-gradient structure and the sparse products, against dense references."""

import re

import pytest
import torch

from captum_tracin_we import TokenGradients
from captum_tracin_we._core.products import influence_scores, shared_token_terms
from captum_tracin_we._core.token_gradients import TokenPostings

V, D = 9, 4


def random_batch(n, length, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, length), generator=g)
    grads = torch.randn(n, length, D, generator=g, dtype=torch.float64)
    return ids, grads


def dense_reference(ids, grads, keep=None):
    """Scatter-add each position's gradient into a (n, V, D) tensor."""
    dense = torch.zeros(ids.shape[0], V, D, dtype=grads.dtype)
    for i in range(ids.shape[0]):
        for p in range(ids.shape[1]):
            if keep is None or keep[i, p]:
                dense[i, ids[i, p]] += grads[i, p]
    return dense


def test_from_positions_sums_repeated_tokens():
    ids, grads = random_batch(5, 8, seed=0)
    tg = TokenGradients.from_positions(ids, grads)
    assert torch.equal(tg.to_dense(V), dense_reference(ids, grads))
    for i in range(5):
        row_ids = tg.token_ids[tg.offsets[i] : tg.offsets[i + 1]]
        assert torch.equal(row_ids, torch.unique(ids[i]))  # one sorted row per token


def test_keep_mask_drops_positions():
    ids, grads = random_batch(4, 6, seed=1)
    keep = ids != 3
    tg = TokenGradients.from_positions(ids, grads, keep)
    assert not (tg.token_ids == 3).any()
    assert torch.equal(tg.to_dense(V), dense_reference(ids, grads, keep))


def test_example_with_no_kept_token_has_no_rows():
    ids = torch.tensor([[1, 2], [0, 0], [2, 2]])
    grads = torch.ones(3, 2, D, dtype=torch.float64)
    tg = TokenGradients.from_positions(ids, grads, keep=ids != 0)
    assert tg.offsets.tolist() == [0, 2, 2, 3]
    assert tg.squared_norms().tolist() == [2 * D, 0.0, 4 * D]


def test_influence_scores_equal_dense_dot_products():
    test = TokenGradients.from_positions(*random_batch(3, 5, seed=2))
    train = TokenGradients.from_positions(*random_batch(7, 6, seed=3))
    expected = torch.einsum("ivd,jvd->ij", test.to_dense(V), train.to_dense(V))
    torch.testing.assert_close(influence_scores(test, train), expected, rtol=1e-12, atol=1e-12)


def test_postings_group_rows_by_token_and_look_up_absent_tokens():
    train = TokenGradients.from_positions(*random_batch(6, 5, seed=4))
    postings = TokenPostings.of(train.token_ids)
    assert torch.equal(postings.vocab, torch.unique(train.token_ids))
    for i, token in enumerate(postings.vocab.tolist()):
        rows = postings.rows[postings.starts[i] : postings.starts[i + 1]]
        assert torch.equal(rows, torch.nonzero(train.token_ids == token).flatten())
    queries = torch.tensor([V + 5, -1] + postings.vocab.tolist())
    first, counts = postings.lookup(queries)
    assert counts[:2].tolist() == [0, 0]
    assert torch.equal(counts[2:], postings.starts[1:] - postings.starts[:-1])
    assert torch.equal(first[2:], postings.starts[:-1])
    empty = TokenPostings.of(torch.zeros(0, dtype=torch.long))
    assert empty.lookup(queries)[1].tolist() == [0] * len(queries)


def test_products_use_a_given_inverted_view():
    test = TokenGradients.from_positions(*random_batch(3, 5, seed=2))
    train = TokenGradients.from_positions(*random_batch(7, 6, seed=3))
    postings = TokenPostings.of(train.token_ids)
    # a wrong inverted view (token 0's rows hidden) changes the scores: it is used
    hidden = TokenPostings(postings.vocab[1:], postings.starts[1:], postings.rows)
    with_view = TokenGradients(train.offsets, train.token_ids, train.grads, hidden)
    without_zero = TokenGradients(train.offsets, train.token_ids, train.grads * (train.token_ids != 0)[:, None])
    torch.testing.assert_close(influence_scores(test, with_view), influence_scores(test, without_zero))


def test_chunked_products_equal_unchunked(monkeypatch):
    import captum_tracin_we._core.products as products

    test = TokenGradients.from_positions(*random_batch(3, 5, seed=4))
    train = TokenGradients.from_positions(*random_batch(7, 6, seed=5))
    whole = influence_scores(test, train)
    monkeypatch.setattr(products, "_CHUNK_ELEMENTS", 3 * D)  # 3 pairs per chunk
    torch.testing.assert_close(influence_scores(test, train), whole, rtol=1e-12, atol=1e-12)


def test_shared_token_terms_are_the_shared_tokens_and_sum_to_scores():
    test = TokenGradients.from_positions(*random_batch(2, 5, seed=6))
    train = TokenGradients.from_positions(*random_batch(4, 5, seed=7))
    terms = shared_token_terms(test, train)
    scores = influence_scores(test, train)
    for i in range(2):
        for j in range(4):
            mine = (terms.test_example == i) & (terms.train_example == j)
            shared = set(test.select([i]).token_ids.tolist()) & set(
                train.select([j]).token_ids.tolist()
            )
            assert set(terms.token_id[mine].tolist()) == shared
            torch.testing.assert_close(terms.score[mine].sum(), scores[i, j])


def test_top_k_tokens_keeps_largest_norms():
    tg = TokenGradients.from_positions(*random_batch(6, 8, seed=8))
    top = tg.top_k_tokens(2)
    for i in range(6):
        rows = slice(tg.offsets[i], tg.offsets[i + 1])
        norms = tg.grads[rows].norm(dim=1)
        expected = set(tg.token_ids[rows][torch.topk(norms, min(2, norms.numel())).indices].tolist())
        kept = top.token_ids[top.offsets[i] : top.offsets[i + 1]]
        assert set(kept.tolist()) == expected
        assert torch.equal(kept, kept.sort().values)  # still sorted by token id
    assert tg.top_k_tokens(100).to_dense(V).equal(tg.to_dense(V))


def test_select_concat_and_summed():
    a = TokenGradients.from_positions(*random_batch(3, 4, seed=9))
    b = TokenGradients.from_positions(*random_batch(2, 4, seed=10))
    both = TokenGradients.concat([a, b])
    assert torch.equal(both.to_dense(V), torch.cat([a.to_dense(V), b.to_dense(V)]))
    picked = both.select([4, 0])
    assert torch.equal(picked.to_dense(V), both.to_dense(V)[[4, 0]])
    torch.testing.assert_close(both.summed().to_dense(V)[0], both.to_dense(V).sum(0))
    torch.testing.assert_close(both.squared_norms(), both.to_dense(V).pow(2).sum((1, 2)))


def test_malformed_fields_are_refused_by_name():
    offsets, ids, grads = torch.tensor([0, 2, 3]), torch.tensor([1, 4, 2]), torch.randn(3, D)
    cases = [
        ((offsets, ids.int(), grads), "`token_ids` must be a 1D torch.long tensor, got 1D torch.int32: "
                                      "pass `token_ids.long()`."),
        ((offsets.int(), ids, grads), "`offsets` must be a 1D torch.long tensor, got 1D torch.int32: "
                                      "pass `offsets.long()`."),
        ((offsets, ids.view(1, 3), grads), "`token_ids` must be a 1D torch.long tensor, got 2D torch.int64: "
                                           "pass a flat tensor, e.g. `token_ids.reshape(-1).long()`."),
        ((offsets[:0], ids, grads), "`offsets` must have num_examples + 1 entries, starting at 0; "
                                    "got an empty tensor."),
        ((torch.tensor([0, 2, 5]), ids, grads), "`offsets` must rise from 0 to len(token_ids) = 3 (example i owns "
                                                "rows offsets[i]:offsets[i + 1]); got offsets[0] = 0, offsets[-1] = 5."),
        ((torch.tensor([1, 2, 3]), ids, grads), "got offsets[0] = 1, offsets[-1] = 3."),
        ((torch.tensor([0, 3, 2, 3]), ids, grads), "got offsets[0] = 0, offsets[-1] = 3, decreasing somewhere."),
        ((offsets, ids, grads[:2]), "`grads` must be 2D with one row per token id, shape (3, d); got (2, 4)."),
        ((offsets, ids, grads.view(-1)), "`grads` must be 2D with one row per token id, shape (3, d); got (12,)."),
    ]
    for fields, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            TokenGradients(*fields)
    with pytest.raises(ValueError, match=re.escape("`row_scales` must hold one scale per row, shape (3,); got (2,).")):
        TokenGradients(offsets, ids, grads, row_scales=torch.ones(2))
    # int32 ids once failed deep in the join with an opaque index_put_ error, and offsets [0, 2, 5] over 3 rows
    # gave scores from the rows there were; both fail here now, and well-formed fields join as before
    good = TokenGradients(offsets, ids, grads)
    assert torch.allclose(good.products(good), good.to_dense(V).flatten(1) @ good.to_dense(V).flatten(1).T)
