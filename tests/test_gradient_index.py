"""The on-disk training-gradient index: same scores, safe format, clear failures."""

import fcntl
import json
import os

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset
from conftest import assert_close, LEARNING_RATES, make_setup
from torch import nn

from captum_tracin_we import load_checkpoint, TracInWE
from captum_tracin_we._core.index import writer
from captum_tracin_we._core.index import (
    CorruptIndexError,
    IndexBuildInProgressError,
    IndexMismatchError,
    write_index,
)
from captum_tracin_we._core.index.format import manifest_checksum
from captum_tracin_we._core.token_gradients import TokenPostings


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
    index = tracin_we(setup).build_index(str(tmp_path / "index"))
    for chunk in index.chunks(1):  # the stored inverted view is the chunk's own
        expected = TokenPostings.of(chunk.token_ids)
        for name in ("vocab", "starts", "rows"):
            assert torch.equal(getattr(chunk.inverted, name), getattr(expected, name))
    names = sorted(os.listdir(tmp_path / "index"))
    assert names == sorted(["manifest.json"] + [
        f"c{c}-k0-{a}.npy" for c in range(3) for a in (
            "grads", "offsets", "token_ids", "by_token_vocab", "by_token_starts", "by_token_rows",
            "squared_norms",
        )
    ] + [f"c{c}-probe-{a}.npy" for c in range(3) for a in ("grads", "offsets", "token_ids")])
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["learning_rates"] == list(LEARNING_RATES)
    assert manifest["training_data"]["examples"] == len(setup.train)
    assert all(identity.startswith("sha256:") for identity in manifest["checkpoints"])
    assert sorted(os.listdir(tmp_path)) == [".index.lock", "index"]  # no partial folder left


def test_an_index_of_the_previous_format_is_refused_not_misread(setup, tmp_path):
    """Version 4 stored the rows example by example, in files of the same names, shapes and dtypes: read in
    today's order they would give wrong scores, so only the version tells them apart."""
    path = tmp_path / "index"
    tracin_we(setup).build_index(str(path))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 4
    manifest["manifest_sha256"] = manifest_checksum(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexMismatchError, match=(
        r"has format version 4, this package reads version 5; rebuild it with `build_index`\."
    )):
        tracin_we(setup).load_index(str(path))


def test_chunks_are_stored_grouped_by_token_and_read_back_example_major(setup, tmp_path):
    """The rows lie grouped by token id in the file (each token's a run, as a join reads them); read back
    example-major, the chunk's rows are its examples' (the round trip above: the scores of the build)."""
    index = tracin_we(setup).build_index(str(tmp_path / "index"))
    for c in range(index.num_checkpoints):
        chunk, by_token = index.chunk(c, 0), index.chunk_by_token(c, 0)
        stored = torch.from_numpy(np.load(tmp_path / "index" / f"c{c}-k0-grads.npy"))
        assert torch.equal(stored, chunk.grads[chunk.postings().rows]) and torch.equal(by_token.grads, stored)
        assert not torch.equal(stored, chunk.grads)  # reordered: example-major differs
        assert torch.equal(by_token.by_example().grads, chunk.grads)
        assert torch.equal(index.select(c, [2, 7]).grads, chunk.select([2, 7]).grads)


