"""Tests of captum_tracin_we.compare: side-by-side TracIn method comparison."""

import warnings

import pytest
import torch
from conftest import assert_close, make_setup, N_TEST, N_TRAIN, stable_top
from torch import nn

from captum_tracin_we import InfluenceWE, KMostInfluentialResults, load_checkpoint, TracInWE
from captum_tracin_we.compare import (
    ALL_METHODS,
    compare_influence_methods,
    Comparison,
    DEFAULT_METHODS,
    INFLUENCE_WE_EKFAC,
    MethodResult,
    TRACIN_WE,
    TRACIN_WE_COSINE,
    TRACIN_WE_TOPK,
    TRACINCP_EMBEDDINGS,
    TRACINCP_FAST,
    TRACINCP_FAST_RAND_PROJ,
    TRACINCP_LAST_LAYER,
)
from captum_tracin_we.evaluation import cancellation_ratio

FINAL_LAYER = {"bert": "model.classifier", "boe": "linear"}
K = 4


def _compare(setup, **kwargs) -> Comparison:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Captum's int64-input and memory warnings
        return compare_influence_methods(
            setup.model,
            setup.train,
            setup.checkpoints,
            setup.test_batch(),
            nn.CrossEntropyLoss(),
            FINAL_LAYER[setup.name],
            **{"methods": ALL_METHODS, "k": K, "top_k_tokens": 2, "batch_size": 5, **kwargs},
        )


@pytest.fixture(scope="module", params=["bert", "boe"])
def setup(request, tmp_path_factory):
    return make_setup(request.param, tmp_path_factory.mktemp(f"compare-{request.param}"))


@pytest.fixture(scope="module")
def comparison(setup) -> Comparison:
    return _compare(setup)


def _per_example_last_layer_grads(setup, batch):
    """(weight, bias) gradients of each example's own loss, by plain autograd."""
    layer = setup.model.get_submodule(FINAL_LAYER[setup.name])
    loss_fn = nn.CrossEntropyLoss()
    weights, biases = [], []
    for i in range(batch[-1].shape[0]):
        inputs = [t[i : i + 1] for t in batch[:-1]]
        loss = loss_fn(setup.model(*inputs), batch[-1][i : i + 1])
        g_w, g_b = torch.autograd.grad(loss, [layer.weight, layer.bias])
        weights.append(g_w.flatten())
        biases.append(g_b.flatten())
    return torch.stack(weights), torch.stack(biases)


def _dense_last_layer(setup):
    """Per-example TracIn of the last layer: weight part and bias part."""
    weight_part = bias_part = 0.0
    for checkpoint in setup.checkpoints:
        lr = load_checkpoint(setup.model, checkpoint)
        test_w, test_b = _per_example_last_layer_grads(setup, setup.test_batch())
        train_w, train_b = _per_example_last_layer_grads(setup, setup.train.tensors)
        weight_part = weight_part + lr * test_w @ train_w.T
        bias_part = bias_part + lr * test_b @ train_b.T
    return weight_part, bias_part


def test_results_hold_every_method_in_order(comparison):
    assert comparison.methods == list(ALL_METHODS)
    for name, result in comparison.results.items():
        assert isinstance(result, MethodResult) and result.name == name
        assert result.scores.shape == (N_TEST, N_TRAIN)
        assert result.scores.dtype == torch.float64
        assert result.proponents.indices.shape == (N_TEST, K)
        assert result.opponents.indices.shape == (N_TEST, K)
        assert result.seconds > 0


def test_top_k_is_the_stable_top_k_of_own_scores(comparison):
    for result in comparison.results.values():
        top, bottom = stable_top(result.scores, K), stable_top(result.scores, K, proponents=False)
        assert torch.equal(result.proponents.indices, top[0])
        assert torch.equal(result.proponents.influence_scores, top[1])
        assert torch.equal(result.proponents.influence_scores, torch.topk(result.scores, K, dim=1).values)
        assert torch.equal(result.opponents.indices, bottom[0])
        assert torch.equal(result.opponents.influence_scores, bottom[1])
        # and they really are the extreme scores of each row
        assert torch.equal(result.proponents.influence_scores[:, 0], result.scores.max(1).values)
        assert torch.equal(result.opponents.influence_scores[:, 0], result.scores.min(1).values)


def test_tracin_we_equals_dense_tracincp_on_embeddings(comparison):
    exact = comparison.results[TRACIN_WE].scores
    assert exact.abs().max() > 0
    assert_close(exact, comparison.results[TRACINCP_EMBEDDINGS].scores, rtol=1e-10)


def test_cosine_and_influence_we_entries_are_those_methods(setup, comparison):
    kwargs = {"embedding_layer": None, "loss_fn": nn.CrossEntropyLoss(), "batch_size": 5}
    cosine = TracInWE(setup.model, setup.train, setup.checkpoints, normalize="cosine", **kwargs)
    assert_close(comparison.results[TRACIN_WE_COSINE].scores, cosine.influence(setup.test_batch()), rtol=1e-12)
    assert bool((comparison.results[TRACIN_WE_COSINE].scores.abs() <= 1).all())
    ekfac = InfluenceWE(setup.model, setup.train, setup.checkpoints, **kwargs)
    assert_close(comparison.results[INFLUENCE_WE_EKFAC].scores, ekfac.influence(setup.test_batch()), rtol=1e-12)


