"""The on-disk training-gradient index: same scores, safe format, clear failures."""

import json
import os

import pytest
import torch
from conftest import assert_close, LEARNING_RATES, make_setup
from torch import nn

from captum_tracin_we import TracInWE
from captum_tracin_we._core.gradient_index import (
    CorruptIndexError,
    IndexMismatchError,
    write_index,
)


def tracin_we(setup, checkpoints=None, **kwargs):
    return TracInWE(
        setup.model, setup.train, checkpoints or setup.checkpoints,
        loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=5, **kwargs,
    )


@pytest.mark.parametrize("top_k_tokens", [None, 2])
def test_index_round_trip_gives_the_same_scores(setup, tmp_path, top_k_tokens):
    plain = tracin_we(setup, top_k_tokens=top_k_tokens)
    expected = plain.influence(setup.test_batch())
    top = plain.influence(setup.test_batch(), k=4, proponents=False)

    built = tracin_we(setup, top_k_tokens=top_k_tokens)
    index = built.build_index(str(tmp_path / "index"))
    assert index.num_checkpoints == len(setup.checkpoints)
    assert index.num_examples == len(setup.train)
    assert_close(built.influence(setup.test_batch()), expected, rtol=1e-12)

    loaded = tracin_we(setup, top_k_tokens=top_k_tokens)
    loaded.load_index(str(tmp_path / "index"))
    assert_close(loaded.influence(setup.test_batch()), expected, rtol=1e-12)
    from_index = loaded.influence(setup.test_batch(), k=4, proponents=False)
    assert torch.equal(from_index.indices, top.indices)
    assert_close(from_index.influence_scores, top.influence_scores, rtol=1e-12)
    assert_close(loaded.self_influence(), plain.self_influence(), rtol=1e-12)
    for with_index, without in zip(
        loaded.word_influence(setup.test_batch(), top.indices),
        plain.word_influence(setup.test_batch(), top.indices),
    ):
        for a, b in zip(with_index, without):
            assert a.train_index == b.train_index and torch.equal(a.token_ids, b.token_ids)
            assert_close(a.scores.sum(), b.scores.sum(), rtol=1e-12)
    with pytest.raises(IndexError, match=r"`train_indices` holds 999"):
        loaded.word_influence(setup.test_batch(), [999])


def test_index_format_is_json_and_plain_arrays(setup, tmp_path):
    tracin_we(setup).build_index(str(tmp_path / "index"))
    names = sorted(os.listdir(tmp_path / "index"))
    assert names == sorted(["manifest.json"] + [
        f"c{c}-{a}.npy" for c in range(3) for a in ("grads", "offsets", "token_ids")
    ])
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["learning_rates"] == list(LEARNING_RATES)
    assert manifest["dataset_length"] == len(setup.train)
    assert all(identity.startswith("sha256:") for identity in manifest["checkpoints"])
    assert os.listdir(tmp_path) == ["index"]  # no partial folder left


def test_opening_with_other_checkpoints_options_or_model_is_an_error(setup, tmp_path):
    path = str(tmp_path / "index")
    tracin_we(setup).build_index(path)
    with pytest.raises(IndexMismatchError, match=r"different checkpoints"):
        tracin_we(setup, checkpoints=setup.checkpoints[:2]).load_index(path)
    with pytest.raises(IndexMismatchError, match=r"different top_k_tokens"):
        tracin_we(setup, top_k_tokens=1).load_index(path)
    with pytest.raises(IndexMismatchError, match=r"different exclude_token_ids"):
        tracin_we(setup, exclude_token_ids=[3]).load_index(path)
    (tmp_path / "other").mkdir()
    other = make_setup("cnn" if setup.name != "cnn" else "boe", tmp_path / "other")
    with pytest.raises(IndexMismatchError, match=r"different model_fingerprint"):
        tracin_we(other).load_index(path)


def test_truncated_or_altered_files_are_detected(setup, tmp_path):
    path = tmp_path / "index"
    tracin_we(setup).build_index(str(path))
    grads = path / "c1-grads.npy"
    data = grads.read_bytes()
    grads.write_bytes(data[:-8])
    with pytest.raises(CorruptIndexError, match=r"c1-grads.npy' is missing or has the wrong size"):
        tracin_we(setup).load_index(str(path))
    altered = bytearray(data)
    altered[-3] ^= 0xFF
    grads.write_bytes(bytes(altered))
    with pytest.raises(CorruptIndexError, match=r"c1-grads.npy' has changed since the index"):
        tracin_we(setup).load_index(str(path))
    tracin_we(setup).load_index(str(path), verify=False)  # size checks only
    with pytest.raises(FileNotFoundError, match=r"No index at .*build one with"):
        tracin_we(setup).load_index(str(tmp_path / "missing"))


def test_an_interrupted_build_leaves_the_old_index_and_no_partial_one(setup, tmp_path):
    path = str(tmp_path / "index")
    tracin = tracin_we(setup)
    tracin.build_index(path)
    before = (tmp_path / "index" / "manifest.json").read_text()

    def failing():
        raise KeyboardInterrupt
        yield  # pragma: no cover

    with pytest.raises(KeyboardInterrupt):
        write_index(path, {"format_version": 1}, failing())
    assert os.listdir(tmp_path) == ["index"]
    assert (tmp_path / "index" / "manifest.json").read_text() == before
    with pytest.raises(KeyboardInterrupt):
        write_index(str(tmp_path / "new"), {}, failing())
    assert os.listdir(tmp_path) == ["index"]
    tracin_we(setup).load_index(path)


def test_an_index_does_not_overwrite_other_folders(setup, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"is not a TracInWE index; choose another `path`"):
        tracin_we(setup).build_index(str(tmp_path / "data"))
    assert (tmp_path / "data" / "keep.txt").read_text() == "mine"
    assert os.listdir(tmp_path) == ["data"]
