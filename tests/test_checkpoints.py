"""The default checkpoint loader: safe, device-mapped, learning rate beside the weights."""

import re

import pytest
import torch
from conftest import BagOfEmbeddings
from torch import nn

from captum_tracin_we import load_checkpoint, save_checkpoint


def test_round_trip_with_learning_rate(tmp_path):
    source, target = BagOfEmbeddings(), BagOfEmbeddings()
    save_checkpoint(source, str(tmp_path / "c.pt"), learning_rate=0.25)
    assert load_checkpoint(target, str(tmp_path / "c.pt")) == 0.25
    for a, b in zip(source.state_dict().values(), target.state_dict().values()):
        assert torch.equal(a, b)


def test_plain_state_dict_defaults_to_unit_learning_rate(tmp_path):
    source = BagOfEmbeddings()
    torch.save(source.state_dict(), tmp_path / "plain.pt")
    assert load_checkpoint(BagOfEmbeddings(), str(tmp_path / "plain.pt")) == 1.0
    torch.save({**source.state_dict(), "learning_rate": 3.0}, tmp_path / "captum.pt")
    assert load_checkpoint(BagOfEmbeddings(), str(tmp_path / "captum.pt")) == 3.0


def test_data_parallel_prefix_is_removed(tmp_path):
    source = BagOfEmbeddings()
    prefixed = {f"module.{k}": v for k, v in source.state_dict().items()}
    torch.save(prefixed, tmp_path / "dp.pt")
    target = BagOfEmbeddings()
    load_checkpoint(target, str(tmp_path / "dp.pt"))
    assert torch.equal(target.linear.weight, source.linear.weight)


class NotAStateDict:
    pass


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"object": NotAStateDict()}, tmp_path / "unsafe.pt")
    path = str(tmp_path / "unsafe.pt")
    with pytest.raises(ValueError, match=re.escape(f"Cannot load checkpoint {path!r} with torch.load(weights_only=True)")):
        load_checkpoint(BagOfEmbeddings(), path)


def test_whole_model_file_is_refused(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        load_checkpoint(nn.Linear(1, 1), str(tmp_path / "list.pt"))