def test_top_k_tokens_changes_tracin_we(comparison):
    exact = comparison.results[TRACIN_WE].scores
    top_k = comparison.results[TRACIN_WE_TOPK].scores
    assert not torch.allclose(exact, top_k)


def test_last_layer_methods_match_per_example_dense_gradients(setup, comparison):
    """TracInCP (last layer) = weight + bias terms; TracInCPFast = weight term only."""
    weight_part, bias_part = _dense_last_layer(setup)
    last_layer = comparison.results[TRACINCP_LAST_LAYER].scores
    fast = comparison.results[TRACINCP_FAST].scores
    assert_close(last_layer, weight_part + bias_part, rtol=1e-10)
    assert_close(fast, weight_part, rtol=1e-10)
    assert_close(last_layer - fast, bias_part, rtol=1e-9)
    # the bias term is not negligible: the two methods really differ
    assert bias_part.abs().max() > 1e-3 * weight_part.abs().max()


def test_fast_rand_proj_without_projection_equals_fast(comparison):
    assert_close(
        comparison.results[TRACINCP_FAST_RAND_PROJ].scores,
        comparison.results[TRACINCP_FAST].scores,
        rtol=1e-10,
    )


def test_fast_rand_proj_with_projection_is_approximate(setup, comparison):
    projected = _compare(setup, methods=[TRACINCP_FAST_RAND_PROJ], projection_dim=1)
    scores = projected.results[TRACINCP_FAST_RAND_PROJ].scores
    assert scores.shape == (N_TEST, N_TRAIN)
    assert not torch.allclose(scores, comparison.results[TRACINCP_FAST].scores)


def test_overlap(comparison):
    for proponents in (True, False):
        overlap = comparison.overlap(proponents)
        assert set(overlap) == {(a, b) for a in ALL_METHODS for b in ALL_METHODS}
        for (a, b), value in overlap.items():
            assert 0.0 <= value <= 1.0
            assert value == overlap[b, a]
        for name in ALL_METHODS:
            assert overlap[name, name] == 1.0
        # equal score matrices rank the same examples (ties aside, none here)
        assert overlap[TRACINCP_FAST, TRACINCP_FAST_RAND_PROJ] == 1.0


def test_overlap_is_mean_fraction_of_shared_indices():
    def result(name, indices):
        top = torch.tensor(indices)
        kmi = KMostInfluentialResults(top, top.double())
        return MethodResult(name, torch.zeros(len(indices), 5), kmi, kmi, 1.0)

    c = Comparison({"a": result("a", [[0, 1], [2, 3]]), "b": result("b", [[1, 0], [4, 2]])})
    assert c.overlap()["a", "b"] == pytest.approx((2 / 2 + 1 / 2) / 2)
    assert c.overlap(proponents=False)["b", "a"] == pytest.approx(0.75)


def test_cancellation_ratio_of_method_scores_is_at_least_one(comparison):
    for result in comparison.results.values():
        assert (cancellation_ratio(result.scores) >= 1).all()


def test_table_lists_methods_texts_times_and_overlaps(setup, comparison):
    texts = [f"train sentence {i} with a | pipe " + "x" * 100 for i in range(N_TRAIN)]
    table = comparison.table(texts, test_index=1)
    for name in ALL_METHODS:
        assert f"### {name} (" in table
    result = comparison.results[TRACIN_WE]
    top_index = result.proponents.indices[1, 0].item()
    assert f"| 1 | proponent | {top_index} |" in table
    assert f"train sentence {top_index} with a \\| pipe" in table
    assert "x" * 90 not in table  # texts are truncated
    assert "Proponent overlap" in table and "Opponent overlap" in table
    assert "cancellation ratio" in table
    ratio = cancellation_ratio(result.scores)[1].item()
    assert f"| {TRACIN_WE} | {result.seconds:.3f} | {ratio:.3g} |" in table
    plain = comparison.table()
    assert "| text |" not in plain and TRACINCP_FAST in plain
    with pytest.raises(IndexError, match="test_index"):
        comparison.table(test_index=N_TEST)


def test_figure_writes_png(comparison, tmp_path):
    texts = [f"training sentence number {i} " * 6 for i in range(N_TRAIN)]
    path = tmp_path / "comparison.png"
    figure = comparison.figure(texts, test_index=0, test_text="a test sentence", path=str(path))
    data = path.read_bytes()
    assert len(data) > 1000
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(figure.axes) == len(ALL_METHODS)
    assert [ax.get_title().split("\n")[0] for ax in figure.axes] == list(ALL_METHODS)
    assert "a test sentence" in figure._suptitle.get_text()
    first = comparison.results[ALL_METHODS[0]].proponents.indices[0, 0].item()
    drawn = [t.get_text() for t in figure.axes[0].texts]
    assert any(t.startswith(f"1. #{first} ") for t in drawn)