def test_opening_with_other_checkpoints_options_or_model_is_an_error(setup, tmp_path):
    path = str(tmp_path / "index")
    tracin_we(setup).build_index(path)
    with pytest.raises(IndexMismatchError, match=r"was built with 3 checkpoints, this TracInWE has 2"):
        tracin_we(setup, checkpoints=setup.checkpoints[:2]).load_index(path)
    with pytest.raises(IndexMismatchError, match=r"different checkpoints"):
        tracin_we(setup, checkpoints=setup.checkpoints[:2] + setup.checkpoints[1:2]).load_index(path)
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
    grads = path / "c1-k0-grads.npy"
    data = grads.read_bytes()
    grads.write_bytes(data[:-8])
    with pytest.raises(CorruptIndexError, match=r"c1-k0-grads.npy' is missing or has the wrong size"):
        tracin_we(setup).load_index(str(path))
    altered = bytearray(data)
    altered[-3] ^= 0xFF
    grads.write_bytes(bytes(altered))
    with pytest.raises(CorruptIndexError, match=r"c1-k0-grads.npy' has changed since it was written"):
        tracin_we(setup).load_index(str(path))
    tracin_we(setup).load_index(str(path), verify=False)  # size checks only
    grads.write_bytes(data)
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["files"]["c2-k0-by_token_rows.npy"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptIndexError, match=r"manifest of the index at .* was edited since the index was built"):
        tracin_we(setup).load_index(str(path))
    manifest["manifest_sha256"] = manifest_checksum(manifest)  # edited with care
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptIndexError, match=r"`files` must be exactly the 30 array files of its chunks \(missing: \['c2-k0-by_token_rows.npy'\]"):
        tracin_we(setup).load_index(str(path))
    with pytest.raises(FileNotFoundError, match=r"No index at .*build one with"):
        tracin_we(setup).load_index(str(tmp_path / "missing"))


