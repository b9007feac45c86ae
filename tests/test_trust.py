"""
No silent wrong scores: loaders whose order is not fixed, indexes built with
another loss or model, edited manifests, altered partial builds, NaN and inf,
and the raw errors made clear (issue 12). Each test fails on the code before it.
"""

import functools
import json
import math
import os
import re

import numpy as np
import pytest
import torch
from conftest import assert_close, BagOfEmbeddings, make_setup, tiny_bert, token_data
from torch import nn
from torch.nn import functional as F
from torch.utils.data import (
    DataLoader,
    IterableDataset,
    Subset,
    TensorDataset,
    BatchSampler,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)
from torch.utils.data.distributed import DistributedSampler

from captum_tracin_we import (
    CorruptIndexError,
    HuggingFaceClassifier,
    IndexMismatchError,
    load_checkpoint,
    save_checkpoint,
    TracInWE,
)
from captum_tracin_we._core.index import writer
from captum_tracin_we._core.index.format import manifest_checksum

SUM = nn.CrossEntropyLoss(reduction="sum")


@pytest.fixture(scope="module")
def boe(tmp_path_factory):
    return make_setup("boe", tmp_path_factory.mktemp("boe"))


def make(setup, train=None, **kwargs):
    kwargs.setdefault("loss_fn", SUM)
    kwargs.setdefault("batch_size", 5)
    return TracInWE(setup.model, setup.train if train is None else train, setup.checkpoints, **kwargs)


# 1. loaders whose order is not fixed


def test_a_shuffling_loader_gives_the_scores_of_the_dataset_in_order(boe):
    expected = make(boe)
    for drop_last in (False, True):
        torch.manual_seed(0)
        shuffled = make(boe, DataLoader(boe.train, batch_size=5, shuffle=True, drop_last=drop_last))
        assert_close(shuffled.influence(boe.test_batch()), expected.influence(boe.test_batch()))
        assert_close(shuffled.self_influence(), expected.self_influence())
    top = shuffled.influence(boe.test_batch(), k=3)
    assert torch.equal(top.indices, expected.influence(boe.test_batch(), k=3).indices)
    words = shuffled.word_influence(boe.test_batch(), top.indices)
    assert [[w.train_index for w in row] for row in words] == top.indices.tolist()


def test_a_shuffling_test_loader_keeps_each_test_example_in_its_row(boe):
    tracin = make(boe)
    torch.manual_seed(0)
    shuffled = DataLoader(boe.test, batch_size=2, shuffle=True)
    assert_close(tracin.influence(shuffled), tracin.influence(boe.test_batch()))
    assert_close(tracin.self_influence(shuffled), tracin.self_influence(boe.test_batch()))


