"""The token join by GEMMs ("auto") against the gather join (the reference), on skewed token frequencies."""

import pytest
import torch

from captum_tracin_we import TokenGradients, TokenMajorGradients
from captum_tracin_we._core import products
from captum_tracin_we._core.products import influence_scores, shared_token_terms

D = 5


def zipf_batch(n, length, vocab, seed, empty=(), dtype=torch.float64):
    """Token ids drawn with Zipf-like frequencies (token 0 in every example, like [CLS]); repeats within
    an example are summed by from_positions; examples in `empty` keep no token."""
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    ids = torch.multinomial(weights, n * length, replacement=True, generator=g).view(n, length)
    ids[:, 0] = 0
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[list(empty)] = False
    grads = torch.randn(n, length, D, generator=g, dtype=torch.float64).to(dtype)
    return TokenGradients.from_positions(ids, grads, keep)


def stored_as(rows, dtype):
    """The same rows in another dtype, as an index keeps them, with their inverted view."""
    return TokenGradients(rows.offsets, rows.token_ids, rows.grads.to(dtype), rows.postings())


@pytest.fixture
def small_thresholds(monkeypatch):
    """Thresholds that put tokens in all three ways of joining, even for small inputs."""
    monkeypatch.setattr(products, "_DENSE_SHARE", 0.3)
    monkeypatch.setattr(products, "_GEMM_PAIRS", 6)


# both layouts of a side: example-major, and grouped by token id as an index stores its chunks (read in place)
LAYOUTS = {"example-major": lambda rows: rows, "token-major": TokenMajorGradients.of}
BOTH_SIDES = pytest.mark.parametrize("test_layout,train_layout", [(a, b) for a in LAYOUTS for b in LAYOUTS])
TRAIN_SIDE = pytest.mark.parametrize("train_layout", list(LAYOUTS))


def ways(test, train):
    plan = products._Join(test, train, "auto", dense=True)
    return plan.dense.pairs.numel(), plan.gemm.pairs.numel(), plan.gather.pairs.numel()


