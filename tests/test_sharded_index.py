"""A sharded index built under torch.distributed (2 gloo processes, spawned here) scores like one process's."""

import json
import os
import pathlib
import shutil
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import assert_close, make_setup, stable_top
from torch import nn

from captum_tracin_we import CorruptIndexError, IndexMismatchError, TracInWE
from captum_tracin_we._core.index.format import CHECKSUM, manifest_checksum, SHARDED_KIND

BATCH = 3  # 12 training examples: 4 batches, 2 per process


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def tracin_of(setup, checkpoints):
    return TracInWE(setup.model, setup.train, checkpoints, loss_fn=nn.CrossEntropyLoss(reduction="sum"),
                    batch_size=BATCH)


def worker(rank, size, port, directory, checkpoints, fail_rank, out):
    """One torchrun-like process: the environment torchrun sets, then the same code as one process runs."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    own = pathlib.Path(directory) / f"rank-{rank}"
    own.mkdir(exist_ok=True)
    setup = make_setup("bert", own)  # the same seeded model and data (its checkpoints are not used)
    tracin = tracin_of(setup, checkpoints)
    computed, original = [], tracin._token_gradients

    def counted(batch, data_name, *args, **kwargs):
        if data_name == "train_dataset" and not kwargs.get("exact"):  # a training batch, not the probes
            if rank == fail_rank and len(computed) == 3:  # this process stops in its second checkpoint
                raise RuntimeError("interrupted")
            computed.append(kwargs["indices"][0])
        return original(batch, data_name, *args, **kwargs)

    tracin._token_gradients = counted
    tracin.build_index(os.path.join(directory, "index"), chunk_size=BATCH)
    result = {"computed": computed, "scores": tracin.influence(setup.test_batch()),
              "top": tracin.influence(setup.test_batch(), k=4), "self": tracin.self_influence()}
    torch.save(result, os.path.join(out, f"rank-{rank}.pt"))
    dist.destroy_process_group()


def spawn(tmp_path, checkpoints, fail_rank=-1):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    mp.spawn(worker, args=(2, free_port(), str(tmp_path), checkpoints, fail_rank, str(out)), nprocs=2)
    return [torch.load(out / f"rank-{rank}.pt", weights_only=False) for rank in range(2)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    setup = make_setup("bert", tmp_path_factory.mktemp("single"))
    tracin = tracin_of(setup, setup.checkpoints)
    return setup, tracin.influence(setup.test_batch()), tracin.self_influence()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, single):
    """The index built by 2 processes, and what each process computed and scored."""
    directory = tmp_path_factory.mktemp("sharded")
    return directory, spawn(directory, single[0].checkpoints)


def test_two_processes_build_shards_that_score_like_one_process(single, sharded):
    setup, expected, expected_self = single
    tmp_path, ranks = sharded
    # each process computed its own contiguous half of the batches, at each of the 3 checkpoints
    assert [sorted(set(r["computed"])) for r in ranks] == [[0, 3], [6, 9]]
    assert [len(r["computed"]) for r in ranks] == [6, 6]
    for r in ranks:  # every process gets the whole result
        assert_close(r["scores"], expected, rtol=1e-10)
        assert torch.equal(r["top"].indices, stable_top(expected, 4)[0])
        assert_close(r["self"], expected_self, rtol=1e-10)
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["kind"] == SHARDED_KIND
    assert [(s["folder"], s["first_example"], s["examples"]) for s in manifest["shards"]] == [
        ("shard-00000", 0, 6), ("shard-00001", 6, 6)]
    # one process opens the sharded index as one index
    alone = tracin_of(setup, setup.checkpoints)
    index = alone.load_index(str(tmp_path / "index"))
    assert index.num_examples == 12 and index.num_chunks(0) == 4
    assert_close(alone.influence(setup.test_batch()), expected, rtol=1e-10)
    top = alone.influence(setup.test_batch(), k=4)
    assert torch.equal(top.indices, stable_top(expected, 4)[0])
    words = alone.word_influence(setup.test_batch(), [1, 7])  # rows read from both shards
    plain = tracin_of(setup, setup.checkpoints).word_influence(setup.test_batch(), [1, 7])
    for row, plain_row in zip(words, plain):
        assert [w.scores.sum().item() for w in row] == pytest.approx([w.scores.sum().item() for w in plain_row])


def test_an_interrupted_shard_resumes_and_a_finished_one_is_kept(single, tmp_path):
    setup, expected, _ = single
    with pytest.raises(Exception, match="interrupted"):
        spawn(tmp_path, setup.checkpoints, fail_rank=1)
    assert not (tmp_path / "index").exists()
    ranks = spawn(tmp_path, setup.checkpoints)
    # rank 1 had written its chunks of checkpoint 0 and the first of checkpoint 1; rank 0 its whole shard
    assert ranks[1]["computed"] == [9, 6, 9]
    assert ranks[0]["computed"] == []
    for r in ranks:
        assert_close(r["scores"], expected, rtol=1e-10)


def test_an_edited_manifest_or_a_swapped_shard_is_refused(single, sharded, tmp_path):
    setup, _, _ = single
    edited, swapped = tmp_path / "edited", tmp_path / "swapped"
    for copy in (edited, swapped):
        shutil.copytree(sharded[0] / "index", copy)
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["shards"][1]["examples"] = 5
    (edited / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptIndexError, match=r"The manifest of the sharded index at .* was edited since it was built"):
        tracin_of(setup, setup.checkpoints).load_index(str(edited))
    del manifest["shards"][1]["batches"]  # re-sealed by hand: the checksum holds, the entry is incomplete
    manifest["shards"][1]["examples"] = 6
    manifest[CHECKSUM] = manifest_checksum(manifest)
    (edited / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptIndexError, match=r"The manifest of the sharded index at .* gives shard 1 no batches"):
        tracin_of(setup, setup.checkpoints).load_index(str(edited))
    shutil.rmtree(swapped / "shard-00001")
    with pytest.raises(CorruptIndexError, match=r"Shard 1 of the index at .* \(.*shard-00001'\) is missing"):
        tracin_of(setup, setup.checkpoints).load_index(str(swapped))
    shutil.copytree(swapped / "shard-00000", swapped / "shard-00001")
    with pytest.raises(IndexMismatchError, match=r"shard-00001.* was built with a different shard \(\{\"batches\": \[0, 2\]"):
        tracin_of(setup, setup.checkpoints).load_index(str(swapped))