class RandomBatches:
    """A batch sampler that draws new batches every epoch."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        order = torch.randperm(self.n).tolist()
        return iter([order[i:i + 5] for i in range(0, self.n, 5)])

    def __len__(self) -> int:
        return -(-self.n // 5)


@pytest.mark.parametrize("kind", ["batch_sampler", "weighted", "subset", "with_replacement", "tiny"])
def test_a_random_sampler_or_batch_sampler_is_refused(boe, kind):
    # a custom batch sampler is caught by two draws that differ: seeded, so that 4 test examples'
    # draws cannot agree by chance (1 in 24 unseeded)
    torch.manual_seed(0)
    n = len(boe.train)
    if kind == "batch_sampler":
        loader, shown = DataLoader(boe.train, batch_sampler=RandomBatches(n)), "RandomBatches"
    else:
        sampler, shown = {
            "weighted": (WeightedRandomSampler(torch.ones(n), n), "WeightedRandomSampler"),
            "subset": (SubsetRandomSampler(range(n)), "SubsetRandomSampler"),
            "with_replacement": (RandomSampler(boe.train, replacement=True), "RandomSampler"),
            # two draws over two examples often agree: refused by its type, not by chance
            "tiny": (WeightedRandomSampler(torch.tensor([1.0, 1e-9]), 2), "WeightedRandomSampler"),
        }[kind]
        loader = DataLoader(boe.train, batch_size=5, sampler=sampler)
    message = (f"`train_dataset` draws its examples in a random order ({shown}), but TracInWE reads them "
               "once per checkpoint and needs the same example in the same place every time. Pass the "
               "Dataset itself (with `batch_size=`), or a DataLoader that reads it in a fixed order")
    with pytest.raises(ValueError, match=re.escape(message)):
        make(boe, loader)
    with pytest.raises(ValueError, match=re.escape(message.replace("train_dataset", "inputs"))):
        make(boe).influence(DataLoader(boe.test, batch_size=2, sampler=loader.sampler)
                            if kind != "batch_sampler" else DataLoader(boe.test, batch_sampler=RandomBatches(4)))


def test_a_distributed_sampler_is_refused(boe):
    sampler = DistributedSampler(boe.train, num_replicas=2, rank=0, shuffle=False)
    message = re.escape("`train_dataset` uses a DistributedSampler, which gives this process only its part of the data, in an order that changes with `set_epoch`.")
    with pytest.raises(ValueError, match=message):
        make(boe, DataLoader(boe.train, batch_size=5, sampler=sampler))
    with pytest.raises(ValueError, match=message):  # inside a batch sampler of one's own
        make(boe, DataLoader(boe.train, batch_sampler=BatchSampler(sampler, 5, False)))


def test_a_batch_sampler_of_ones_own_is_judged_by_its_sampler(boe):
    expected = make(boe).influence(boe.test_batch())
    torch.manual_seed(0)
    shuffled = make(boe, DataLoader(boe.train, batch_sampler=BatchSampler(RandomSampler(boe.train), 5, False)))
    assert_close(shuffled.influence(boe.test_batch()), expected)
    weighted = BatchSampler(WeightedRandomSampler(torch.ones(len(boe.train)), len(boe.train)), 5, False)
    with pytest.raises(ValueError, match=re.escape("`train_dataset` draws its examples in a random order (WeightedRandomSampler)")):
        make(boe, DataLoader(boe.train, batch_sampler=weighted))


def test_workers_that_may_deliver_batches_out_of_order_are_put_in_order(boe):
    loader = DataLoader(boe.train, batch_size=5, num_workers=2, in_order=False)
    tracin = make(boe, loader)
    assert tracin.train_dataloader.in_order and tracin.train_dataloader.num_workers == 2
    assert_close(tracin.influence(boe.test_batch()), make(boe).influence(boe.test_batch()))


class Reversed(SequentialSampler):
    """A subclass of SequentialSampler in another order: not read as 0, 1, 2, ..."""

    def __iter__(self):
        return iter(range(len(self.data_source) - 1, -1, -1))


def test_a_sequential_sampler_of_another_order_or_length_is_a_custom_order(boe):
    reversed_ = make(boe, DataLoader(boe.train, batch_size=5, sampler=Reversed(boe.train)))
    expected = make(boe).influence(boe.test_batch())
    scores = reversed_.influence(boe.test_batch())
    assert_close(scores, expected.flip(1))
    words = reversed_.word_influence(boe.test_batch(), [0])
    assert_close(torch.stack([row[0].scores.sum() for row in words]), scores[:, 0])
    shorter = make(boe, DataLoader(boe.train, batch_size=5, sampler=SequentialSampler(range(7))))
    assert shorter.influence(boe.test_batch()).shape == (4, 7)
    with pytest.raises(IndexError, match=re.escape("`train_indices` holds 9, but `train_dataset` has only 7 examples")):
        shorter.word_influence(boe.test_batch(), [9])


def test_an_index_of_a_shuffling_loader_is_that_of_its_dataset(boe, tmp_path):
    path = str(tmp_path / "index")
    make(boe, DataLoader(boe.train, batch_size=5, shuffle=True)).build_index(path)
    tracin = make(boe)  # the Dataset, batch size 5
    tracin.load_index(path)
    assert_close(tracin.influence(boe.test_batch()), make(boe).influence(boe.test_batch()), rtol=1e-12)


class ByLength:
    """A fixed batch sampler: examples bucketed by length, longest first."""

    def __init__(self, ids: torch.Tensor) -> None:
        lengths = (ids != 0).sum(1)
        self.order = torch.argsort(-lengths, stable=True).tolist()

    def __iter__(self):
        return iter([self.order[i:i + 5] for i in range(0, len(self.order), 5)])

    def __len__(self) -> int:
        return -(-len(self.order) // 5)


def test_a_fixed_custom_order_is_kept_and_frozen(boe, tmp_path):
    sampler = ByLength(boe.train.tensors[0])
    tracin = make(boe, DataLoader(boe.train, batch_sampler=sampler))
    in_that_order = make(boe, Subset(boe.train, list(sampler.order)))
    assert_close(tracin.influence(boe.test_batch()), in_that_order.influence(boe.test_batch()))
    words = tracin.word_influence(boe.test_batch(), [0, 11])
    expected = in_that_order.word_influence(boe.test_batch(), [0, 11])
    for row, expected_row in zip(words, expected):
        assert [float(w.scores.sum()) for w in row] == pytest.approx([float(w.scores.sum()) for w in expected_row])
    sampler.order.reverse()  # changing the sampler later changes nothing
    assert_close(tracin.influence(boe.test_batch()), in_that_order.influence(boe.test_batch()))
    tracin.build_index(str(tmp_path / "index"))
    assert_close(tracin.influence(boe.test_batch()), in_that_order.influence(boe.test_batch()))


class RandomlyMasked(torch.utils.data.Dataset):
    """Masks a random token of each example on every read: random augmentation."""

    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        ids, label = self.data[i]
        ids = ids.clone()
        ids[torch.randint(0, ids.numel(), ())] = 0
        return ids, label


class ShuffledStream(IterableDataset):
    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __iter__(self):
        return iter([self.data[i] for i in torch.randperm(len(self.data)).tolist()])


@pytest.mark.filterwarnings("ignore:Unable to determine the number of batches")
@pytest.mark.parametrize("dataset", [RandomlyMasked, ShuffledStream])
def test_data_that_changes_between_checkpoints_is_refused(boe, tmp_path, dataset):
    torch.manual_seed(0)
    tracin = make(boe, DataLoader(dataset(boe.train), batch_size=5))
    message = r"`train_dataset` yielded other examples (at checkpoint \d \(|when read (for the index|again)).*" + re.escape(
        "than on its first pass (batch 0 differs). TracInWE reads it more than once, so it must "
        "yield the same examples in the same order every time: remove random augmentation")
    with pytest.raises(ValueError, match=message):
        tracin.influence(boe.test_batch())
    with pytest.raises(ValueError, match=message):
        tracin.self_influence()
    with pytest.raises(ValueError, match=message):
        tracin.build_index(str(tmp_path / "index"))
    assert not (tmp_path / "index").exists()
    fresh = make(boe, DataLoader(dataset(boe.train), batch_size=5))  # the examples alone, read twice
    with pytest.raises(ValueError, match=message):
        fresh.word_influence(boe.test_batch(), [0, 3])


def pad_to_longest(examples):
    """A collate function that pads to the longest text of the batch, as Hugging Face's do."""
    longest = max(int((ids != 0).sum()) for ids, _ in examples)
    return torch.stack([ids[:longest] for ids, _ in examples]), torch.stack([y for _, y in examples])


