"""Invariants of TracInWE: self influence, top-k, word-level sums, TracIn-WE-TopK."""

import pytest
import torch
from conftest import assert_close, LEARNING_RATES, make_setup, SEQ_LEN, stable_top
from torch import nn
from torch.utils.data import DataLoader

from captum_tracin_we import load_checkpoint, TracInWE


def tracin_we(setup, **kwargs):
    kwargs.setdefault("loss_fn", nn.CrossEntropyLoss(reduction="sum"))
    return TracInWE(setup.model, setup.train, setup.checkpoints, batch_size=5, **kwargs)


@pytest.mark.parametrize("top_k_tokens", [None, 2])
def test_self_influence_is_diagonal_of_train_on_train(setup, top_k_tokens):
    tracin = tracin_we(setup, top_k_tokens=top_k_tokens)
    on_itself = tracin.influence(setup.train.tensors)
    assert_close(tracin.self_influence(), torch.diagonal(on_itself))


@pytest.mark.parametrize("top_k_tokens", [None, 1])
@pytest.mark.parametrize("proponents", [True, False])
def test_top_k_is_topk_of_full_matrix(setup, top_k_tokens, proponents):
    tracin = tracin_we(setup, top_k_tokens=top_k_tokens)
    full = tracin.influence(setup.test_batch())
    result = tracin.influence(setup.test_batch(), k=5, proponents=proponents)
    assert torch.equal(result.influence_scores, torch.topk(full, 5, dim=1, largest=proponents).values)
    indices, values = stable_top(full, 5, proponents)
    assert torch.equal(result.indices, indices) and torch.equal(result.influence_scores, values)
    # k larger than the training set returns every example, sorted
    everything = tracin.influence(setup.test_batch(), k=100, proponents=proponents)
    assert torch.equal(everything.indices, stable_top(full, 100, proponents)[0])


@pytest.mark.parametrize("normalize", [None, "cosine"])
def test_top_k_streamed_over_small_blocks_equals_the_whole_matrix(setup, tmp_path, monkeypatch, normalize):
    """Blocks of 4 training examples (with and without an index): the running top-k and the whole
    matrix, assembled from the same blocks, are those of one block."""
    import captum_tracin_we._core.token_influence as core

    whole = tracin_we(setup, normalize=normalize)
    full = whole.influence(setup.test_batch())
    expected = stable_top(full, 6, True)
    monkeypatch.setattr(core, "_BLOCK_EXAMPLES", 4)
    blocked = tracin_we(setup, normalize=normalize)
    indexed = tracin_we(setup, normalize=normalize)
    indexed.build_index(str(tmp_path / "index"), chunk_size=4)
    assert indexed.index.num_chunks(0) > 2
    for tracin in (blocked, indexed):
        assert_close(tracin.influence(setup.test_batch()), full, rtol=1e-10)
        result = tracin.influence(setup.test_batch(), k=6)
        assert torch.equal(result.indices, expected[0])
        assert_close(result.influence_scores, expected[1], rtol=1e-10)


def test_top_k_tokens_at_least_sequence_length_is_exact(setup, oracle):
    tracin = tracin_we(setup, top_k_tokens=SEQ_LEN)
    assert_close(tracin.influence(setup.test_batch()), oracle["influence"])
    assert_close(tracin.self_influence(), oracle["self_influence"])


def test_top_k_tokens_one_keeps_the_largest_norm_token(tmp_path):
    """Against per-example dense gradients of the embedding matrix."""
    setup = make_setup("boe", tmp_path)
    model, weight = setup.model, setup.model.embedding.weight
    lr = load_checkpoint(model, setup.checkpoints[1])
    loss = nn.CrossEntropyLoss()

    def largest_row(ids, label):
        (grad,) = torch.autograd.grad(loss(model(ids[None]), label[None]), weight)
        token = int(grad.norm(dim=1).argmax())
        return token, grad[token]

    tests = [largest_row(ids, y) for ids, y in setup.test]
    trains = [largest_row(ids, y) for ids, y in setup.train]
    expected = torch.tensor(
        [[lr * float(g @ h) if w == v else 0.0 for v, h in trains] for w, g in tests],
        dtype=torch.float64,
    )
    tracin = TracInWE(
        model, setup.train, setup.checkpoints[1:2], loss_fn=loss, batch_size=5, top_k_tokens=1
    )
    assert_close(tracin.influence(setup.test_batch()), expected)
    assert (expected == 0).any() and (expected != 0).any()


