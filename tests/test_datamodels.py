"""The linear datamodeling score (LDS): its invariants on synthetic datamodels, seeded subsets, the cache."""

import json
import math
import re

import pytest
import torch
from conftest import tiny_bert, VOCAB

from captum_tracin_we.evaluation import (
    datamodel_outputs,
    datamodeling_scores,
    draw_subsets,
    identical_class,
    label_margin,
    linear_datamodeling_score,
    randomization_correlation,
    randomized_model,
    spearman,
    top_k_cardinality,
)
from captum_tracin_we.models import TextCNN

N_TRAIN, N_TEST = 40, 12


def linear_world(seed=0):
    """Per-example effects tau (n_test, n_train): a model trained on S outputs sum_{j in S} tau[:, j]."""
    tau = torch.randn(N_TEST, N_TRAIN, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    calls = []

    def retrain(kept, seed):
        calls.append((tuple(kept), seed))
        return tau[:, kept].sum(dim=1)

    return tau, retrain, calls


def test_the_true_linear_datamodel_scores_1_and_random_scores_about_0():
    tau, retrain, _ = linear_world()
    results = datamodeling_scores(retrain, {"true": tau, "random": torch.randn(N_TEST, N_TRAIN)},
                                  num_subsets=64, show_progress=False)
    assert results["true"].mean == pytest.approx(1.0, abs=1e-12)
    assert torch.allclose(results["true"].per_test, torch.ones(N_TEST, dtype=torch.float64))
    assert abs(results["random"].mean) < 0.15
    assert results["random"].ci_low < 0 < results["random"].ci_high


def test_lds_is_invariant_to_a_positive_rescaling_and_flips_with_the_sign():
    tau, retrain, _ = linear_world()
    noisy = tau + 0.8 * torch.randn(N_TEST, N_TRAIN, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    subsets = draw_subsets(N_TRAIN, 32)
    outputs = datamodel_outputs(retrain, subsets, show_progress=False)
    base = linear_datamodeling_score(noisy, subsets, outputs)
    assert 0.3 < base.mean < 1.0
    scaled = linear_datamodeling_score(1e-7 * noisy, subsets, outputs)
    assert torch.allclose(scaled.per_test, base.per_test, atol=1e-12)
    assert linear_datamodeling_score(-noisy, subsets, outputs).mean == pytest.approx(-base.mean, abs=1e-12)


def test_subsets_are_seeded_and_the_same_for_every_method():
    a, b = draw_subsets(N_TRAIN, 8, 0.5, seed=3), draw_subsets(N_TRAIN, 8, 0.5, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, draw_subsets(N_TRAIN, 8, 0.5, seed=4))
    assert a.sum(dim=1).tolist() == [N_TRAIN // 2] * 8
    _, retrain, calls = linear_world()
    datamodeling_scores(retrain, {"x": torch.randn(N_TEST, N_TRAIN), "y": torch.randn(N_TEST, N_TRAIN)},
                        num_subsets=8, seed=3, show_progress=False)
    assert [set(kept) for kept, _ in calls] == [set(row.nonzero().flatten().tolist()) for row in a]  # once each


def test_cached_retrainings_are_reused(tmp_path):
    tau, retrain, calls = linear_world()
    first = datamodeling_scores(retrain, {"true": tau}, num_subsets=10, cache_dir=str(tmp_path), show_progress=False)
    assert len(calls) == 10
    again = datamodeling_scores(retrain, {"true": tau, "one more": torch.randn(N_TEST, N_TRAIN)}, num_subsets=10,
                                cache_dir=str(tmp_path), show_progress=False)
    assert len(calls) == 10  # nothing retrained
    assert torch.equal(again["true"].per_test, first["true"].per_test)
    datamodeling_scores(retrain, {"true": tau}, num_subsets=10, seed=1, cache_dir=str(tmp_path), show_progress=False)
    assert len(calls) == 20  # other subsets (and seed): retrained
    # other settings (another model, data or training) never read these retrainings: a folder of their own
    settings = {"model": "other", "epochs": 2}
    datamodeling_scores(retrain, {"true": tau}, num_subsets=10, cache_dir=str(tmp_path), show_progress=False,
                        cache_settings=settings)
    assert len(calls) == 30
    datamodeling_scores(retrain, {"true": tau}, num_subsets=10, cache_dir=str(tmp_path), show_progress=False,
                        cache_settings={"epochs": 2, "model": "other"})  # the same settings, in another order
    assert len(calls) == 30
    folders = sorted(p for p in tmp_path.iterdir())
    assert len(folders) == 2 and sorted(len(list(f.glob("*.npy"))) for f in folders) == [10, 20]
    assert {json.loads((f / "settings.json").read_text()).get("model") for f in folders} == {None, "other"}
    with pytest.raises(ValueError, match=re.escape("`cache_settings` must be JSON-able (str, numbers, bools, None, "
                                                   "lists and dicts of them): Object of type Tensor")):
        datamodeling_scores(retrain, {"true": tau}, num_subsets=10, cache_dir=str(tmp_path), show_progress=False,
                            cache_settings={"lr": torch.tensor(1.0)})


def test_the_default_output_is_each_test_examples_label_margin(tmp_path):
    """With `test_labels` the callback returns logits and the LDS is taken on each label's margin."""
    tau, outputs_of, _ = linear_world()
    labels = torch.randint(0, 3, (N_TEST,), generator=torch.Generator().manual_seed(5))

    def logits_of(kept, seed):  # the label's logit is the linear output, the other two 0: margin = output - log 2
        logits = torch.zeros(N_TEST, 3, dtype=torch.float64)
        logits[torch.arange(N_TEST), labels] = outputs_of(kept, seed)
        return logits

    subsets = draw_subsets(N_TRAIN, 6, seed=2)
    margins = datamodel_outputs(logits_of, subsets, seed=2, show_progress=False, test_labels=labels)
    expected = torch.stack([label_margin(logits_of(row.nonzero().flatten().tolist(), 2), labels) for row in subsets])
    assert torch.equal(margins, expected)
    assert torch.allclose(margins, datamodel_outputs(outputs_of, subsets, seed=2, show_progress=False) - math.log(2))
    scores = datamodeling_scores(logits_of, {"true": tau}, num_subsets=10, show_progress=False, test_labels=labels)
    assert scores["true"].mean == pytest.approx(1.0)
    # margins and the callback's own outputs are cached apart, and so are the margins of other labels
    for kwargs in ({}, {"test_labels": labels}, {"test_labels": (labels + 1) % 3}):
        datamodel_outputs(outputs_of if not kwargs else logits_of, subsets, cache_dir=str(tmp_path),
                          show_progress=False, **kwargs)
    assert len(list(tmp_path.iterdir())) == 3
    with pytest.raises(ValueError, match=re.escape("With `test_labels`, `retrain_and_output` must return the "
                                                   "(n_test, n_classes) logits of the 12 test examples (n_classes >= 2)"
                                                   "; got shape (12,).")):
        datamodel_outputs(outputs_of, subsets, show_progress=False, test_labels=labels)
    with pytest.raises(ValueError, match=re.escape("`test_labels` must lie in [0, 3) for these logits")):
        datamodel_outputs(logits_of, subsets, show_progress=False, test_labels=labels + 3)


@pytest.mark.parametrize("make", [lambda: TextCNN(VOCAB, 2, embedding_dim=8, seed=0), tiny_bert])
def test_a_randomized_text_model_has_other_weights_everywhere(make):
    """The package's CNN and a Hugging Face BERT, trained (here: every weight moved off its initial value,
    as LayerNorm's 1 and 0 would otherwise be re-initialised to themselves)."""
    model = make()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    randomized = randomized_model(model, seed=1)
    for (name, before), after in zip(model.named_parameters(), randomized.parameters()):
        assert not torch.equal(before, after), name


def test_spearman_ranks_ties_and_constants():
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 35.0])) == pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    # ties take their average rank: ranks (1.5, 1.5, 3) against (1, 2, 3)
    assert spearman(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(0.8660254, rel=1e-6)
    assert math.isnan(spearman(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.0, 2.0, 3.0])))  # undefined