def test_word_terms_add_up_with_a_padding_collate_function(tmp_path):
    from conftest import TextCNN  # no mask: its gradients depend on the padding

    setup = make_setup("cnn", tmp_path)
    ids = setup.train.tensors[0]
    order = torch.argsort((ids != 0).sum(1), descending=True)  # texts, then their padding
    train = TensorDataset(torch.stack([torch.cat([r[r != 0], r[r == 0]]) for r in ids[order]]),
                          setup.train.tensors[1][order])
    tracin = TracInWE(setup.model, DataLoader(train, batch_size=5, collate_fn=pad_to_longest),
                      setup.checkpoints, loss_fn=SUM)
    assert isinstance(setup.model, TextCNN)
    scores = tracin.influence(setup.test_batch())
    wanted = [1, 6, 11]
    for row, words in enumerate(tracin.word_influence(setup.test_batch(), wanted)):
        assert_close(torch.stack([w.scores.sum() for w in words]), scores[row, wanted], rtol=1e-10)


# 2. an index opened with another loss or model


class ReluBagOfEmbeddings(BagOfEmbeddings):
    """The same parameters as BagOfEmbeddings, another forward."""

    def forward(self, ids):
        mask = (ids != 0).unsqueeze(-1).to(self.linear.weight.dtype)
        return self.linear(torch.relu((self.embedding(ids) * mask).sum(1)))


def per_example(out, y):
    return F.cross_entropy(out, y, reduction="none")


def test_an_index_refuses_another_loss_function_or_forward(boe, tmp_path):
    path = str(tmp_path / "index")
    built = make(boe, loss_fn=lambda out, y: per_example(out, y))
    built.build_index(path)
    make(boe, loss_fn=lambda out, y: per_example(out, y)).load_index(path)  # the same code loads
    other_losses = [
        lambda out, y: per_example(out, y) * 2,  # the same name: `<lambda>`
        lambda out, y: F.cross_entropy(out, y, reduction="none", label_smoothing=0.3),
    ]
    message = (r"At checkpoint 0, the training gradients recomputed with this model and `loss_fn` differ "
               r"by \d.* \(relative to their largest entry; the tolerance is 1e-09\) from those stored in "
               r"the index at .*: it was made with another model forward or loss function")
    for loss in other_losses:
        with pytest.raises(IndexMismatchError, match=message):
            make(boe, loss_fn=loss).load_index(path)

    partial_path = str(tmp_path / "partial")
    make(boe, loss_fn=functools.partial(F.cross_entropy, reduction="none")).build_index(partial_path)
    smoothed = functools.partial(F.cross_entropy, reduction="none", label_smoothing=0.3)
    with pytest.raises(IndexMismatchError, match=message):
        make(boe, loss_fn=smoothed).load_index(partial_path)

    model = ReluBagOfEmbeddings().double().eval()
    model.load_state_dict(boe.model.state_dict())
    relu = TracInWE(model, boe.train, boe.checkpoints, loss_fn=lambda out, y: per_example(out, y), batch_size=5)
    with pytest.raises(IndexMismatchError, match=message):
        relu.load_index(path)
    relu.load_index(path, check_gradients=False)  # the fast checks alone cannot tell


def test_the_probe_is_exact_with_top_k_tokens_and_spread_over_the_data(boe, tmp_path):
    path = str(tmp_path / "index")
    index = make(boe, top_k_tokens=1, loss_fn=lambda out, y: per_example(out, y)).build_index(path)
    assert index.manifest["probe_indices"] == list(range(len(boe.train)))  # 12 examples: all
    kept = (boe.train.tensors[0] != 0).sum().item()
    assert index.probe(0).num_examples == 12 and index.probe(0).token_ids.numel() > 12  # not top-1
    assert index.probe(0).token_ids.numel() <= kept
    make(boe, top_k_tokens=1, loss_fn=lambda out, y: per_example(out, y)).load_index(path)
    with pytest.raises(IndexMismatchError, match=r"At checkpoint 0, .* differ by"):
        make(boe, top_k_tokens=1, loss_fn=lambda out, y: 3 * per_example(out, y)).load_index(path)
    many = TensorDataset(*(t.repeat(3, *[1] * (t.dim() - 1)) for t in boe.train.tensors))
    spread = make(boe, many).build_index(str(tmp_path / "many"))
    assert spread.manifest["probe_indices"] == sorted({round(i * 35 / 15) for i in range(16)})


def interrupt_after(chunks_written):
    """A context in which `build_index` stops after writing `chunks_written` chunks."""
    return _Interrupting(chunks_written)


class _Interrupting:
    def __init__(self, after):
        self.after, self.record = after, writer.BuildProgress.record

    def __enter__(self):
        written, record, after = [], self.record, self.after

        def stopping(progress, folder, event):
            record(progress, folder, event)
            written.append(event)
            if sum("chunk" in e for e in written) == after:
                raise KeyboardInterrupt

        writer.BuildProgress.record = stopping

    def __exit__(self, *exc):
        writer.BuildProgress.record = self.record
        assert exc[0] is KeyboardInterrupt, "the build was not interrupted"
        return True


@pytest.mark.parametrize("chunks_written", [1, 4])  # inside the first checkpoint, or after it
def test_a_build_resumed_with_another_loss_or_forward_starts_over(boe, tmp_path, chunks_written):
    path = str(tmp_path / "index")
    with interrupt_after(chunks_written):
        make(boe, loss_fn=lambda out, y: per_example(out, y)).build_index(path, chunk_size=5)
    other = make(boe, loss_fn=lambda out, y: 2 * per_example(out, y))  # the same description
    other.build_index(path, chunk_size=5)
    expected = make(boe, loss_fn=lambda out, y: 2 * per_example(out, y)).influence(boe.test_batch())
    assert_close(other.influence(boe.test_batch()), expected, rtol=1e-12)
    reloaded = make(boe, loss_fn=lambda out, y: 2 * per_example(out, y))
    reloaded.load_index(path)
    assert_close(reloaded.influence(boe.test_batch()), expected, rtol=1e-12)