@BOTH_SIDES
def test_every_way_of_joining_is_used_and_equals_the_gather_join(small_thresholds, test_layout, train_layout):
    test = zipf_batch(6, 9, vocab=40, seed=0, empty=[2])
    train = zipf_batch(25, 11, vocab=40, seed=1, empty=[0, 7])
    dense = torch.einsum("ivd,jvd->ij", test.to_dense(40), train.to_dense(40))
    test, train = LAYOUTS[test_layout](test), LAYOUTS[train_layout](train)
    assert all(count > 0 for count in ways(test, train))
    expected = influence_scores(test, train, join="gather")
    torch.testing.assert_close(expected, dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(influence_scores(test, train), expected, rtol=1e-12, atol=1e-12)
    assert (expected[2] == 0).all() and (expected[:, [0, 7]] == 0).all()


@BOTH_SIDES
def test_default_thresholds_on_a_larger_skewed_batch(test_layout, train_layout):
    test = LAYOUTS[test_layout](zipf_batch(40, 20, vocab=300, seed=2))
    train = LAYOUTS[train_layout](zipf_batch(300, 20, vocab=300, seed=3, empty=[5]))
    n_dense, n_gemm, n_gather = ways(test, train)
    assert n_dense >= 1 and n_gemm >= 1 and n_gather >= 1  # token 0 dense, frequent GEMMs, a long tail
    torch.testing.assert_close(
        influence_scores(test, train), influence_scores(test, train, join="gather"), rtol=1e-12, atol=1e-12
    )


@TRAIN_SIDE
def test_float16_training_rows_are_promoted_like_the_gather_join(small_thresholds, train_layout):
    test = zipf_batch(5, 9, vocab=30, seed=4, dtype=torch.float32)
    train = LAYOUTS[train_layout](stored_as(zipf_batch(20, 9, vocab=30, seed=5), torch.float16))
    auto, gather = influence_scores(test, train), influence_scores(test, train, join="gather")
    assert auto.dtype == gather.dtype == torch.float32
    torch.testing.assert_close(auto, gather, rtol=1e-5, atol=1e-5)


@BOTH_SIDES
def test_several_dense_tokens_each_by_its_own_gemm(small_thresholds, test_layout, train_layout):
    test = LAYOUTS[test_layout](zipf_batch(6, 9, vocab=12, seed=6))
    train = LAYOUTS[train_layout](zipf_batch(15, 9, vocab=12, seed=7))
    assert ways(test, train)[0] > 1
    torch.testing.assert_close(
        influence_scores(test, train), influence_scores(test, train, join="gather"), rtol=1e-12, atol=1e-12
    )


def test_no_shared_tokens_and_no_rows():
    test = TokenGradients.from_positions(torch.tensor([[1, 2]]), torch.ones(1, 2, D))
    train = TokenGradients.from_positions(torch.tensor([[3, 4], [5, 5]]), torch.ones(2, 2, D))
    assert torch.equal(influence_scores(test, train), torch.zeros(1, 2))
    nothing = TokenGradients.from_positions(torch.tensor([[1]]), torch.ones(1, 1, D), keep=torch.tensor([[False]]))
    assert torch.equal(influence_scores(nothing, train), torch.zeros(1, 2))
    assert shared_token_terms(nothing, train).score.numel() == 0


def sorted_terms(terms):
    key = (terms.test_example * 1000 + terms.train_example) * 1000 + terms.token_id
    order = torch.argsort(key)
    return key[order], terms.score[order]


@BOTH_SIDES
def test_word_level_terms_equal_the_gather_join(small_thresholds, test_layout, train_layout):
    example_major = zipf_batch(4, 9, vocab=30, seed=8, empty=[1])
    test, train = LAYOUTS[test_layout](example_major), LAYOUTS[train_layout](zipf_batch(12, 9, vocab=30, seed=9))
    plan = products._Join(test, train, "auto", dense=False)
    assert plan.dense.pairs.numel() == 0 and plan.gemm.pairs.numel() > 0 and plan.gather.pairs.numel() > 0
    keys, scores = sorted_terms(shared_token_terms(test, train))
    expected_keys, expected = sorted_terms(shared_token_terms(example_major, train, join="gather"))
    assert torch.equal(keys, expected_keys)
    torch.testing.assert_close(scores, expected, rtol=1e-12, atol=1e-12)


def test_unknown_join_is_refused():
    rows = zipf_batch(2, 3, vocab=5, seed=10)
    with pytest.raises(ValueError, match=r"`join` must be one of \('auto', 'gather'\), got 'dense'\."):
        influence_scores(rows, rows, join="dense")


def test_a_token_twice_in_one_example_counts_twice_in_every_join(small_thresholds):
    """Rows built by hand may repeat a token within an example (the package's never do): as the gather."""
    test = TokenGradients(torch.tensor([0, 2]), torch.tensor([3, 3]), torch.ones(2, D, dtype=torch.float64))
    train = TokenGradients(torch.tensor([0, 1, 2]), torch.tensor([3, 3]), torch.ones(2, D, dtype=torch.float64))
    gather = influence_scores(test, train, join="gather")
    assert gather.tolist() == [[2.0 * D, 2.0 * D]]
    assert ways(test, train)[0] == 1  # the dense GEMM
    assert torch.equal(influence_scores(test, train), gather)


def test_rows_kept_with_their_scales_give_the_scores_of_the_scaled_rows(small_thresholds):
    """A float16 index's chunk read lazily (rows and scales apart): every join and method as if scaled."""
    test = zipf_batch(5, 9, vocab=30, seed=11, dtype=torch.float32)
    full = zipf_batch(20, 9, vocab=30, seed=12, dtype=torch.float32)
    largest = full.grads.abs().amax(dim=1).clamp(min=1e-30)
    lazy = TokenGradients(full.offsets, full.token_ids, (full.grads / largest[:, None]).half(), full.postings(),
                          row_scales=largest)
    scaled = lazy.scaled()
    assert scaled.row_scales is None and lazy.dtype == scaled.grads.dtype == torch.float32
    for join in ("auto", "gather"):
        assert torch.equal(influence_scores(test, lazy, join), influence_scores(test, scaled, join))
        assert torch.equal(shared_token_terms(test, lazy, join).score, shared_token_terms(test, scaled, join).score)
        # grouped by token id, as an index stores them: the scales travel with their rows
        by_token = TokenMajorGradients.of(lazy)
        assert torch.equal(influence_scores(test, by_token, join), influence_scores(test, scaled, join))
    assert torch.equal(lazy.squared_norms(), scaled.squared_norms())
    assert torch.equal(lazy.select([3, 1]).grads, scaled.select([3, 1]).grads)
    assert torch.equal(TokenGradients.concat([lazy, lazy]).grads, TokenGradients.concat([scaled, scaled]).grads)
    assert torch.equal(lazy.to(torch.device("cpu")).row_scales, largest)
    torch.testing.assert_close(scaled.grads, full.grads, rtol=1e-3, atol=0)  # float16 rows, 3 digits


def counting_sampled_products(monkeypatch):
    """Counts the calls of the sampled product (the join's kernel for rare tokens on CPU)."""
    calls = []
    sampled = torch.sparse.sampled_addmm

    def counted(*args, **kwargs):
        calls.append(args[0].values().numel())
        return sampled(*args, **kwargs)

    monkeypatch.setattr(torch.sparse, "sampled_addmm", counted)
    return calls


@TRAIN_SIDE
@pytest.mark.parametrize("stored", [torch.float64, torch.float32])
def test_rare_tokens_by_sampled_products_in_slices_equal_the_gather_join(
    small_thresholds, monkeypatch, stored, train_layout
):
    """Training rows of the test rows' dtype are read where they lie; others are promoted, each row once."""
    test = zipf_batch(6, 9, vocab=40, seed=13, empty=[3])
    train = LAYOUTS[train_layout](stored_as(zipf_batch(25, 11, vocab=40, seed=14), stored))
    expected = influence_scores(test, train, join="gather")
    rare_pairs = int(products._Join(test, train, "auto", dense=True).gather.pairs.sum())
    calls = counting_sampled_products(monkeypatch)
    torch.testing.assert_close(influence_scores(test, train), expected, rtol=1e-12, atol=1e-12)
    assert calls == [rare_pairs]
    monkeypatch.setattr(products, "_SAMPLED_PAIRS", 3)  # several slices, and test rows of more pairs alone
    calls.clear()
    torch.testing.assert_close(influence_scores(test, train), expected, rtol=1e-12, atol=1e-12)
    assert len(calls) > 1 and max(calls) > 3 and sum(calls) == rare_pairs
    keys, scores = sorted_terms(shared_token_terms(test, train))
    expected_keys, expected_terms = sorted_terms(shared_token_terms(test, train, join="gather"))
    assert torch.equal(keys, expected_keys)
    torch.testing.assert_close(scores, expected_terms, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_test_rows_the_sampled_product_cannot_take_are_gathered(small_thresholds, monkeypatch, dtype):
    test = zipf_batch(5, 9, vocab=30, seed=15, dtype=dtype)
    train = zipf_batch(20, 9, vocab=30, seed=16, dtype=dtype)
    calls = counting_sampled_products(monkeypatch)
    auto, gather = influence_scores(test, train), influence_scores(test, train, join="gather")
    assert not calls and auto.dtype == dtype
    torch.testing.assert_close(auto.float(), gather.float(), rtol=2e-2, atol=2e-2)


@TRAIN_SIDE
@pytest.mark.parametrize("batch", [1, 5 * D + 30, 1 << 20])
def test_per_token_gemms_in_batches_equal_the_gather_join(small_thresholds, monkeypatch, batch, train_layout):
    """One token per batch, a few, or all: the same scores and word-level terms."""
    monkeypatch.setattr(products, "_GEMM_BATCH", batch)
    test = zipf_batch(6, 9, vocab=40, seed=17, empty=[1])
    train = LAYOUTS[train_layout](zipf_batch(25, 11, vocab=40, seed=18))
    batches = list(products._Join(test, train, "auto", dense=False).token_products())
    assert (len(batches) > 1) == (batch < 1 << 20) and all(tokens is None for _, _, tokens in batches)
    torch.testing.assert_close(
        influence_scores(test, train), influence_scores(test, train, join="gather"), rtol=1e-12, atol=1e-12
    )
    keys, scores = sorted_terms(shared_token_terms(test, train))
    expected_keys, expected = sorted_terms(shared_token_terms(test, train, join="gather"))
    assert torch.equal(keys, expected_keys)
    torch.testing.assert_close(scores, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("lacking", [None, 2])
def test_a_dense_tokens_matrix_holds_each_examples_row_of_it(lacking, layout):
    """Every example holding the token (its rows as they are: in place, token-major) or not (zeros where not)."""
    ids = torch.tensor([[0, 1, 5, 7], [0, 1, 6, 6], [0, 1, 2, 9], [0, 1, 3, 5]])
    keep = torch.ones_like(ids, dtype=torch.bool)
    if lacking is not None:
        keep[lacking, 1] = False
    example_major = TokenGradients.from_positions(ids, torch.randn(4, 4, D, dtype=torch.float64), keep)
    rows = LAYOUTS[layout](example_major)
    postings = rows.postings()
    dense = example_major.to_dense(10)
    for token in (1, 0):
        first, count = (int(x) for x in postings.lookup(torch.tensor([token])))
        matrix = products._spread(rows, postings, first, count, torch.float64)
        assert torch.equal(matrix, dense[:, token])
        in_place = layout == "token-major" and count == 4
        assert (matrix.data_ptr() == rows.grads[first].data_ptr()) == in_place


def hand_built(ids_per_example, seed, dtype=torch.float64):
    """Rows as a user may build them: ids repeated, out of order, negative or huge, as given."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor([len(ids) for ids in ids_per_example])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)])
    ids = torch.tensor([i for example in ids_per_example for i in example], dtype=torch.long)
    return TokenGradients(offsets, ids, torch.randn(ids.numel(), D, generator=g, dtype=torch.float64).to(dtype))


def summed_oracle(a, b):
    """Per (i, j): the dot product, over the ids both hold, of each one's rows of that id summed."""
    def per_token(rows, i):
        sums = {}
        for row in range(int(rows.offsets[i]), int(rows.offsets[i + 1])):
            token = int(rows.token_ids[row])
            sums[token] = sums.get(token, 0) + rows.grads[row]
        return sums
    out = torch.zeros(a.num_examples, b.num_examples, dtype=torch.float64)
    for i in range(a.num_examples):
        for j in range(b.num_examples):
            mine, theirs = per_token(a, i), per_token(b, j)
            out[i, j] = sum(float(mine[w] @ theirs[w]) for w in mine.keys() & theirs.keys())
    return out


BIG = 2 ** 61  # example x (largest id + 1) overflows int64 with a few examples
HAND_BUILT = {
    "repeated": ([[3, 3], [1, 4, 1], [], [2]], [[3], [1, 1, 4], [3, 3, 2], [2, 2]]),
    "unsorted": ([[5, 1], [7, 2, 4], [1]], [[1, 5], [4, 2, 7], [9, 1]]),
    "negative": ([[0], [-1], [-3, 2]], [[3], [0], [2, -3]]),
    "huge": ([[BIG]] * 8 + [[0]], [[8], [BIG, 1]] + [[BIG]] * 6 + [[1]]),
}


@pytest.mark.parametrize("case", sorted(HAND_BUILT))
def test_diagonal_products_and_squared_norms_of_hand_built_rows_equal_the_join(case):
    """Ids repeated within an example (summed, as every join counts them), out of order, negative or beyond
    any key's stride: the diagonal and squared norms are the join's (which are the oracle's)."""
    ids_a, ids_b = HAND_BUILT[case]
    a, b = hand_built(ids_a, seed=0), hand_built(ids_b, seed=1)
    expected = summed_oracle(a, b)
    for layout_a, layout_b in [(x, y) for x in LAYOUTS.values() for y in LAYOUTS.values()]:
        for join in ("gather", "auto"):
            torch.testing.assert_close(influence_scores(layout_a(a), layout_b(b), join), expected, rtol=1e-12,
                                       atol=1e-12)
    torch.testing.assert_close(products.diagonal_products(a, b), expected.diagonal(), rtol=1e-12, atol=1e-12)
    for rows in (a, b):
        own = summed_oracle(rows, rows).diagonal()
        torch.testing.assert_close(products.diagonal_products(rows, rows), own, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rows.squared_norms(), own, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rows.canonical().squared_norms(), own, rtol=1e-12, atol=1e-12)


def test_canonical_rows_are_kept_and_others_summed_in_ascending_order():
    rows = zipf_batch(4, 6, vocab=9, seed=11, empty=[0, 3])  # from_positions: already canonical
    assert rows.canonical() is rows
    messy = hand_built([[4, -2, 4], [], [7, 1]], seed=2)
    canonical = messy.canonical()
    assert canonical.offsets.tolist() == [0, 2, 2, 4] and canonical.token_ids.tolist() == [-2, 4, 1, 7]
    assert torch.equal(canonical.grads, torch.stack([messy.grads[1], messy.grads[0] + messy.grads[2],
                                                     messy.grads[4], messy.grads[3]]))
    assert canonical.canonical() is canonical


@TRAIN_SIDE
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_non_finite_dense_row_reaches_only_the_pairs_that_share_its_token(value, train_layout):
    """0 x inf is NaN: the dense GEMM's zeros of an absent token must not meet a non-finite row."""
    test = TokenGradients(torch.tensor([0, 2]), torch.tensor([0, 1]), torch.ones(2, D, dtype=torch.float64))
    test.grads[0, 0] = value
    train = LAYOUTS[train_layout](TokenGradients(torch.tensor([0, 1, 2, 4]), torch.tensor([0, 1, 0, 1]),
                                                 torch.ones(4, D, dtype=torch.float64)))
    assert ways(test, train)[0] == 2  # both tokens in the dense GEMM
    gather = influence_scores(test, train, join="gather")
    assert gather[0, 1] == D and not gather[0, [0, 2]].isfinite().any()  # train example 1 lacks token 0
    assert torch.equal(influence_scores(test, train).isnan(), gather.isnan())
    torch.testing.assert_close(influence_scores(test, train), gather, equal_nan=True)


def test_rows_that_require_grad_are_joined_by_the_differentiable_gather(small_thresholds):
    test = zipf_batch(6, 9, vocab=40, seed=0)
    train = zipf_batch(25, 11, vocab=40, seed=1)
    assert ways(test, train)[1] > 0  # per-token GEMMs, which write in place, would have been used
    grads = {}
    for join in ("auto", "gather"):
        leaf = test.grads.clone().requires_grad_()
        influence_scores(TokenGradients(test.offsets, test.token_ids, leaf), train, join).sum().backward()
        grads[join] = leaf.grad
    torch.testing.assert_close(grads["auto"], grads["gather"], rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # no gradient wanted: the GEMMs again
        leaf = test.grads.clone().requires_grad_()
        torch.testing.assert_close(influence_scores(TokenGradients(test.offsets, test.token_ids, leaf), train),
                                   influence_scores(test, train), rtol=1e-12, atol=1e-12)