def test_default_methods(setup):
    assert DEFAULT_METHODS == (TRACIN_WE, TRACIN_WE_COSINE, TRACIN_WE_TOPK, INFLUENCE_WE_EKFAC,
                               TRACINCP_LAST_LAYER, TRACINCP_FAST)
    result = _compare(setup, methods=DEFAULT_METHODS, k=100)
    assert result.methods == list(DEFAULT_METHODS)
    # k is capped at the number of training examples
    assert result.results[TRACIN_WE].proponents.indices.shape == (N_TEST, N_TRAIN)


def test_unknown_method_raises(setup):
    with pytest.raises(ValueError, match=r"Unknown influence method.*'TracOut'.*TracInCPFast"):
        _compare(setup, methods=[TRACIN_WE, "TracOut"])


def test_bad_arguments_raise(setup):
    with pytest.raises(ValueError, match="methods` is empty"):
        _compare(setup, methods=[])
    with pytest.raises(ValueError, match="`k`"):
        _compare(setup, methods=[TRACIN_WE], k=0)
    with pytest.raises(ValueError, match="top_k_tokens"):
        _compare(setup, methods=[TRACIN_WE_TOPK], top_k_tokens=None)
    with pytest.raises(ValueError, match="reduction"):
        compare_influence_methods(
            setup.model,
            setup.train,
            setup.checkpoints,
            setup.test_batch(),
            lambda out, y: nn.functional.cross_entropy(out, y),
            FINAL_LAYER[setup.name],
        )


def test_loss_fn_is_not_modified(setup):
    loss_fn = nn.CrossEntropyLoss(reduction="mean")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compare_influence_methods(
            setup.model,
            setup.train,
            setup.checkpoints,
            setup.test_batch(),
            loss_fn,
            FINAL_LAYER[setup.name],
            methods=[TRACINCP_LAST_LAYER, TRACINCP_EMBEDDINGS],
        )
    assert loss_fn.reduction == "mean"


def test_checkpoints_are_read_once_and_scores_do_not_change(setup, comparison):
    reads = []

    def counting_load(model, path):
        reads.append(path)
        return load_checkpoint(model, path)

    methods = [TRACIN_WE, TRACINCP_LAST_LAYER, TRACINCP_FAST]
    cached = _compare(setup, methods=methods, checkpoints_load_func=counting_load)
    assert sorted(reads) == sorted(setup.checkpoints)  # Captum's TracInCP reloads per batch
    reads.clear()
    uncached = _compare(
        setup, methods=methods, checkpoints_load_func=counting_load, cache_checkpoints=False
    )
    assert len(reads) > 2 * len(setup.checkpoints)
    for name in methods:
        assert torch.equal(cached.results[name].scores, uncached.results[name].scores)
        assert_close(cached.results[name].scores, comparison.results[name].scores, rtol=1e-10)


def test_captum_integer_input_warning_is_ignored_and_no_other():
    from captum._utils.gradient import apply_gradient_requirements

    from captum_tracin_we._utils.captum_compat import integer_input_warnings_ignored

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with integer_input_warnings_ignored():
            apply_gradient_requirements((torch.zeros(2, dtype=torch.long), torch.zeros(2)))
        apply_gradient_requirements((torch.zeros(2, dtype=torch.long),))
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert messages[0].startswith("Input Tensor 1 did not already require gradients")
    assert messages[1].startswith("Input Tensor 0 has a dtype of torch.int64")


def test_a_method_is_added_by_one_registration(setup):
    from captum_tracin_we.compare import METHOD_BUILDERS, register_method, token_method

    name = "InfluenceWE (K-FAC), registered by a test"
    register_method(name, lambda run: token_method(run, InfluenceWE, approximation="kfac"))
    try:
        result = _compare(setup, methods=[name], k=2)
        kfac = InfluenceWE(setup.model, setup.train, setup.checkpoints, loss_fn=nn.CrossEntropyLoss(), batch_size=5,
                           approximation="kfac")
        assert_close(result.results[name].scores, kfac.influence(setup.test_batch()), rtol=1e-12)
    finally:
        del METHOD_BUILDERS[name]
    with pytest.raises(ValueError, match=r"Unknown influence method.*add one with `register_method`"):
        _compare(setup, methods=[name])
    with pytest.raises(TypeError, match=r"`builder` must be callable"):
        register_method("x", None)


def test_a_method_with_nan_scores_is_refused_by_name(setup):
    from captum_tracin_we.compare import METHOD_BUILDERS, register_method

    class Broken:
        def influence(self, inputs, k=None, show_progress=False):
            return torch.full((len(setup.test), len(setup.train)), float("nan"))

    register_method("broken", lambda run: Broken())
    try:
        with pytest.raises(ValueError, match=rf"broken gave {len(setup.test) * len(setup.train)} NaN or infinite "
                                             "scores, which cannot be ranked or compared"):
            _compare(setup, methods=["broken"])
    finally:
        del METHOD_BUILDERS["broken"]
