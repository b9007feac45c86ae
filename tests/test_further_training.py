"""Further training (final-model-only gold scores) on a small logistic regression trained here."""

import functools

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from captum_tracin_we.evaluation import further_train, further_training_correlation, further_training_gold

N, D = 30, 4
CE = nn.CrossEntropyLoss()


@pytest.fixture(scope="module")
def world():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    x[7] = 0.0  # an example with no gradient (a linear model without bias)
    y = torch.randint(0, 2, (N,), generator=g)
    train = TensorDataset(x, y)
    test = (torch.cat([x[3:4], torch.randn(2, D, generator=g, dtype=torch.float64)]), torch.cat([y[3:4], y[:2]]))
    torch.manual_seed(0)
    model = nn.Linear(D, 2, bias=False).double()
    return model, train, test


def run(world):
    model, train, test = world
    return functools.partial(further_train, model, train, test, CE, learning_rate=0.5, batch_size=5)


def test_removing_an_example_changes_the_run_only_through_it(world):
    model, train, test = world
    train_further = run(world)
    full = train_further(torch.ones(N), 40, seed=1)
    assert torch.equal(train_further(torch.ones(N), 40, seed=1), full)  # deterministic
    without_zero_gradient = torch.ones(N)
    without_zero_gradient[7] = 0.0
    assert torch.equal(train_further(without_zero_gradient, 40, seed=1), full)  # an example without gradient: no effect
    assert not torch.equal(train_further(torch.ones(N), 40, seed=2), full)  # another order
    assert model.weight.grad is None  # the final model is left as it is


def test_a_duplicate_of_a_test_example_is_its_proponent(world):
    model, train, test = world
    sample = [3, 7, 11, 20]
    gold = further_training_gold(run(world), N, sample, steps=[20, 60], seed=1, show_progress=False)
    assert gold.shape == (2, 3, len(sample))  # steps x test examples x sampled training examples
    assert bool((gold[:, 0, 0] > 0).all())  # test 0 is training example 3: without it, its loss rises
    assert bool((gold[:, :, 1] == 0).all())  # example 7 has no gradient
    down = further_training_gold(run(world), N, sample, steps=[60], mode="downweight", seed=1, show_progress=False)
    assert 0 < down[0, 0, 0] < gold[1, 0, 0]  # a smaller perturbation, the same sign


def test_first_puts_the_sample_in_the_first_step(world):
    model, train, test = world
    sample = [4, 11, 20, 25]  # with batches of 5, one step visits 5 of the 30 examples
    unvisited = further_training_gold(run(world), N, sample, steps=[1], seed=1, show_progress=False)
    assert bool((unvisited[0] == 0).all(dim=0).any())  # some sampled example is not in the first batch
    train_further = functools.partial(run(world), first=sample)
    gold = further_training_gold(train_further, N, sample, steps=[1, 12], seed=1, show_progress=False)
    assert bool((gold != 0).any(dim=1).all())  # every sampled example moved some test loss, at t = 1 and 12
    # apart from its opening the order is the seeded one: `first` holding the whole seeded order changes nothing
    order = torch.randperm(N, generator=torch.Generator().manual_seed(1)).tolist()
    assert torch.equal(run(world)(torch.ones(N), 8, seed=1), run(world)(torch.ones(N), 8, seed=1, first=order))
    with pytest.raises(ValueError, match=r"`first` must hold distinct training indices from 0 to 29, got \[3, 3\]"):
        run(world)(torch.ones(N), 1, first=[3, 3])


def test_correlation_of_the_gold_scores_themselves_is_1(world):
    sample, steps = [0, 3, 11, 20, 25], [30]
    gold = further_training_gold(run(world), N, sample, steps, seed=1, show_progress=False)
    scores = torch.zeros(3, N, dtype=torch.float64)
    scores[:, sample] = gold[0]
    results = further_training_correlation({"gold": scores, "reversed": -scores}, gold, sample, steps)
    assert results["gold"][30]["mean"] == pytest.approx(1.0)
    assert results["reversed"][30]["mean"] == pytest.approx(-1.0)


def test_bad_arguments(world):
    with pytest.raises(ValueError, match=r"`mode` must be one of \['remove', 'downweight'\]"):
        further_training_gold(run(world), N, [0], [1], mode="drop")
    with pytest.raises(ValueError, match=r"`sample` must hold training indices from 0 to 29"):
        further_training_gold(run(world), N, [30], [1])
    with pytest.raises(ValueError, match=r"`weights` must hold one weight per training example \(30\)"):
        run(world)(torch.ones(3), 1)
