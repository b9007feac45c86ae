"""The fine-tuning helper saves checkpoints that TracInWE reads, deterministically."""

import torch
from conftest import BagOfEmbeddings, token_data

from captum_tracin_we import load_checkpoint
from captum_tracin_we.data import fine_tune, predict_proba


def train_once(directory, seed=0):
    torch.manual_seed(0)
    model = BagOfEmbeddings().double()
    data = token_data(20, seed=1, with_mask=False)
    paths = fine_tune(model, data, str(directory), epochs=2, learning_rate=0.01,
                      batch_size=6, num_checkpoints=3, seed=seed, show_progress=False)
    return model, data, paths


def test_checkpoints_are_evenly_spaced_with_learning_rates(tmp_path):
    model, data, paths = train_once(tmp_path)
    assert [p.rsplit("-", 1)[1] for p in paths] == ["000003.pt", "000005.pt", "000008.pt"]  # of 8 steps
    assert not model.training
    for path in paths:
        assert load_checkpoint(BagOfEmbeddings().double(), path) == 0.01
    # the last checkpoint is the final model
    final = BagOfEmbeddings().double()
    load_checkpoint(final, paths[-1])
    assert torch.equal(final.linear.weight, model.linear.weight)
    probabilities = predict_proba(model, data)
    assert probabilities.shape == (20, 3)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(20, dtype=torch.float64))


def test_same_seed_same_model(tmp_path):
    a, _, _ = train_once(tmp_path / "a")
    b, _, _ = train_once(tmp_path / "b")
    c, _, _ = train_once(tmp_path / "c", seed=1)
    assert torch.equal(a.embedding.weight, b.embedding.weight)
    assert not torch.equal(a.embedding.weight, c.embedding.weight)
