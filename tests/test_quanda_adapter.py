"""The Quanda adapter against Quanda's documented Explainer interface (without importing Quanda)."""

import inspect

import pytest
import torch
from conftest import assert_close, make_setup
from torch import nn

from captum_tracin_we import InfluenceWE, TracInWE
from captum_tracin_we.evaluation import QuandaExplainer

CE = nn.CrossEntropyLoss()


@pytest.fixture(scope="module")
def boe(tmp_path_factory):
    return make_setup("boe", tmp_path_factory.mktemp("boe"))


def test_the_constructor_takes_quandas_arguments_by_name(boe):
    parameters = list(inspect.signature(QuandaExplainer).parameters)
    assert parameters[:5] == ["model", "train_dataset", "task", "checkpoints", "checkpoints_load_func"]
    explainer = QuandaExplainer(model=boe.model, train_dataset=boe.train, task="text_classification",
                                checkpoints=boe.checkpoints, loss_fn=CE, batch_size=5)
    assert isinstance(explainer.method, TracInWE)
    # Quanda's own default for the loader is None: this package's load_checkpoint
    explicit = QuandaExplainer(boe.model, boe.train, "text_classification", boe.checkpoints, None, loss_fn=CE)
    ids, labels = boe.test.tensors
    assert_close(explicit.explain(ids, labels), explainer.explain(ids, labels), rtol=1e-12)


@pytest.mark.parametrize("method, options", [(TracInWE, {}), (TracInWE, {"normalize": "cosine"}),
                                             (InfluenceWE, {"approximation": "kfac"})])
def test_explain_and_self_influence_are_the_methods(boe, method, options):
    explainer = QuandaExplainer(boe.model, boe.train, "text_classification", boe.checkpoints, method=method,
                                loss_fn=CE, batch_size=5, **options)
    ids, labels = boe.test.tensors
    direct = method(boe.model, boe.train, boe.checkpoints, loss_fn=CE, batch_size=5, **options)
    explanations = explainer.explain(test_data=ids, targets=labels.tolist())  # targets as a list, as Quanda passes
    assert explanations.shape == (len(boe.test), len(boe.train))
    assert_close(explanations, direct.influence((ids, labels)), rtol=1e-12)
    assert_close(explainer.explain(ids, labels), explanations, rtol=1e-14)
    influences = explainer.self_influence(batch_size=4)
    assert influences.shape == (len(boe.train),)
    assert_close(influences, direct.self_influence(), rtol=1e-12)


def test_bad_arguments(boe):
    with pytest.raises(ValueError, match=r"`task` must be one of \['text_classification'\]"):
        QuandaExplainer(boe.model, boe.train, "image_classification", boe.checkpoints, loss_fn=CE)
    with pytest.raises(ValueError, match=r"`checkpoints` is required"):
        QuandaExplainer(boe.model, boe.train, loss_fn=CE)
    with pytest.raises(TypeError, match=r"`method` must be TracInWE, InfluenceWE"):
        QuandaExplainer(boe.model, boe.train, checkpoints=boe.checkpoints, method=torch.nn.Linear)
    explainer = QuandaExplainer(boe.model, boe.train, checkpoints=boe.checkpoints, loss_fn=CE)
    with pytest.raises(ValueError, match=r"`targets` is required"):
        explainer.explain(boe.test.tensors[0])


def test_self_influence_runs_in_quandas_batch_size(boe):
    explainer = QuandaExplainer(boe.model, boe.train, checkpoints=boe.checkpoints, loss_fn=CE, batch_size=5)
    sizes = []
    hook = boe.model.register_forward_hook(lambda module, inputs, output: sizes.append(len(inputs[0])))
    try:
        influences = explainer.self_influence(batch_size=3)
    finally:
        hook.remove()
    assert max(sizes) == 3 and sum(sizes) == len(boe.train) * len(boe.checkpoints)
    assert_close(influences, explainer.method.self_influence(), rtol=1e-12)
    with pytest.raises(ValueError, match=r"`batch_size` must be an int >= 1, got 0\."):
        explainer.self_influence(batch_size=0)
