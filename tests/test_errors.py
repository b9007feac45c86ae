"""Bad input gets an error that names the argument and the fix."""

import re

import pytest
import torch
from conftest import BagOfEmbeddings, make_setup, TextCNN
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from captum_tracin_we import save_checkpoint, TracInWE

LOSS = nn.CrossEntropyLoss(reduction="sum")


@pytest.fixture(scope="module")
def boe(tmp_path_factory):
    return make_setup("boe", tmp_path_factory.mktemp("boe"))


def make(setup, **kwargs):
    kwargs.setdefault("loss_fn", LOSS)
    return TracInWE(setup.model, kwargs.pop("train", setup.train), kwargs.pop("checkpoints", setup.checkpoints), **kwargs)


def test_unknown_embedding_layer_name(boe):
    with pytest.raises(ValueError, match=re.escape("`embedding_layer` 'encoder.word_emb' is not a module of the model. Its nn.Embedding modules are: ['embedding'].")):
        make(boe, embedding_layer="encoder.word_emb")


def test_no_obvious_embedding(boe):
    class TwoTables(nn.Module):
        def __init__(self):
            super().__init__()
            self.words, self.chars = nn.Embedding(5, 2), nn.Embedding(5, 2)

        def forward(self, ids):
            return self.words(ids).sum(1) + self.chars(ids).sum(1)

    with pytest.raises(ValueError, match=re.escape("Cannot tell the word-embedding module of the model: it has no `get_input_embeddings()` and 2 nn.Embedding modules (['words', 'chars']). Pass `embedding_layer=` with the module or its name.")):
        TracInWE(TwoTables(), boe.train, boe.checkpoints, loss_fn=LOSS)


def test_foreign_embedding_module(boe):
    with pytest.raises(ValueError, match="is not a submodule of the model"):
        make(boe, embedding_layer=nn.Embedding(3, 2))


def test_non_integer_token_ids(boe):
    floats = TensorDataset(boe.train.tensors[0].double(), boe.train.tensors[1])
    tracin = make(boe, train=floats)
    with pytest.raises(TypeError, match=re.escape("`embedding_layer` (embedding) received torch.float64 inputs, but TracInWE needs integer token ids.")):
        tracin.self_influence()


def test_empty_training_set(boe):
    empty = TensorDataset(torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=re.escape("`train_dataset` is empty: TracInWE needs at least one training example.")):
        make(boe, train=empty)


def test_empty_iterable_training_set(boe):
    class Nothing(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([])

    with pytest.warns(UserWarning, match="Unable to determine the number of batches"):
        tracin = make(boe, train=torch.utils.data.DataLoader(Nothing(), batch_size=None))
    with pytest.raises(ValueError, match=re.escape("`train_dataset` yielded no batches")):
        tracin.influence(boe.test_batch())


def test_loss_with_unknown_reduction(boe):
    tracin = make(boe, loss_fn=lambda out, y: F.cross_entropy(out, y))
    with pytest.raises(ValueError, match=re.escape("Cannot tell the reduction of `loss_fn`: it returned a scalar and has no `reduction` attribute. Set `loss_fn.reduction = 'sum'` or `'mean'`, or make it return one loss per example.")):
        tracin.influence(boe.test_batch())


def test_test_loss_with_unknown_reduction_is_named(boe):
    tracin = make(boe, test_loss_fn=lambda out, y: out.sum())
    with pytest.raises(ValueError, match=re.escape("Cannot tell the reduction of `test_loss_fn`")):
        tracin.influence(boe.test_batch())


def test_unsupported_reduction(boe):
    with pytest.raises(ValueError, match=re.escape("`loss_fn.reduction` is 'batchmean'; TracInWE supports 'none', 'sum', 'mean'.")):
        make(boe, loss_fn=nn.KLDivLoss(reduction="batchmean"))


def test_per_example_loss_with_wrong_shape(boe):
    class Flat(nn.Module):
        reduction = "none"

        def forward(self, out, y):
            return F.cross_entropy(out, y, reduction="none").repeat(2)

    with pytest.raises(ValueError, match=re.escape("`loss_fn` with reduction 'none' returned a loss of shape (10,) for a batch of 5 examples; it must return one loss per example (the batch dimension first).")):
        make(boe, loss_fn=Flat(), batch_size=5).self_influence()


@pytest.mark.parametrize("k", [0, -2, 1.5, True])
def test_top_k_tokens_below_one(boe, k):
    with pytest.raises(ValueError, match=re.escape(f"`top_k_tokens` must be an int >= 1 (or None for exact scores), got {k!r}.")):
        make(boe, top_k_tokens=k)


def test_labels_missing(boe):
    ids_only = TensorDataset(boe.train.tensors[0])
    with pytest.raises(ValueError, match=re.escape("A batch has 1 element(s) but a loss function was given, so the labels are missing")):
        make(boe, train=ids_only).self_influence()


def test_mismatched_checkpoint(boe, tmp_path):
    other = tmp_path / "cnn.pt"
    save_checkpoint(TextCNN(), str(other))
    tracin = make(boe, checkpoints=[str(other)])
    with pytest.raises(ValueError, match=re.escape(f"Checkpoint {str(other)!r} does not match the model given to TracInWE")):
        tracin.self_influence()


def test_empty_checkpoints(boe, tmp_path):
    with pytest.raises(ValueError, match=re.escape("`checkpoints` is empty: pass at least one checkpoint.")):
        make(boe, checkpoints=[])
    with pytest.raises(ValueError, match="is not a directory with checkpoint files"):
        make(boe, checkpoints=str(tmp_path))


def test_embedding_not_used_by_model(boe):
    model = BagOfEmbeddings().double().eval()
    model.unused = nn.Embedding(4, 2)
    tracin = TracInWE(
        model, boe.train, ["unused"], lambda m, c: 1.0, embedding_layer="unused", loss_fn=LOSS
    )
    with pytest.raises(RuntimeError, match=re.escape("Neither `embedding_layer` (unused) nor a module sharing its weight was called with token ids in the model's forward pass. The modules called with token ids were: ['embedding']. Pass as `embedding_layer` the word-embedding module the model uses.")):
        tracin.self_influence()


def test_train_index_out_of_range(boe):
    with pytest.raises(IndexError, match=re.escape("`train_indices` holds 99, but `train_dataset` has only 12 examples: valid indices are 0 to 11.")):
        make(boe, batch_size=5).word_influence(boe.test_batch(), [1, 99])


def test_train_indices_rows_must_match_test_examples(boe):
    with pytest.raises(ValueError, match=re.escape("`train_indices` has 2 rows but `inputs` has 4 test examples")):
        make(boe).word_influence(boe.test_batch(), [[1], [2]])


def test_training_mode_warns(boe):
    model = BagOfEmbeddings().double().train()
    with pytest.warns(UserWarning, match=re.escape("`model` is in training mode")):
        TracInWE(model, boe.train, boe.checkpoints, loss_fn=LOSS)


def test_empty_train_indices(boe):
    with pytest.raises(ValueError, match=re.escape("`train_indices` is empty: give at least one training index.")):
        make(boe).word_influence(boe.test_batch(), [])
