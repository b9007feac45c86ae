"""Normalised scores (normalize="cosine" | "train") on TracInWE, from the data loader and from an index."""

import pytest
import torch
from conftest import assert_close
from torch import nn
from torch.utils.data import ConcatDataset, TensorDataset

from captum_tracin_we import InfluenceWE, TracInWE

CE = nn.CrossEntropyLoss()


def with_copies(setup):
    """The training set followed by an exact copy (same label) of every test example."""
    copies = TensorDataset(*setup.test.tensors)
    return ConcatDataset([setup.train, copies]), len(setup.train)


def tracin(setup, train=None, **kwargs):
    return TracInWE(setup.model, setup.train if train is None else train, setup.checkpoints,
                    embedding_layer=setup.layer, loss_fn=CE, batch_size=5, **kwargs)


@pytest.mark.parametrize("top_k_tokens", [None, 2])
def test_an_exact_duplicate_scores_1_and_ranks_first(setup, top_k_tokens):
    train, first_copy = with_copies(setup)
    cosine = tracin(setup, train, normalize="cosine", top_k_tokens=top_k_tokens)
    scores = cosine.influence(setup.test_batch())
    n_test = len(setup.test)
    copies = scores[torch.arange(n_test), first_copy + torch.arange(n_test)]
    assert_close(copies, torch.ones(n_test, dtype=scores.dtype), rtol=1e-12)
    assert bool((scores.abs() <= 1).all())
    top = cosine.influence(setup.test_batch(), k=1)
    assert top.indices[:, 0].tolist() == list(range(first_copy, first_copy + n_test))


def test_normalised_scores_are_raw_scores_over_the_self_influences(setup):
    raw = tracin(setup).influence(setup.test_batch())
    s_train = tracin(setup).self_influence()
    s_test = tracin(setup).self_influence(setup.test_batch())
    cosine = tracin(setup, normalize="cosine").influence(setup.test_batch())
    assert_close(cosine, raw / torch.sqrt(s_test.unsqueeze(1) * s_train.unsqueeze(0)), rtol=1e-12)
    train = tracin(setup, normalize="train").influence(setup.test_batch())
    assert_close(train, raw / torch.sqrt(s_train.unsqueeze(0)), rtol=1e-12)
    # the same ranking per test example as raw scores divided by the training norms
    assert torch.equal(train.argsort(dim=1), (raw / s_train.sqrt()).argsort(dim=1))
    # self influence is the normaliser itself, never normalised
    assert_close(tracin(setup, normalize="cosine").self_influence(), s_train, rtol=1e-14)


@pytest.mark.parametrize("normalize", ["cosine", "train"])
def test_normalised_word_terms_add_up_to_the_score(setup, normalize):
    method = tracin(setup, normalize=normalize)
    scores = method.influence(setup.test_batch())
    words = method.word_influence(setup.test_batch(), [0, 4, 11])
    for i, row in enumerate(words):
        for entry in row:
            assert abs(float(entry.scores.sum() - scores[i, entry.train_index])) < 1e-12


@pytest.mark.parametrize("normalize", ["cosine", "train"])
def test_the_index_gives_the_same_normalised_scores(setup, normalize, tmp_path):
    direct = tracin(setup, normalize=normalize)
    indexed = tracin(setup, normalize=normalize)
    indexed.build_index(str(tmp_path / "index"))
    assert_close(indexed.influence(setup.test_batch()), direct.influence(setup.test_batch()), rtol=1e-12)
    top, expected = indexed.influence(setup.test_batch(), k=3), direct.influence(setup.test_batch(), k=3)
    assert torch.equal(top.indices, expected.indices)
    words = indexed.word_influence(setup.test_batch(), [1, 2])
    expected_words = direct.word_influence(setup.test_batch(), [1, 2])
    for row, expected_row in zip(words, expected_words):
        for entry, expected_entry in zip(row, expected_row):
            assert torch.equal(entry.token_ids, expected_entry.token_ids)
            assert torch.allclose(entry.scores, expected_entry.scores, rtol=1e-12, atol=1e-15)


def test_a_float16_projected_index_keeps_cosines_within_1(setup, tmp_path):
    train, first_copy = with_copies(setup)
    indexed = tracin(setup, train, normalize="cosine")
    indexed.build_index(str(tmp_path / "index"), dtype=torch.float16, projection_dim=4)
    scores = indexed.influence(setup.test_batch())
    assert bool((scores.abs() <= 1).all())
    n_test = len(setup.test)
    copies = scores[torch.arange(n_test), first_copy + torch.arange(n_test)]
    assert_close(copies, torch.ones(n_test, dtype=scores.dtype), rtol=1e-2)


def test_an_example_without_gradient_scores_0_not_nan(setup):
    ids = setup.train.tensors[0]
    excluded = sorted(set(ids[0].tolist()))  # every token of example 0
    method = tracin(setup, normalize="cosine", exclude_token_ids=excluded)
    scores = method.influence(setup.test_batch())
    assert bool(torch.isfinite(scores).all())
    assert bool((scores[:, 0] == 0).all())


def test_influence_we_cosine_duplicates_score_1(setup):
    train, first_copy = with_copies(setup)
    method = InfluenceWE(setup.model, train, setup.checkpoints, embedding_layer=setup.layer, loss_fn=CE,
                         batch_size=5, normalize="cosine")
    scores = method.influence(setup.test_batch())
    n_test = len(setup.test)
    assert_close(scores[torch.arange(n_test), first_copy + torch.arange(n_test)],
                 torch.ones(n_test, dtype=scores.dtype), rtol=1e-10)
    assert bool((scores.abs() <= 1).all())
    assert method.influence(setup.test_batch(), k=1).indices[:, 0].tolist() == list(
        range(first_copy, first_copy + n_test)
    )