def test_label_margin_is_the_log_odds_of_the_label():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    p = logits.double().softmax(1)
    labels = torch.tensor([0, 2])
    expected = torch.log(p[[0, 1], labels]) - torch.log(1 - p[[0, 1], labels])
    assert torch.allclose(label_margin(logits, labels), expected)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"`fraction` 0.01 of 40 training examples keeps 0"):
        draw_subsets(N_TRAIN, 4, 0.01)
    with pytest.raises(ValueError, match=r"Shapes do not fit: `scores` \(12, 40\)"):
        linear_datamodeling_score(torch.zeros(N_TEST, N_TRAIN), draw_subsets(N_TRAIN, 4), torch.zeros(4, 3))
    _, retrain, _ = linear_world()
    with pytest.raises(ValueError, match=r"returned 12 outputs per model, but the scores have 5 test examples"):
        datamodeling_scores(retrain, {"x": torch.zeros(5, N_TRAIN)}, num_subsets=2, show_progress=False)


def test_identical_class_and_top_k_cardinality():
    train_labels, test_labels = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 1])
    scores = torch.tensor([[5.0, 1.0, 0.0, 0.0], [0.0, 1.0, 9.0, 0.0], [0.0, 2.0, 0.0, 1.0]])
    assert identical_class(scores, train_labels, test_labels) == pytest.approx(2 / 3)  # tops 0, 2, 1
    assert top_k_cardinality(scores, k=1) == 1.0  # three distinct tops
    same = torch.tensor([[9.0, 1.0, 0.0, 0.0]] * 3)
    assert top_k_cardinality(same, k=2) == pytest.approx(2 / 6)  # the same two examples for everyone
    with pytest.raises(ValueError, match=r"`scores` is \(3, 4\) \(n_test, n_train\), but there are 2 test"):
        identical_class(scores, train_labels, test_labels[:2])


def test_randomization_correlation_and_a_really_randomized_model():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 3), torch.nn.Linear(3, 2))
    randomized = randomized_model(model, seed=1)
    for (name, before), after in zip(model.state_dict().items(), randomized.state_dict().values()):
        assert not torch.equal(before, after), name  # every weight re-initialised
    assert torch.equal(randomized_model(model, seed=1)[1].weight, randomized[1].weight)  # seeded
    scores = torch.randn(5, 30, generator=torch.Generator().manual_seed(0))
    assert randomization_correlation(scores, 3 * scores + 1) == pytest.approx(1.0)
    assert randomization_correlation(scores, -scores) == pytest.approx(-1.0)