def test_word_contributions_are_shared_tokens_and_sum_to_scores(setup):
    tracin = tracin_we(setup)
    scores = tracin.influence(setup.test_batch())
    top = tracin.influence(setup.test_batch(), k=3)
    words = tracin.word_influence(setup.test_batch(), top.indices)
    excluded = set(tracin.excluded_token_ids.tolist())
    assert len(words) == len(setup.test)
    for i, per_test in enumerate(words):
        assert [w.train_index for w in per_test] == top.indices[i].tolist()
        for word in per_test:
            j = word.train_index
            shared = (set(setup.test[i][0].tolist()) & set(setup.train[j][0].tolist())) - excluded
            assert set(word.token_ids.tolist()) == shared
            assert len(word.token_ids) == len(shared)
            assert_close(word.scores.sum(), scores[i, j], rtol=1e-12)
            magnitudes = word.scores.abs()
            assert torch.all(magnitudes[:-1] >= magnitudes[1:])


def test_word_influence_flat_indices_and_dataloader(setup):
    tracin = tracin_we(setup)
    scores = tracin.influence(setup.test_batch())
    words = tracin.word_influence(DataLoader(setup.test, batch_size=3), [7, 0, 11])
    for i, per_test in enumerate(words):
        assert [w.train_index for w in per_test] == [7, 0, 11]
        for word in per_test:
            assert_close(word.scores.sum(), scores[i, word.train_index], rtol=1e-12)


def test_excluded_token_ids_drop_their_terms(setup):
    tracin = tracin_we(setup)
    excluding = tracin_we(setup, exclude_token_ids=[5, 7])
    words = tracin.word_influence(setup.test_batch(), list(range(len(setup.train))))
    expected = torch.tensor(
        [[float(w.scores[~torch.isin(w.token_ids, torch.tensor([5, 7]))].sum()) for w in row] for row in words],
        dtype=torch.float64,
    )
    assert_close(excluding.influence(setup.test_batch()), expected, rtol=1e-12)
    assert set(excluding.excluded_token_ids.tolist()) >= {5, 7}


def test_learning_rates_are_read_from_checkpoints(setup):
    rates = [load_checkpoint(setup.model, path) for path in setup.checkpoints]
    assert rates == list(LEARNING_RATES)


def test_progress_bars_do_not_change_results(setup, capfd):
    tracin = tracin_we(setup)
    quiet = tracin.influence(setup.test_batch())
    shown = tracin.influence(setup.test_batch(), show_progress=True)
    assert torch.equal(quiet, shown)
    assert torch.equal(tracin.self_influence(show_progress=True), tracin.self_influence())
    err = capfd.readouterr().err
    assert "Using TracInWE to compute influence" in err
    assert "Using TracInWE to compute self influence" in err


class _Stream(torch.utils.data.IterableDataset):
    """The training set as a stream: no indexing, so word influence scans it."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __iter__(self):
        return iter(self.dataset)


@pytest.mark.filterwarnings("ignore:Unable to determine the number of batches")
def test_word_influence_runs_only_the_requested_examples(setup, capfd):
    tracin = tracin_we(setup)
    words = tracin.word_influence(setup.test_batch(), [11, 0, 7], show_progress=True)
    # one batch of the three examples per checkpoint, not the whole training set
    assert f"{len(setup.checkpoints)}/{len(setup.checkpoints)}" in capfd.readouterr().err
    streamed = TracInWE(
        setup.model, DataLoader(_Stream(setup.train), batch_size=5), setup.checkpoints,
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
    ).word_influence(setup.test_batch(), [11, 0, 7])
    for per_test, per_test_streamed in zip(words, streamed):
        for word, word_streamed in zip(per_test, per_test_streamed):
            assert word.train_index == word_streamed.train_index
            assert torch.equal(word.token_ids, word_streamed.token_ids)
            assert_close(word.scores.sum(), word_streamed.scores.sum(), rtol=1e-12)
            if word.scores.numel():
                assert_close(word.scores, word_streamed.scores, rtol=1e-12)
    with pytest.raises(IndexError, match=r"`train_indices` holds 99, but `train_dataset` has only"):
        tracin.word_influence(setup.test_batch(), [99])


def test_a_running_top_k_refuses_scores_without_a_rank():
    from captum_tracin_we._core.top_k import RunningTopK

    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="RunningTopK: the scores hold NaN or infinite values, which have no rank"):
            RunningTopK(2).add(torch.tensor([[1.0, bad, 0.5]]), 0)