# 3. the manifest


def built_index(setup, path, **kwargs):
    make(setup).build_index(str(path), chunk_size=5, **kwargs)
    return json.loads((path / "manifest.json").read_text())


def rewrite(path, manifest, checksum=True):
    if checksum:
        manifest["manifest_sha256"] = manifest_checksum(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit", [
    lambda m: m["chunks"][0].__setitem__(slice(0, 2), [6, 4]),  # the total is kept
    lambda m: m.__setitem__("projection_seed", 1),
    lambda m: m["files"]["c0-k0-grads.npy"].__setitem__("dtype", "float32"),
])
def test_an_edited_manifest_is_refused(boe, tmp_path, edit):
    path = tmp_path / "index"
    manifest = built_index(boe, path, projection_dim=3)
    edit(manifest)
    rewrite(path, manifest, checksum=False)
    with pytest.raises(CorruptIndexError, match=r"The manifest of the index at .* was edited since the index was built \(its manifest_sha256 differs from its content\)"):
        make(boe).load_index(str(path))


def test_edited_records_are_compared_with_the_arrays(boe, tmp_path):
    path = tmp_path / "index"
    original = built_index(boe, path)
    manifest = json.loads(json.dumps(original))
    manifest["chunks"][0][:2] = [6, 4]  # checksum recomputed: the offsets arrays disagree
    rewrite(path, manifest)
    with pytest.raises(CorruptIndexError, match=re.escape("`files.c0-k0-offsets.npy` must be an array of shape [7] and dtype int64")):
        make(boe).load_index(str(path))
    manifest = json.loads(json.dumps(original))
    record = manifest["files"]["c1-k1-grads.npy"]
    record["shape"] = [record["shape"][0] - 1, record["shape"][1]]
    manifest["files"]["c1-k1-token_ids.npy"]["shape"][0] -= 1
    manifest["files"]["c1-k1-by_token_rows.npy"]["shape"][0] -= 1
    rewrite(path, manifest)
    with pytest.raises(CorruptIndexError, match=r"c1-k1-token_ids.npy' holds an array of shape \[\d+\] and dtype int64, but the manifest records \[\d+\]"):
        make(boe).load_index(str(path), verify=False)


@pytest.mark.parametrize("field, value, expected", [
    ("chunks", "abc", "`chunks` must be a non-empty list of non-empty lists of ints >= 1"),
    ("training_data", [], "`training_data` must be an object"),
    ("learning_rates", ["x", 1, 2], "`learning_rates` must be a non-empty list of finite numbers"),
    ("learning_rates", [1.0], "`learning_rates` must be a list of 3 entries, one per checkpoint"),
    ("projection_dim", 1.5, "`projection_dim` must be an int >= 1 or null"),
    ("files", None, "`files` must be an object"),
    ("probe_indices", [], "`probe_indices` must be a non-empty list of ints >= 0"),
    ("probe_indices", [0, 99], "`probe_indices` must be indices of training examples"),
])
def test_a_malformed_manifest_names_the_field(boe, tmp_path, field, value, expected):
    path = tmp_path / "index"
    manifest = built_index(boe, path)
    manifest[field] = value
    rewrite(path, manifest)
    with pytest.raises(CorruptIndexError, match=re.escape(f"has a malformed manifest: {expected}, got ")):
        make(boe).load_index(str(path))
    del manifest[field]
    rewrite(path, manifest)
    with pytest.raises(CorruptIndexError, match=re.escape(f"has a malformed manifest: `{field}` must be")):
        make(boe).load_index(str(path))


