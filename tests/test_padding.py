"""Per-batch padding (`PaddedPerBatch`): the same scores as padding the whole dataset, for a model that masks padding."""

import re

import pytest
import torch
from conftest import assert_close, make_setup, stable_top
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Subset, TensorDataset

from captum_tracin_we import TracInWE
from captum_tracin_we.compare import compare_influence_methods
from captum_tracin_we.data import encode, fine_tune, PaddedPerBatch, predict_proba
from captum_tracin_we._utils.loaders import batch_loader, check_collate, own_collate


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return make_setup("bert", tmp_path_factory.mktemp("bert"))


def per_batch(dataset: TensorDataset) -> PaddedPerBatch:
    """The texts of a padded (ids, mask, labels) dataset, each cut to its own length."""
    ids, mask, labels = dataset.tensors
    return PaddedPerBatch([row[: int(m.sum())] for row, m in zip(ids, mask)], labels, pad_token_id=0)


def test_a_batch_is_padded_to_its_longest_text():
    data = PaddedPerBatch([torch.tensor([5, 6, 7]), torch.tensor([8]), torch.tensor([9, 4])], [1, 0, 1], pad_token_id=3)
    assert data.lengths.tolist() == [3, 1, 2]
    ids, mask, labels = data[0]
    assert ids.tolist() == [5, 6, 7] and mask.tolist() == [1, 1, 1] and int(labels) == 1
    ids, mask, labels = data.batch([1, 2])
    assert ids.tolist() == [[8, 3], [9, 4]] and mask.tolist() == [[1, 0], [1, 1]] and labels.tolist() == [0, 1]
    assert [batch[0].shape[1] for batch in data.loader(batch_size=2)] == [3, 2]
    with pytest.raises(ValueError, match=re.escape("3 texts but 2 labels.")):
        PaddedPerBatch([torch.tensor([1])] * 3, [0, 1])
    with pytest.raises(ValueError, match=re.escape("`input_ids` holds an empty text: every text needs at least one token.")):
        PaddedPerBatch([torch.tensor([1]), torch.tensor([], dtype=torch.long)], [0, 1])


def test_the_own_collate_is_found_through_subsets_and_concatenations():
    data = PaddedPerBatch([torch.tensor([1, 2]), torch.tensor([3])], [0, 1])
    assert own_collate(Subset(Subset(data, [1, 0]), [0])) == data.collate_fn
    assert own_collate(TensorDataset(torch.zeros(2, 3))) is None
    ids, mask, _ = next(iter(batch_loader(Subset(data, [1, 0]), batch_size=2)))
    assert ids.tolist() == [[3, 0], [1, 2]] and mask.tolist() == [[1, 0], [1, 1]]
    other = PaddedPerBatch([torch.tensor([4])], [1])  # another dataset padding with the same id
    ids, mask, labels = next(iter(batch_loader(ConcatDataset([data, Subset(other, [0])]), batch_size=3)))
    assert ids.tolist() == [[1, 2], [3, 0], [4, 0]] and labels.tolist() == [0, 1, 1]
    for mixed, kinds in ((ConcatDataset([data, TensorDataset(torch.zeros(2, 2, dtype=torch.long))]),
                          "PaddedPerBatch, TensorDataset"),
                         (ConcatDataset([data, PaddedPerBatch([torch.tensor([4])], [1], pad_token_id=9)]),
                          "PaddedPerBatch")):
        with pytest.raises(ValueError, match="^" + re.escape(
                f"`train_dataset` joins datasets that batch differently ({kinds}: 2 different collate functions, "
                "or some with one and some without). Pass a DataLoader of it with the `collate_fn` that batches "
                "all of its examples.")):
            batch_loader(mixed, 2, "train_dataset")
        check_collate(DataLoader(mixed, batch_size=1), "train_dataset")  # the user's loader decides: accepted


def test_a_subclass_collate_and_a_changed_pad_id_are_used():
    class Tagged(PaddedPerBatch):
        def collate_fn(self, examples):
            return "tagged"

    assert Tagged([torch.tensor([1])], [0]).batch() == "tagged"
    data = PaddedPerBatch([torch.tensor([1, 2]), torch.tensor([3])], [0, 1])
    data.pad_token_id = 7
    assert data.batch()[0].tolist() == [[1, 2], [3, 7]]


def test_scores_equal_those_of_padding_the_whole_dataset(bert, tmp_path):
    train, test = per_batch(bert.train), per_batch(bert.test)
    loss = nn.CrossEntropyLoss(reduction="sum")
    padded = TracInWE(bert.model, bert.train, bert.checkpoints, loss_fn=loss, batch_size=5)
    batched = TracInWE(bert.model, train, bert.checkpoints, loss_fn=loss, batch_size=5)
    assert {batch[0].shape[1] for batch in batched.train_dataloader} != {bert.train.tensors[0].shape[1]}
    expected = padded.influence(bert.test_batch())
    assert_close(batched.influence(test.batch()), expected)
    top = batched.influence(test.batch(), k=4)
    assert torch.equal(top.indices, stable_top(expected, 4)[0])
    assert_close(batched.self_influence(), padded.self_influence())
    for row, expected_row in zip(batched.word_influence(test.batch(), [0, 7]),
                                 padded.word_influence(bert.test_batch(), [0, 7])):
        for words, expected_words in zip(row, expected_row):
            assert words.token_ids.tolist() == expected_words.token_ids.tolist()
            torch.testing.assert_close(words.scores, expected_words.scores, rtol=1e-9, atol=1e-12)
    batched.build_index(str(tmp_path / "index"))
    assert_close(batched.influence(test.batch()), expected)


