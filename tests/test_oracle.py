"""TracInWE (exact) equals Captum's dense TracInCP on the word-embedding layer."""

import os

import pytest
import torch
from captum.influence import TracInCP
from conftest import assert_close, LEARNING_RATES, stable_top
from torch import nn
from torch.utils.data import DataLoader

from captum_tracin_we import load_checkpoint, TracInWE


def tracin_we(setup, reduction="none", **kwargs):
    kwargs.setdefault("batch_size", 5)
    return TracInWE(
        setup.model,
        kwargs.pop("train", setup.train),
        kwargs.pop("checkpoints", setup.checkpoints),
        loss_fn=nn.CrossEntropyLoss(reduction=reduction),
        **kwargs,
    )


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_influence_equals_dense_tracincp(setup, oracle, reduction):
    scores = tracin_we(setup, reduction).influence(setup.test_batch())
    assert scores.shape == (len(setup.test), len(setup.train))
    assert_close(scores, oracle["influence"])


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_self_influence_equals_dense_tracincp(setup, oracle, reduction):
    tracin = tracin_we(setup, reduction)
    assert_close(tracin.self_influence(), oracle["self_influence"])
    assert_close(tracin.self_influence(setup.test_batch()), oracle["test_self_influence"])


@pytest.mark.parametrize("proponents", [True, False])
def test_k_most_influential_equals_dense_tracincp(setup, oracle, proponents):
    result = tracin_we(setup).influence(setup.test_batch(), k=4, proponents=proponents)
    indices, values = stable_top(oracle["influence"], 4, proponents)  # ties (zeros) by index
    assert torch.equal(result.indices, indices)
    assert_close(result.influence_scores, values)


def test_dataloaders_equal_dense_tracincp(setup, oracle):
    tracin = tracin_we(setup, train=DataLoader(setup.train, batch_size=4), batch_size=None)
    test_loader = DataLoader(setup.test, batch_size=3)
    assert_close(tracin.influence(test_loader), oracle["influence"])
    assert_close(tracin.self_influence(test_loader), oracle["test_self_influence"])


def test_checkpoint_directory_and_iterator(setup, oracle):
    directory = os.path.dirname(setup.checkpoints[0])
    by_directory = tracin_we(setup, checkpoints=directory)
    assert by_directory.checkpoints == sorted(setup.checkpoints)
    assert_close(by_directory.influence(setup.test_batch()), oracle["influence"])
    by_iterator = tracin_we(setup, checkpoints=iter(setup.checkpoints))
    assert_close(by_iterator.influence(setup.test_batch()), oracle["influence"])


def test_learning_rates_weight_checkpoints(setup):
    """Each checkpoint's term is scaled by the learning rate its loader returns."""
    unit = tracin_we(setup, checkpoints_load_func=lambda m, p: load_checkpoint(m, p) * 0 + 1.0)
    per_checkpoint = [
        tracin_we(setup, checkpoints=[path]).influence(setup.test_batch()) / lr
        for path, lr in zip(setup.checkpoints, LEARNING_RATES)
    ]
    assert_close(unit.influence(setup.test_batch()), sum(per_checkpoint))


def test_aggregate_is_sum_over_test_examples(setup, oracle):
    tracin = tracin_we(setup)
    aggregate = tracin.influence(setup.test_batch(), aggregate=True)
    assert_close(aggregate, oracle["influence"].sum(0, keepdim=True))
    top = tracin.influence(setup.test_batch(), k=3, aggregate=True)
    assert torch.equal(top.indices, stable_top(oracle["influence"].sum(0, keepdim=True), 3)[0])


def test_no_loss_and_custom_test_loss_equal_dense_tracincp(tmp_path):
    from conftest import make_setup

    setup = make_setup("boe", tmp_path)

    def class_logit(out, labels):  # no `reduction`: a per-example loss
        return out.gather(1, labels.unsqueeze(1)).squeeze(1)

    for loss_fn, test_loss_fn in [(None, None), (nn.CrossEntropyLoss(reduction="none"), class_logit)]:
        kwargs = dict(loss_fn=loss_fn, test_loss_fn=test_loss_fn, batch_size=5)
        dense = TracInCP(
            setup.model, setup.train, setup.checkpoints, load_checkpoint,
            layers=[setup.layer], **kwargs,
        )
        ours = TracInWE(setup.model, setup.train, setup.checkpoints, **kwargs)
        assert_close(ours.influence(setup.test_batch()), dense.influence(setup.test_batch()))