def test_a_manifest_that_is_no_object_or_lacks_a_record_field(boe, tmp_path):
    path = tmp_path / "index"
    manifest = built_index(boe, path)
    del manifest["training_data"]["examples"]
    rewrite(path, manifest)
    with pytest.raises(CorruptIndexError, match=re.escape("`training_data.examples` must be an int >= 1, got null")):
        make(boe).load_index(str(path))
    (path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(CorruptIndexError, match=re.escape("`(the manifest)` must be a JSON object, got [1, 2]")):
        make(boe).load_index(str(path))


def test_no_file_outside_the_index_is_read(boe, tmp_path):
    path = tmp_path / "index"
    manifest = built_index(boe, path)
    outside = tmp_path / "outside.npy"
    np.save(outside, np.zeros(3))
    manifest["files"]["../outside.npy"] = manifest["files"].pop("c0-k0-grads.npy")
    rewrite(path, manifest)
    with pytest.raises(CorruptIndexError, match=re.escape("unexpected:), got [\"../outside.npy\"]")):
        make(boe).load_index(str(path))
    manifest["files"]["c0-k0-grads.npy"] = manifest["files"].pop("../outside.npy")
    rewrite(path, manifest)
    make(boe).load_index(str(path))
    grads = path / "c0-k0-grads.npy"
    os.replace(grads, outside)
    os.symlink(outside, grads)  # a link out of the folder
    with pytest.raises(CorruptIndexError, match=r"Index file 'c0-k0-grads.npy' lies outside the folder"):
        make(boe).load_index(str(path))


# 4. resuming


def test_a_finished_chunk_altered_in_the_partial_folder_is_recomputed(boe, tmp_path):
    path = str(tmp_path / "index")
    expected = make(boe).influence(boe.test_batch())
    tracin = make(boe)
    with interrupt_after(4):  # checkpoint 0's three chunks, and one of checkpoint 1
        tracin.build_index(path, chunk_size=5)
    partial = tmp_path / ".index.partial"
    kept = (partial / "c0-k0-grads.npy").stat().st_mtime_ns
    grads = partial / "c0-k1-grads.npy"
    original = grads.read_bytes()
    np.save(grads, 2 * np.load(grads))  # the same size, other values: scores would change
    assert grads.read_bytes() != original and len(grads.read_bytes()) == len(original)
    tracin.build_index(path, chunk_size=5)
    index = tmp_path / "index"
    assert (index / "c0-k0-grads.npy").stat().st_mtime_ns == kept  # the chunk before: kept
    assert (index / "c0-k1-grads.npy").read_bytes() == original  # computed again
    assert_close(tracin.influence(boe.test_batch()), expected, rtol=1e-12)


def test_a_torn_progress_line_is_dropped_and_the_rest_resumed(boe, tmp_path):
    path = str(tmp_path / "index")
    expected = make(boe).influence(boe.test_batch())
    tracin = make(boe)
    with interrupt_after(4):
        tracin.build_index(path, chunk_size=5)
    log = tmp_path / ".index.partial" / "progress.jsonl"
    with open(log, "a") as handle:
        handle.write('{"checkpoint": 1, "chunk": 1, "exam')  # the process stopped while appending
    progress = writer.BuildProgress.load(str(log.parent), json.loads(log.read_text().splitlines()[0])["description"])
    assert progress.chunks == {0: [5, 5, 2], 1: [5]}
    tracin.build_index(path, chunk_size=5)
    assert_close(tracin.influence(boe.test_batch()), expected, rtol=1e-12)


def test_log_lines_naming_files_outside_or_repeating_are_not_trusted(boe, tmp_path):
    path = str(tmp_path / "index")
    tracin = make(boe)
    with interrupt_after(4):
        tracin.build_index(path, chunk_size=5)
    log = tmp_path / ".index.partial" / "progress.jsonl"
    lines = log.read_text().splitlines()
    outside = json.loads(lines[-1])
    outside["files"] = {"../" + name: record for name, record in outside["files"].items()}
    repeated = [line for line in lines if '"complete":true' in line]
    forged = json.dumps({"checkpoint": 2, "chunk": 0, "examples": 5, "files": {}})
    log.write_text("\n".join(lines[:-1] + repeated + [forged, json.dumps(outside)]) + "\n")
    description = json.loads(lines[0])["description"]
    progress = writer.BuildProgress.load(str(log.parent), description)
    assert progress.complete == [0] and progress.chunks == {0: [5, 5, 2]}  # up to the bad line
    tracin.build_index(path, chunk_size=5)
    assert_close(tracin.influence(boe.test_batch()), make(boe).influence(boe.test_batch()), rtol=1e-12)


def test_files_reach_the_disk_before_the_progress_that_lists_them(boe, tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording(descriptor):
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    monkeypatch.setattr(writer.os, "fsync", recording)
    written = []
    monkeypatch.setattr(writer, "write_durably", lambda path, text, real=writer.write_durably: (
        written.append(os.path.basename(path)), real(path, text))[1])
    make(boe).build_index(str(tmp_path / "index"), chunk_size=5)
    # progress is saved by appending one line, whatever the number of chunks: the
    # log is written whole only when the build starts, and the manifest at its end
    assert written == ["progress.jsonl", "manifest.json"]
    # each chunk's seven files, then their folder, then the progress line listing them
    first_chunk = synced.index("c0-k0-offsets.npy")
    assert synced[first_chunk:first_chunk + 9] == [
        "c0-k0-offsets.npy", "c0-k0-token_ids.npy", "c0-k0-grads.npy", "c0-k0-by_token_vocab.npy",
        "c0-k0-by_token_starts.npy", "c0-k0-by_token_rows.npy", "c0-k0-squared_norms.npy",
        ".index.partial", "progress.jsonl",
    ]
    chunks = 3 * 3
    assert synced.count("progress.jsonl") == 3 + chunks + 3  # probes, chunks, checkpoints complete


# 5. NaN and inf


def regression_setup(boe, nan_at=None, test_nan_at=None):
    train = TensorDataset(boe.train.tensors[0], torch.randn(len(boe.train), 3, dtype=torch.float64))
    test = TensorDataset(boe.test.tensors[0], torch.randn(len(boe.test), 3, dtype=torch.float64))
    if nan_at is not None:
        train.tensors[1][nan_at, 1] = math.nan
    if test_nan_at is not None:
        test.tensors[1][test_nan_at, 0] = math.inf
    return train, test


def test_a_nan_label_names_the_example_and_checkpoint(boe):
    train, test = regression_setup(boe, nan_at=7, test_nan_at=2)
    tracin = make(boe, train, loss_fn=nn.MSELoss())
    message = re.escape("Example 7 of `train_dataset` (in the order it is read, as in the scores) has a non-finite loss (nan) at checkpoint 0 (") + ".*" + \
        re.escape("checkpoint-0.pt'), which would make it the top proponent, the top opponent and the top "
                  "self influence at once. Check its inputs and labels for NaN or inf")
    with pytest.raises(ValueError, match=message):
        tracin.self_influence()
    clean_train, _ = regression_setup(boe)
    clean = make(boe, clean_train, loss_fn=nn.MSELoss())
    with pytest.raises(ValueError, match=re.escape("Example 2 of `inputs` (in the order it is read, as in the scores) has a non-finite loss (inf) at checkpoint 0")):
        clean.influence(test.tensors)
    with pytest.raises(ValueError, match=re.escape("Example 2 of `inputs` (in the order it is read, as in the scores) has a non-finite loss (inf)")):
        clean.self_influence(DataLoader(test, batch_size=2))


def test_a_nan_logit_is_refused(boe, tmp_path):
    model = BagOfEmbeddings().double().eval()
    weights = {k: v.clone() for k, v in boe.model.state_dict().items()}
    weights["embedding.weight"][5] = math.nan  # every example holding token 5 has NaN logits
    path = str(tmp_path / "nan.pt")
    torch.save(weights, path)
    tracin = TracInWE(model, boe.train, [path], loss_fn=SUM, batch_size=5)
    first = next(i for i, ids in enumerate(boe.train.tensors[0]) if 5 in ids.tolist())
    with pytest.raises(ValueError, match=re.escape(f"Example {first} of `train_dataset` (in the order it is read, as in the scores) has a non-finite loss (nan) at checkpoint 0")):
        tracin.self_influence()
    first = next(i for i, ids in enumerate(boe.test.tensors[0]) if 5 in ids.tolist())
    with pytest.raises(ValueError, match=re.escape(f"Example {first} of `inputs` (in the order it is read, as in the scores) has a non-finite loss (nan) at checkpoint 0")):
        tracin.influence(boe.test_batch())


def test_nan_only_where_nothing_is_scored_is_accepted(boe, tmp_path):
    class NanAtPadding(BagOfEmbeddings):
        def forward(self, ids):  # a NaN gradient at the padding positions only
            pad = (ids == 0).unsqueeze(-1)
            embedded = self.embedding(ids)
            # NaN at the padding's negative entries; elsewhere sqrt(1), whose gradient is finite
            embedded = torch.where(pad, embedded.masked_fill(~pad, 1.0).sqrt(), embedded)
            pooled = torch.where(pad, 0.0, embedded).sum(1) / (~pad).sum(1).clamp(min=1)
            return self.linear(torch.tanh(pooled))

    model = NanAtPadding().double().eval()
    model.embedding.padding_idx = None
    with pytest.raises(ValueError, match=re.escape("has a non-finite gradient at the word embeddings")):
        TracInWE(model, boe.train, boe.checkpoints, loss_fn=SUM, batch_size=5).self_influence()
    tracin = TracInWE(model, boe.train, boe.checkpoints, loss_fn=SUM, batch_size=5, exclude_token_ids=[0])
    assert torch.isfinite(tracin.self_influence()).all()


def test_scores_that_overflow_are_refused(boe):
    model = BagOfEmbeddings().float().eval()
    huge = TracInWE(model, boe.train, ["c"], lambda m, c: (load_checkpoint(m, boe.checkpoints[0]), 1e300)[1],
                    loss_fn=SUM, batch_size=5)
    with pytest.raises(ValueError, match=re.escape("The influence scores overflowed torch.float32 (they are not all finite): the learning rates or gradients are too large for it. Use a float64 model")):
        huge.influence((boe.test.tensors[0], boe.test.tensors[1]))
    with pytest.raises(ValueError, match=re.escape("The self influence scores overflowed torch.float32")):
        huge.self_influence()


@pytest.mark.parametrize("rate, error, shown", [
    (math.nan, ValueError, "is nan, but each checkpoint's influence is weighted by its learning rate, which must be a finite number >= 0."),
    (math.inf, ValueError, "is inf, but"),
    (-1.0, ValueError, "is -1.0, but"),
    ("0.1", TypeError, "must be a real number or a 0-d tensor, got str '0.1'."),
    (True, TypeError, "must be a real number or a 0-d tensor, got bool True."),
])
def test_learning_rates_must_be_finite_numbers_at_least_zero(boe, tmp_path, rate, error, shown):
    path = str(tmp_path / "c.pt")
    torch.save({"state_dict": boe.model.state_dict(), "learning_rate": rate}, path)
    tracin = TracInWE(boe.model, boe.train, [path], loss_fn=SUM, batch_size=5)
    with pytest.raises(error, match=re.escape(f"The learning rate stored in checkpoint {path!r} {shown}")):
        tracin.self_influence()
    custom = TracInWE(boe.model, boe.train, ["c"], lambda model, c: rate, loss_fn=SUM, batch_size=5)
    with pytest.raises(error, match=re.escape(f"The learning rate that `checkpoints_load_func` returned for checkpoint 0 ('c') {shown}")):
        custom.influence(boe.test_batch())
    with pytest.raises(error, match=re.escape(f"`learning_rate` {shown}")):
        save_checkpoint(boe.model, path, learning_rate=rate)


# raw errors made clear


def test_an_empty_test_batch(boe):
    empty = (torch.zeros(0, 7, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=re.escape("A batch of `inputs` holds no examples (its tensors have 0 rows); give at least one example.")):
        make(boe).influence(empty)


@pytest.mark.parametrize("bad", [30, -1])
def test_token_ids_outside_the_vocabulary(boe, bad):
    ids = torch.tensor([[3, 4, 5], [6, bad, 7]])
    low, high = min(3, bad), max(7, bad)
    with pytest.raises(IndexError, match=re.escape(f"`embedding_layer` (embedding) was given token ids from {low} to {high}, but its weight has 30 rows: token ids must be 0 to 29. Check that `inputs` was tokenized with this model's tokenizer (a vocabulary of 30 tokens).")):
        make(boe).influence((ids, torch.tensor([0, 1])))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16])
def test_small_integer_token_ids(boe, dtype):
    ids = boe.train.tensors[0].to(dtype)
    tracin = make(boe, TensorDataset(ids, boe.train.tensors[1]))
    with pytest.raises(TypeError, match=re.escape(f"`embedding_layer` (embedding) was given token ids of dtype {dtype}, but embedding lookups take torch.long (or torch.int32) ids: convert the token ids of `train_dataset` with `.long()`.")):
        tracin.self_influence()


def test_excluded_token_ids_outside_the_vocabulary(boe):
    for bad in (30, -1):
        with pytest.raises(ValueError, match=re.escape(f"`exclude_token_ids` holds {bad}, but the embedding has 30 rows: token ids are 0 to 29.")):
            make(boe, exclude_token_ids=[3, bad])


def test_batches_that_are_no_tuples(boe):
    with pytest.raises(TypeError, match=re.escape("Each batch must be a tuple `(*model_inputs, labels)`, got TensorDataset. Pass a Dataset as a DataLoader, or one batch as a tuple (e.g. `dataset.tensors`).")):
        make(boe).influence(boe.test)
    with pytest.raises(TypeError, match=re.escape("Each batch must be a tuple `(*model_inputs, labels)`, got Subset. Pass a Dataset as a DataLoader, or one batch as a tuple `(*model_inputs, labels)`.")):
        make(boe).influence(torch.utils.data.Subset(boe.test, [0, 1]))
    dicts = DataLoader([{"ids": ids, "label": y} for ids, y in boe.train], batch_size=5)
    with pytest.raises(TypeError, match=re.escape("Each batch must be a tuple `(*model_inputs, labels)`, got dict. Return tuples from the dataset or `collate_fn`")):
        make(boe, dicts).self_influence()


def test_a_loss_class_instead_of_an_instance(boe):
    with pytest.raises(TypeError, match=re.escape("`loss_fn` is the class CrossEntropyLoss, not a loss: pass an instance, e.g. `loss_fn=CrossEntropyLoss()`.")):
        make(boe, loss_fn=nn.CrossEntropyLoss)
    with pytest.raises(TypeError, match=re.escape("`test_loss_fn` is the class MSELoss")):
        make(boe, test_loss_fn=nn.MSELoss)


def test_k_may_be_a_numpy_or_tensor_integer(boe):
    tracin = make(boe)
    expected = tracin.influence(boe.test_batch(), k=3)
    for k in (np.int64(3), np.int32(3), torch.tensor(3)):
        top = tracin.influence(boe.test_batch(), k=k)
        assert torch.equal(top.indices, expected.indices)
    for k in (np.float64(3.0), True):
        with pytest.raises(ValueError, match=re.escape(f"`k` must be an int >= 1 or None, got {k!r}.")):
            tracin.influence(boe.test_batch(), k=k)


def test_a_missing_checkpoint_file(boe, tmp_path):
    missing = str(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match=re.escape(f"Checkpoint 1 ({missing!r}) does not exist: pass the paths of saved checkpoint files")):
        TracInWE(boe.model, boe.train, [boe.checkpoints[0], missing], loss_fn=SUM)
    path = str(tmp_path / "index")
    copy = str(tmp_path / "copy.pt")
    with open(boe.checkpoints[1], "rb") as source, open(copy, "wb") as target:
        target.write(source.read())
    tracin = TracInWE(boe.model, boe.train, [boe.checkpoints[0], copy], loss_fn=SUM, batch_size=5)
    tracin.build_index(path)
    os.remove(copy)
    with pytest.raises(FileNotFoundError, match=re.escape(f"Checkpoint 1 ({copy!r}) does not exist")):
        tracin.load_index(path)


def test_a_query_that_meets_a_half_written_or_replaced_file(boe, tmp_path):
    path = tmp_path / "index"
    tracin = make(boe)
    tracin.build_index(str(path))
    grads = path / "c0-k0-grads.npy"
    # a file of the rebuild, half written: its header promises more than it holds
    with open(grads, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "<f8", "fortran_order": False, "shape": (10_000, 6)})
    with pytest.raises(CorruptIndexError, match=r"Cannot read the index at .*; rebuild it with `build_index`"):
        tracin.influence(boe.test_batch())
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["build_id"] = "the rebuild's"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexMismatchError, match=r"The index at .* was rebuilt or removed since it was opened; open it again with `load_index`."):
        tracin.influence(boe.test_batch())
    other = make(boe)
    other.build_index(str(tmp_path / "other"))
    grads = tmp_path / "other" / "c1-k0-grads.npy"
    np.save(grads, np.zeros_like(np.load(grads)))  # same shape: copied over after opening
    with pytest.raises(CorruptIndexError, match=r"Index file 'c1-k0-grads.npy' of the index at .* changed since the index was opened"):
        other.influence(boe.test_batch())