def test_captum_methods_in_compare_batch_it_with_its_padding(bert):
    train, test = per_batch(bert.train), per_batch(bert.test)
    names = ["TracInWE", "TracInCPFast"]

    def scores(train_dataset, inputs):
        comparison = compare_influence_methods(
            bert.model, train_dataset, bert.checkpoints, inputs, nn.CrossEntropyLoss(), "model.classifier",
            methods=names, batch_size=5)
        return {name: comparison.results[name].scores for name in names}

    batched, padded = scores(train, test.batch()), scores(bert.train, bert.test_batch())
    for name in names:
        assert_close(batched[name], padded[name], rtol=1e-8)


def test_fine_tuning_and_predictions_pad_per_batch(bert):
    train = per_batch(bert.train)
    model = bert.model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        torch.manual_seed(0)
        fine_tune(model, Subset(train, list(range(8))), None, epochs=1, batch_size=4, show_progress=False)
        tuned = predict_proba(model, train, batch_size=5)
        model.load_state_dict(state)
        torch.manual_seed(0)
        fine_tune(model, Subset(bert.train, list(range(8))), None, epochs=1, batch_size=4, show_progress=False)
        assert_close(tuned, predict_proba(model, bert.train, batch_size=5), rtol=1e-8)
    finally:
        model.load_state_dict(state)


def test_encode_per_batch_is_the_longest_padding_cut_per_text():
    from captum_tracin_we.data import load_minilm_classifier

    _, tokenizer = load_minilm_classifier(2, num_hidden_layers=1)
    texts, labels = ["a fine film", "bad", "a long and rather dull film"], [1, 0, 0]
    longest = encode(tokenizer, texts, labels, max_length=16)
    batched = encode(tokenizer, texts, labels, max_length=16, padding="batch")
    assert isinstance(batched, PaddedPerBatch) and batched.lengths.tolist() == [5, 3, 8]
    for got, expected in zip(batched.batch(), longest.tensors):
        assert torch.equal(got, expected)
    with pytest.raises(ValueError, match=re.escape("`padding` must be one of ('longest', 'batch'), got 'max'.")):
        encode(tokenizer, texts, labels, padding="max")


def test_a_loader_without_its_padding_is_refused_by_name_only_where_it_cannot_stack(bert):
    train, test = per_batch(bert.train), per_batch(bert.test)
    loss = nn.CrossEntropyLoss(reduction="sum")
    message = ("is a DataLoader of {what}, which brings its own `collate_fn` to pad texts of different lengths, but "
               "the DataLoader batches them with PyTorch's default collation, which cannot stack them (batch 0 holds "
               "texts of {lengths} tokens). Pass `collate_fn=` the PaddedPerBatch's `collate_fn` to the DataLoader, "
               "or {other}.")
    lengths = ", ".join(map(str, train.lengths[:5].unique().tolist()))
    with pytest.raises(ValueError, match="^" + re.escape("`train_dataset` " + message.format(
            what="a PaddedPerBatch", lengths=lengths, other="the dataset itself with `batch_size=`"))):
        TracInWE(bert.model, DataLoader(train, batch_size=5), bert.checkpoints, loss_fn=loss)
    method = TracInWE(bert.model, train, bert.checkpoints, loss_fn=loss, batch_size=5)
    lengths = ", ".join(map(str, test.lengths[:2].unique().tolist()))
    with pytest.raises(ValueError, match="^" + re.escape("`inputs` " + message.format(
            what="a Subset of a PaddedPerBatch", lengths=lengths,
            other="the test examples as one padded batch (a PaddedPerBatch's `batch(indices)`)"))):
        method.influence(DataLoader(Subset(test, [0, 1]), batch_size=2))
    with pytest.raises(TypeError, match=re.escape(
            "Each batch must be a tuple `(*model_inputs, labels)`, got PaddedPerBatch. Pass a PaddedPerBatch as one "
            "batch, `dataset.batch()` (or `dataset.batch(indices)`), or as a DataLoader, "
            "`dataset.loader(batch_size)`.")):
        method.influence(test)
    expected = method.influence(test.batch())
    assert_close(method.influence(test.loader(batch_size=3)), expected)  # what they advise
    # batches the default collation can stack are the user's to choose: one text each, or texts of one length
    assert_close(method.influence(DataLoader(test, batch_size=1)), expected)
    assert_close(TracInWE(bert.model, DataLoader(train, batch_size=1), bert.checkpoints, loss_fn=loss).influence(
        test.batch()), expected)
    common = test.lengths.mode().values
    same = (test.lengths == common).nonzero().flatten().tolist()
    assert len(same) >= 2
    assert_close(method.influence(DataLoader(Subset(test, same), batch_size=len(same))), expected[same])


def test_a_concatenation_of_per_batch_datasets_is_padded_per_batch(bert):
    train, test = per_batch(bert.train), per_batch(bert.test)
    loss = nn.CrossEntropyLoss(reduction="sum")
    method = TracInWE(bert.model, train, bert.checkpoints, loss_fn=loss, batch_size=5)
    twice = TracInWE(bert.model, ConcatDataset([train, train]), bert.checkpoints, loss_fn=loss, batch_size=2)
    expected = method.influence(test.batch())
    assert_close(twice.influence(test.batch()), torch.cat([expected, expected], dim=1))