def test_an_interrupted_build_keeps_the_old_index_and_resumes(setup, tmp_path):
    path = str(tmp_path / "index")
    expected = tracin_we(setup).influence(setup.test_batch())
    old = tracin_we(setup, top_k_tokens=1)
    old.build_index(path)
    before = (tmp_path / "index" / "manifest.json").read_text()

    tracin = tracin_we(setup)
    calls = count_gradient_calls(tracin, interrupt_at=5)
    with pytest.raises(KeyboardInterrupt):
        tracin.build_index(path, chunk_size=5)  # one batch of 5 per chunk
    assert (tmp_path / "index" / "manifest.json").read_text() == before  # old index intact
    assert sorted(os.listdir(tmp_path)) == [".index.lock", ".index.partial", "index"]
    assert not (tmp_path / ".index.partial" / "manifest.json").exists()

    calls.clear()
    batches = -(-len(setup.train) // 5) * len(setup.checkpoints)
    tracin.build_index(path, chunk_size=5)
    assert len(calls) == batches - 4  # the four finished chunks were kept
    assert sorted(os.listdir(tmp_path)) == [".index.lock", "index"]
    reloaded = tracin_we(setup)
    reloaded.load_index(path)
    assert_close(reloaded.influence(setup.test_batch()), expected, rtol=1e-12)

    calls.clear()
    tracin.build_index(path, chunk_size=5, resume=False)
    assert len(calls) == batches
    with pytest.raises(KeyboardInterrupt):
        write_index(str(tmp_path / "new"), {}, lambda progress: _failing())
    assert not (tmp_path / "new").exists()


def count_gradient_calls(tracin, interrupt_at=None):
    """Makes `tracin` record each batch whose token gradients it computes for the
    index's chunks (not for its probes, which are `exact`), and raise
    KeyboardInterrupt at call `interrupt_at`, once; returns the record."""
    compute, calls = tracin._token_gradients, []

    def counted(batch, name, test=False, indices=None, exact=False):
        if exact:
            return compute(batch, name, test, indices, exact)
        calls.append(name)
        if len(calls) == interrupt_at:
            tracin._token_gradients = plain
            raise KeyboardInterrupt
        return compute(batch, name, test, indices)

    def plain(batch, name, test=False, indices=None, exact=False):
        if not exact:
            calls.append(name)
        return compute(batch, name, test, indices, exact)

    tracin._token_gradients = counted if interrupt_at else plain
    return calls


def _failing():
    raise KeyboardInterrupt
    yield  # pragma: no cover


def test_a_second_build_of_the_same_path_is_refused_while_one_runs(setup, tmp_path):
    path = str(tmp_path / "index")
    lock = tmp_path / ".index.lock"
    with open(lock, "a+") as held:  # another build holds the lock
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(IndexBuildInProgressError, match=r"Another build of the index at .* is running"):
            tracin_we(setup).build_index(path)
    assert not (tmp_path / "index").exists() and not (tmp_path / ".index.partial").exists()
    # released (also when its process dies): a lock file alone does not block
    tracin_we(setup).build_index(path)
    assert sorted(os.listdir(tmp_path)) == [".index.lock", "index"]


def test_a_build_does_not_resume_chunks_of_another_format_version(setup, tmp_path):
    path = str(tmp_path / "index")
    tracin = tracin_we(setup)
    calls = count_gradient_calls(tracin, interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        tracin.build_index(path, chunk_size=5)
    progress = tmp_path / ".index.partial" / "progress.jsonl"
    header, *events = progress.read_text().splitlines()
    assert [json.loads(e).get("chunk") for e in events] == [None, 0, 1]  # c0 started, two chunks
    record = json.loads(header)
    record["format_version"] = 1
    progress.write_text("\n".join([json.dumps(record)] + events) + "\n")
    calls.clear()
    tracin.build_index(path, chunk_size=5)
    assert len(calls) == -(-len(setup.train) // 5) * len(setup.checkpoints)  # all recomputed


def test_a_rebuild_stopped_while_replacing_is_finished_by_the_next_build(setup, tmp_path, monkeypatch):
    path = str(tmp_path / "index")
    tracin_we(setup).build_index(path)
    real_replace = os.replace

    def stop_before_moving_in(source, target):
        if source.endswith(".index.partial"):
            raise KeyboardInterrupt
        real_replace(source, target)

    monkeypatch.setattr(writer.os, "replace", stop_before_moving_in)
    with pytest.raises(KeyboardInterrupt):
        tracin_we(setup, top_k_tokens=1).build_index(path)
    monkeypatch.undo()
    assert not (tmp_path / "index").exists()
    with pytest.raises(FileNotFoundError, match=r"a rebuild was interrupted while replacing it"):
        tracin_we(setup).load_index(path)
    # the next build first moves the finished rebuild into place (even if it then fails)
    monkeypatch.setattr(writer, "_write_locked", _failing_write)
    with pytest.raises(KeyboardInterrupt):
        tracin_we(setup).build_index(path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == [".index.lock", "index"]
    rebuilt = tracin_we(setup, top_k_tokens=1)
    rebuilt.load_index(path)
    assert_close(rebuilt.influence(setup.test_batch()),
                 tracin_we(setup, top_k_tokens=1).influence(setup.test_batch()), rtol=1e-12)


def test_without_a_finished_rebuild_the_old_index_is_restored(setup, tmp_path, monkeypatch):
    path = tmp_path / "index"
    tracin_we(setup).build_index(str(path))
    old_manifest = (path / "manifest.json").read_text()
    os.replace(path, tmp_path / ".index.previous")  # moved aside, as by a rebuild
    (tmp_path / ".index.partial").mkdir()  # whose partial has no manifest
    with pytest.raises(FileNotFoundError, match=r"the previous index is at .*\.index\.previous"):
        tracin_we(setup).load_index(str(path))
    monkeypatch.setattr(writer, "_write_locked", _failing_write)
    with pytest.raises(KeyboardInterrupt):
        tracin_we(setup).build_index(str(path))
    assert (path / "manifest.json").read_text() == old_manifest
    assert not (tmp_path / ".index.previous").exists()


def _failing_write(*args):
    raise KeyboardInterrupt


def test_an_index_does_not_overwrite_other_folders(setup, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"is not a TracInWE index; choose another `path`"):
        tracin_we(setup).build_index(str(tmp_path / "data"))
    assert (tmp_path / "data" / "keep.txt").read_text() == "mine"
    assert os.listdir(tmp_path) == ["data"]


def test_float16_index_is_half_the_size_and_close(setup, tmp_path):
    plain = tracin_we(setup)
    expected = plain.influence(setup.test_batch())
    exact = plain.build_index(str(tmp_path / "exact"))
    half = tracin_we(setup)
    half.build_index(str(tmp_path / "half"), dtype=torch.float16)
    grads = "c0-k0-grads.npy"
    exact_bytes = exact.manifest["files"][grads]["bytes"]
    half_bytes = half.index.manifest["files"][grads]["bytes"]
    assert half.index.manifest["files"][grads]["dtype"] == "float16"
    assert half_bytes < exact_bytes / 3  # float64 rows in the test models -> float16
    scores = half.influence(setup.test_batch())
    assert scores.dtype == expected.dtype
    scale = expected.abs().max()
    assert ((scores - expected).abs() / scale).max() < 1e-2
    assert_close(half.self_influence(), plain.self_influence(), rtol=1e-2)
    # a query reads the chunks lazily (float16 rows and their scales apart): the same rows once scaled
    lazy, eager = half.index.chunk(0, 0, lazy=True), half.index.chunk(0, 0)
    assert lazy.grads.dtype == torch.float16 and lazy.row_scales is not None and eager.row_scales is None
    assert torch.equal(lazy.scaled().grads, eager.grads)


def test_projected_index_stays_within_the_documented_error(setup, tmp_path):
    plain = tracin_we(setup)
    projected = tracin_we(setup)
    dim = projected.embedding_layer.weight.shape[1]
    index = projected.build_index(str(tmp_path / "p"), projection_dim=dim // 2, seed=7)
    assert index.manifest["projection_dim"] == dim // 2
    assert index.manifest["files"]["c0-k0-grads.npy"]["shape"][1] == dim // 2
    estimate = projected.influence(setup.test_batch())
    exact = plain.influence(setup.test_batch())
    assert not torch.allclose(estimate, exact)
    # the bound on the standard deviation of each score: sum over shared tokens
    # and checkpoints of lr |a| |b| sqrt(2 / p); a fixed seed stays within 4 of it
    bounds = _pair_norm_bounds(plain, setup, dim // 2)
    assert ((estimate - exact).abs() <= 4 * bounds).all()
    reloaded = tracin_we(setup)
    reloaded.load_index(str(tmp_path / "p"))
    assert torch.equal(reloaded.influence(setup.test_batch()), estimate)
    for bad in (0, dim + 1):
        with pytest.raises(ValueError, match=rf"`projection_dim` must be an int from 1 to the embedding size {dim} .*got {bad}"):
            tracin_we(setup).build_index(str(tmp_path / "q"), projection_dim=bad)


def _pair_norm_bounds(tracin, setup, p):
    """Per (test, train) pair: sum_c lr_c sum_shared |a_w| |b_w| sqrt(2 / p)."""
    from captum_tracin_we._core.products import shared_token_pairs

    bound = torch.zeros(len(setup.test), len(setup.train), dtype=torch.float64)
    test_loader = torch.utils.data.DataLoader(setup.test, batch_size=len(setup.test))
    for rate in tracin._load_checkpoints():
        test = tracin._dataset_gradients(test_loader)
        train = tracin._dataset_gradients(
            torch.utils.data.DataLoader(setup.train, batch_size=len(setup.train))
        )
        t, r = shared_token_pairs(test, train)
        terms = test.grads[t].norm(dim=1) * train.grads[r].norm(dim=1) * rate
        bound.index_put_((test.example_index[t], train.example_index[r]), terms, accumulate=True)
    return bound * (2 / p) ** 0.5


def test_index_in_several_chunks_gives_the_same_scores(setup, tmp_path):
    plain = tracin_we(setup)
    expected = plain.influence(setup.test_batch())
    chunked = tracin_we(setup)
    index = chunked.build_index(str(tmp_path / "index"), chunk_size=7)  # batches of 5
    counts = index.manifest["chunks"]
    assert all(row == counts[0] for row in counts) and sum(counts[0]) == len(setup.train)
    assert all(count == 10 for count in counts[0][:-1]) and len(counts[0]) > 1
    assert_close(chunked.influence(setup.test_batch()), expected, rtol=1e-12)
    assert_close(chunked.self_influence(), plain.self_influence(), rtol=1e-12)
    indices = [[0, 9, 10, len(setup.train) - 1]] * len(setup.test)
    for with_index, without in zip(
        chunked.word_influence(setup.test_batch(), indices),
        plain.word_influence(setup.test_batch(), indices),
    ):
        assert [w.train_index for w in with_index] == [w.train_index for w in without]
        for a, b in zip(with_index, without):
            assert_close(a.scores.sum(), b.scores.sum(), rtol=1e-12)
    with pytest.raises(ValueError, match=r"`chunk_size` must be an int >= 1, got 0"):
        tracin_we(setup).build_index(str(tmp_path / "other"), chunk_size=0)


def test_index_of_other_data_loss_layer_or_rates_is_refused(setup, tmp_path):
    path = str(tmp_path / "index")
    tracin_we(setup).build_index(path)
    relabelled = TensorDataset(*setup.train.tensors[:-1], 1 - setup.train.tensors[-1].clamp(max=1))
    other_data = TracInWE(setup.model, relabelled, setup.checkpoints,
                          loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=5)
    with pytest.raises(IndexMismatchError, match=r"different training_data"):
        other_data.load_index(path)
    weighted = nn.CrossEntropyLoss(weight=torch.ones(3, dtype=torch.float64))
    with pytest.raises(IndexMismatchError, match=r"different loss_fn"):
        TracInWE(setup.model, setup.train, setup.checkpoints, loss_fn=weighted,
                 batch_size=5).load_index(path)
    with pytest.raises(IndexMismatchError, match=r"different training_data"):  # batch size
        TracInWE(setup.model, setup.train, setup.checkpoints,
                 loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=4).load_index(path)
    halved = TracInWE(setup.model, setup.train, setup.checkpoints,
                      checkpoints_load_func=lambda model, path: load_checkpoint(model, path) / 2,
                      loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=5)
    with pytest.raises(IndexMismatchError, match=r"Checkpoint 0 loads with learning rate 0.25, but the index was built with 0.5"):
        halved.load_index(path)  # same files, other rates: checked when the gradients are
    halved.load_index(path, check_gradients=False)  # else when the index is used
    with pytest.raises(IndexMismatchError, match=r"Checkpoint 0 loads with learning rate"):
        halved.influence(setup.test_batch())
    with pytest.raises(IndexMismatchError, match=r"Checkpoint 0 loads with learning rate"):
        halved.self_influence()


def test_build_index_rejects_bad_arguments_before_any_work(setup, tmp_path):
    tracin = tracin_we(setup)
    index = tracin.build_index(str(tmp_path / "index"))
    with pytest.raises(ValueError, match=r"`dtype` must be torch.float16, float32 or float64"):
        tracin.build_index(str(tmp_path / "b"), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"`seed` must be an int >= 0, got 1.5"):
        tracin.build_index(str(tmp_path / "b"), projection_dim=2, seed=1.5)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"is a file; give a folder for the index"):
        tracin.build_index(str(tmp_path / "file"))
    assert tracin.index == index  # still in use after the refused calls
    for empty in ("", "  "):
        with pytest.raises(ValueError, match=r"`path` is empty: give the name of the index folder"):
            tracin.build_index(empty)
        with pytest.raises(ValueError, match=r"`path` is empty: give the name of the index folder"):
            tracin.load_index(empty)
    assert sorted(os.listdir(tmp_path)) == [".index.lock", "file", "index"]


def test_an_open_index_refuses_files_of_a_later_build(setup, tmp_path):
    path = str(tmp_path / "index")
    first = tracin_we(setup)
    first.build_index(path)
    tracin_we(setup, top_k_tokens=1).build_index(path)  # rebuilt in place with other options
    with pytest.raises(IndexMismatchError, match=r"was rebuilt or removed since it was opened"):
        first.influence(setup.test_batch())
    with pytest.raises(IndexMismatchError, match=r"different top_k_tokens"):
        first.load_index(path)