def test_a_checkpoint_rewritten_after_the_index_was_opened(boe, tmp_path):
    checkpoint = str(tmp_path / "last.pt")
    save_checkpoint(boe.model, checkpoint, learning_rate=0.5)
    tracin = TracInWE(boe.model, boe.train, [checkpoint], loss_fn=SUM, batch_size=5)
    tracin.build_index(str(tmp_path / "index"))
    tracin.influence(boe.test_batch())
    weights = {k: v + 0.1 for k, v in boe.model.state_dict().items()}  # training went on
    torch.save({"state_dict": weights, "learning_rate": 0.5}, checkpoint + ".tmp")
    os.replace(checkpoint + ".tmp", checkpoint)  # saved as training scripts do
    with pytest.raises(IndexMismatchError, match=re.escape(f"Checkpoint 0 ({checkpoint!r}) changed since the index was opened, which holds the training gradients of its old weights: rebuild the index")):
        tracin.influence(boe.test_batch())
    with pytest.raises(IndexMismatchError, match=r"different checkpoints"):
        TracInWE(boe.model, boe.train, [checkpoint], loss_fn=SUM, batch_size=5).load_index(str(tmp_path / "index"))
    load_checkpoint(boe.model, boe.checkpoints[0])


def test_another_number_of_checkpoints_is_named(boe, tmp_path):
    path = str(tmp_path / "index")
    make(boe).build_index(path)
    with pytest.raises(IndexMismatchError, match=re.escape("was built with 3 checkpoints, this TracInWE has 2; rebuild it with `build_index`, or pass the checkpoints it was built from (a folder of checkpoints must hold only them).")):
        TracInWE(boe.model, boe.train, boe.checkpoints[:2], loss_fn=SUM, batch_size=5).load_index(path)


def test_checkpoints_of_the_wrapped_hugging_face_model_load_into_the_wrapper(tmp_path):
    torch.manual_seed(0)
    wrapper = tiny_bert().double().eval()
    inner, outer = str(tmp_path / "inner.pt"), str(tmp_path / "outer.pt")
    save_checkpoint(wrapper.model, inner, learning_rate=0.5)  # as after fine-tuning
    save_checkpoint(wrapper, outer, learning_rate=0.5)
    data = token_data(6, seed=4, with_mask=True)
    scores = [
        TracInWE(wrapper, data, [path], loss_fn=SUM, batch_size=3).influence(data.tensors)
        for path in (inner, outer)
    ]
    assert_close(scores[0], scores[1], rtol=1e-12)
    load_checkpoint(wrapper.model, outer)  # and the wrapper's into the Hugging Face model


def test_a_decoder_that_starts_with_the_pad_id_is_pointed_out(tmp_path):
    from transformers import T5Config, T5ForSequenceClassification

    config = T5Config(vocab_size=30, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
                      num_labels=2, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=re.escape("T5ForSequenceClassification starts every decoder input with the pad token id 0, whose embedding row then gets a real gradient and shows in word-level scores of every pair: pass `exclude_token_ids=[0]` to TracInWE to leave it out.")):
        model = HuggingFaceClassifier(T5ForSequenceClassification(config)).double().eval()
    assert model.pad_token_id == 0
    ids = torch.randint(2, 30, (4, 5))
    ids[:, -1] = 1  # one end-of-sequence token each, as T5's classifier needs
    data = TensorDataset(ids, torch.ones_like(ids), torch.tensor([0, 1, 0, 1]))
    path = str(tmp_path / "t5.pt")
    save_checkpoint(model, path)
    plain = TracInWE(model, data, [path], loss_fn=SUM, batch_size=4)
    assert 0 in plain.word_influence(data.tensors, [1])[0][0].token_ids.tolist()
    excluded = TracInWE(model, data, [path], loss_fn=SUM, batch_size=4, exclude_token_ids=[model.pad_token_id])
    assert 0 not in excluded.word_influence(data.tensors, [1])[0][0].token_ids.tolist()
    assert not HuggingFaceClassifier(tiny_bert().model).decoder_starts_with_pad


def test_a_bfloat16_model_builds_an_index_stored_in_float32(boe, tmp_path):
    model = BagOfEmbeddings().to(torch.bfloat16).eval()
    tracin = TracInWE(model, boe.train, boe.checkpoints, loss_fn=SUM, batch_size=5)
    expected = tracin.influence(boe.test_batch()).double()
    path = str(tmp_path / "index")
    with pytest.raises(ValueError, match=re.escape("`dtype` must be torch.float16, float32 or float64 (None: the embedding's dtype), got torch.bfloat16; numpy cannot store it.")):
        tracin.build_index(path)
    tracin.build_index(path, dtype=torch.float32)
    reloaded = TracInWE(model, boe.train, boe.checkpoints, loss_fn=SUM, batch_size=5)
    reloaded.load_index(path)  # its probes, in float32, match the bfloat16 model's
    assert_close(reloaded.influence(boe.test_batch()).double(), expected, rtol=3e-2)


def test_a_float16_index_keeps_the_small_gradients_of_a_confident_model(boe, tmp_path):
    model = BagOfEmbeddings().double().eval()
    weights = {k: v.clone() for k, v in boe.model.state_dict().items()}
    weights["linear.weight"] *= 40  # confident: losses near 0, gradients around 1e-6 and below
    path = str(tmp_path / "confident.pt")
    torch.save(weights, path)
    exact = TracInWE(model, boe.train, [path], loss_fn=SUM, batch_size=5)
    expected, expected_self = exact.influence(boe.test_batch()), exact.self_influence()
    assert expected_self.min() < 1e-8  # below float16's smallest normal number, squared
    half = TracInWE(model, boe.train, [path], loss_fn=SUM, batch_size=5)
    index = half.build_index(str(tmp_path / "half"), dtype=torch.float16)
    assert index.manifest["files"]["c0-k0-grads.npy"]["dtype"] == "float16"
    # per example, not only relative to the largest score
    assert ((half.self_influence() - expected_self).abs() / expected_self).max() < 1e-2
    assert_close(half.influence(boe.test_batch()), expected, rtol=1e-2)


def test_errors_of_the_model_or_loss_say_on_which_examples(boe):
    labels = boe.train.tensors[1].clone()
    labels[7] = 5  # no such class
    tracin = make(boe, TensorDataset(boe.train.tensors[0], labels))
    with pytest.raises(IndexError) as raised:  # PyTorch's own error, kept
        tracin.self_influence()
    assert raised.value.__notes__ == [
        "TracInWE: raised while calling `loss_fn` on the batch of `train_dataset` with examples 5 to 9 "
        f"at checkpoint 0 ({boe.checkpoints[0]!r})."
    ]
    unbatched = make(boe, DataLoader(boe.train, batch_size=None))
    with pytest.raises(RuntimeError) as raised:
        unbatched.self_influence()
    assert raised.value.__notes__[0].endswith(
        "Its token ids have no batch dimension: a DataLoader with `batch_size=None` yields single "
        "examples; give it a `batch_size`."
    )
