"""
Models, losses and argument types off the beaten path: scores still equal Captum's
dense TracInCP on the embedding layer, or the error names the argument and the fix.
"""

import re

import numpy as np
import pytest
import torch
from captum.influence import TracInCP
from conftest import (
    assert_close,
    BagOfEmbeddings,
    make_setup,
    N_CLASSES,
    SEQ_LEN,
    token_data,
    VOCAB,
    write_checkpoints,
)
from torch import nn
from torch.utils.data import TensorDataset

from captum_tracin_we import HuggingFaceClassifier, load_checkpoint, save_checkpoint, TracInWE

DIM = 6
CE = nn.CrossEntropyLoss(reduction="none")


class Pooled(nn.Module):
    """A given word-embedding module, the mean over positions, a linear layer."""

    def __init__(self, embedding: nn.Module, n_out: int = N_CLASSES) -> None:
        super().__init__()
        self.embedding = embedding
        self.linear = nn.Linear(DIM, n_out)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.tanh(self.embedding(ids).mean(1)))


class ScaledEmbedding(nn.Embedding):
    """Like transformers' BartScaledWordEmbedding: the lookup times `embed_scale`."""

    def __init__(self, embed_scale: float) -> None:
        super().__init__(VOCAB, DIM, padding_idx=0)
        self.embed_scale = embed_scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale


class TimesThree(nn.Embedding):
    """A constant factor without an `embed_scale` attribute: it is fitted."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return 3.0 * super().forward(ids)


class WithPositions(nn.Embedding):
    """Adds position embeddings: not a (scaled) row lookup."""

    def __init__(self) -> None:
        super().__init__(VOCAB, DIM)
        self.positions = nn.Parameter(torch.randn(SEQ_LEN, DIM))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) + self.positions[: ids.shape[1]]


class SharedTables(nn.Module):
    """
    Two nn.Embedding modules with one weight (the second without padding_idx),
    both used, and a third module sharing it that the forward pass never calls.
    """

    def __init__(self) -> None:
        super().__init__()
        self.words = nn.Embedding(VOCAB, DIM, padding_idx=0)
        self.context = nn.Embedding(VOCAB, DIM)
        self.unused = nn.Embedding(VOCAB, DIM)
        self.context.weight = self.unused.weight = self.words.weight
        self.linear = nn.Linear(2 * DIM, N_CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        context = ids.flip(1)  # the same batch of ids, read backwards
        h = torch.cat([self.words(ids).mean(1), self.context(context).max(1).values], 1)
        return self.linear(torch.tanh(h))


def setup_for(model: nn.Module, tmp_path, n_labels: int = N_CLASSES):
    model = model.double().eval()
    train = token_data(12, seed=2, with_mask=False, n_labels=n_labels)
    test = token_data(4, seed=3, with_mask=False, n_labels=n_labels)
    return model, train, test, write_checkpoints(model, tmp_path)


def captum_scores(model, layer, train, test, checkpoints, loss_fn=CE):
    return TracInCP(
        model, train, checkpoints, load_checkpoint, layers=[layer], loss_fn=loss_fn, batch_size=5
    ).influence(test.tensors)


def our_scores(model, train, test, checkpoints, loss_fn=CE, **kwargs):
    return TracInWE(model, train, checkpoints, loss_fn=loss_fn, batch_size=5, **kwargs).influence(
        test.tensors
    )


@pytest.fixture(scope="module")
def boe(tmp_path_factory):
    return make_setup("boe", tmp_path_factory.mktemp("boe"))


# a. embeddings scaled by a constant, and modules that are not row lookups


@pytest.mark.parametrize("embedding", [ScaledEmbedding(2.5), TimesThree(VOCAB, DIM)])
def test_scaled_embedding_equals_dense_tracincp(tmp_path, embedding):
    model, train, test, checkpoints = setup_for(Pooled(embedding), tmp_path)
    expected = captum_scores(model, "embedding", train, test, checkpoints)
    assert_close(our_scores(model, train, test, checkpoints), expected)


def test_embedding_that_is_not_a_lookup(tmp_path):
    model, train, test, checkpoints = setup_for(Pooled(WithPositions()), tmp_path)
    with pytest.raises(ValueError, match=re.escape("`embedding_layer` (embedding) returned outputs that are not rows of its `weight` (nor rows times a constant), so their gradients are not the gradients of the word-embedding matrix. Pass as `embedding_layer` the module that only looks token ids up, such as the nn.Embedding inside the module (positions, norms and other additions come after it).")):
        our_scores(model, train, test, checkpoints)


def test_wrapper_without_weight(tmp_path):
    class Normed(nn.Module):
        def __init__(self):
            super().__init__()
            self.table, self.norm = nn.Embedding(VOCAB, DIM), nn.LayerNorm(DIM)

        def forward(self, ids):
            return self.norm(self.table(ids))

    model, train, _, checkpoints = setup_for(Pooled(Normed()), tmp_path)
    with pytest.raises(ValueError, match=re.escape("`embedding_layer` (embedding, Normed) has no 2-D floating point `weight`. Pass as `embedding_layer` the module that owns the word-embedding matrix as its `weight` and looks token ids up in it. The model's nn.Embedding modules are: ['embedding.table'].")):
        TracInWE(model, train, checkpoints, loss_fn=CE, embedding_layer="embedding")


# b. one weight shared by several modules


def test_shared_weight_sums_over_its_modules(tmp_path):
    model, train, test, checkpoints = setup_for(SharedTables(), tmp_path)
    # Captum differentiates the layer's Parameter, so every module using it counts
    expected = captum_scores(model, "words", train, test, checkpoints)
    assert_close(captum_scores(model, "context", train, test, checkpoints), expected)
    for layer in ["words", "context", "unused"]:
        assert_close(our_scores(model, train, test, checkpoints, embedding_layer=layer), expected)

    # ground truth for one pair at the last checkpoint: autograd on the shared weight
    def weight_grad(ids, label):
        loss = CE(model(ids[None]), label[None]).sum()
        return torch.autograd.grad(loss, model.words.weight)[0]

    lr = load_checkpoint(model, checkpoints[-1])
    pair = (weight_grad(*test[0]) * weight_grad(*train[5])).sum() * lr
    last = our_scores(model, train, test, checkpoints[-1:], embedding_layer="words")
    assert_close(last[0, 5], pair)


def test_tiny_bart_shared_scaled_embeddings(tmp_path):
    from transformers import BartConfig, BartForSequenceClassification

    config = BartConfig(
        vocab_size=VOCAB, d_model=8, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=8,
        decoder_ffn_dim=8, max_position_embeddings=16, num_labels=N_CLASSES,
        scale_embedding=True, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2,
    )
    torch.manual_seed(0)
    model = HuggingFaceClassifier(BartForSequenceClassification(config)).double().eval()
    bart = model.model.model
    assert bart.shared.weight is bart.encoder.embed_tokens.weight is bart.decoder.embed_tokens.weight

    def data(n, seed):  # one end-of-sequence token per example, as BART needs
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, 12, (n, 5), generator=g)
        ids[:, 1] = ids[:, 3]
        ids[:, -1] = 2
        return TensorDataset(ids, torch.ones_like(ids), torch.randint(0, N_CLASSES, (n,), generator=g))

    train, test = data(8, 1), data(3, 2)
    checkpoints = write_checkpoints(model, tmp_path)[:2]
    expected = captum_scores(model, "model.model.shared", train, test, checkpoints)
    # get_input_embeddings() is `shared`, which BART never calls itself
    assert_close(our_scores(model, train, test, checkpoints), expected)


# c. the reduction of PyTorch losses


def test_mean_of_weighted_and_ignoring_cross_entropy(tmp_path):
    model, train, test, checkpoints = setup_for(BagOfEmbeddings(), tmp_path)
    weight = torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)
    for kwargs in [dict(weight=weight), dict(ignore_index=1)]:
        expected = captum_scores(
            model, "embedding", train, test, checkpoints, nn.CrossEntropyLoss(reduction="none", **kwargs)
        )
        mean = nn.CrossEntropyLoss(reduction="mean", **kwargs)
        assert_close(our_scores(model, train, test, checkpoints, mean), expected)
        assert mean.reduction == "mean"  # the user's loss is left as it was


def test_mean_squared_error_over_two_outputs(tmp_path):
    model, _, _, checkpoints = setup_for(Pooled(nn.Embedding(VOCAB, DIM), n_out=2), tmp_path)
    train, test = (
        TensorDataset(data.tensors[0], torch.randn(len(data), 2, dtype=torch.float64))
        for data in (token_data(12, 2, False), token_data(4, 3, False))
    )
    expected = captum_scores(model, "embedding", train, test, checkpoints, nn.MSELoss(reduction="none"))
    assert_close(our_scores(model, train, test, checkpoints, nn.MSELoss(reduction="mean")), expected)


# d. nn.Embedding options


def test_scale_grad_by_freq_is_refused(boe):
    model = SharedTables()
    model.context.scale_grad_by_freq = True
    with pytest.raises(ValueError, match=re.escape("`embedding_layer` (words) shares its weight with context, which has scale_grad_by_freq=True: PyTorch then divides each row's gradient by the token's frequency in the mini-batch, so per-example gradients are not defined. Set `scale_grad_by_freq=False` on it.")):
        TracInWE(model, boe.train, boe.checkpoints, loss_fn=CE, embedding_layer="words")


def test_sparse_embedding_equals_dense_tracincp(tmp_path):
    torch.manual_seed(0)
    dense, train, test, checkpoints = setup_for(Pooled(nn.Embedding(VOCAB, DIM)), tmp_path)
    sparse = Pooled(nn.Embedding(VOCAB, DIM, sparse=True)).double().eval()
    expected = captum_scores(dense, "embedding", train, test, checkpoints)
    assert_close(our_scores(sparse, train, test, checkpoints), expected)


# e, f. modules that do not return one embedding per token; sequence-first ids


def test_embedding_bag_is_refused(tmp_path):
    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.bag, self.linear = nn.EmbeddingBag(VOCAB, DIM), nn.Linear(DIM, N_CLASSES)

        def forward(self, ids):
            return self.linear(self.bag(ids))

    model, train, test, checkpoints = setup_for(Bag(), tmp_path)
    with pytest.raises(ValueError, match=re.escape("`embedding_layer` (bag) returned an output of shape (4, 6) for token ids of shape (4, 7); TracInWE needs one embedding per token id, of shape (4, 7, 6). Pass as `embedding_layer` a module that looks each token id up, such as an nn.Embedding (not an nn.EmbeddingBag or a module that pools the embeddings).")):
        our_scores(model, train, test, checkpoints, embedding_layer="bag")


def test_sequence_first_ids_are_refused(boe):
    class SequenceFirst(BagOfEmbeddings):
        def forward(self, ids):  # looks up (T, B) ids, as sequence-first models do
            return self.linear(self.embedding(ids.t()).mean(0))

    model = SequenceFirst().double().eval()
    tracin = TracInWE(model, boe.train, boe.checkpoints, loss_fn=CE, batch_size=5)
    with pytest.raises(ValueError, match=re.escape("`embedding_layer` (embedding) was called with token ids of shape (7, 5), but the model returned 5 outputs: TracInWE needs the batch dimension first.")):
        tracin.self_influence()


# g. Captum's keyword


def test_self_influence_accepts_outer_loop_by_checkpoints(boe):
    tracin = TracInWE(boe.model, boe.train, boe.checkpoints, loss_fn=CE, batch_size=5)
    assert torch.equal(tracin.self_influence(outer_loop_by_checkpoints=True), tracin.self_influence())


# h, i, j. argument types


@pytest.mark.parametrize(
    "ids", [[5, 7], {5, 7}, torch.tensor([5, 7]), np.array([5, 7]), (np.int64(5), torch.tensor(7))]
)
def test_exclude_token_ids_types(boe, ids):
    expected = TracInWE(boe.model, boe.train, boe.checkpoints, loss_fn=CE, exclude_token_ids=[5, 7])
    tracin = TracInWE(boe.model, boe.train, boe.checkpoints, loss_fn=CE, exclude_token_ids=ids)
    assert tracin.excluded_token_ids.tolist() == [0, 5, 7]  # 0 is the padding_idx
    assert torch.equal(tracin.self_influence(), expected.self_influence())


@pytest.mark.parametrize(
    "ids, shown",
    [([5, 1.5], "1.5"), (torch.tensor([5.0]), "tensor(5.)"), ([True], "True"), (3.5, "3.5")],
)
def test_exclude_token_ids_must_be_integers(boe, ids, shown):
    with pytest.raises(TypeError, match=re.escape(f"`exclude_token_ids` must hold integer token ids, got {shown}.")):
        TracInWE(boe.model, boe.train, boe.checkpoints, loss_fn=CE, exclude_token_ids=ids)


@pytest.mark.parametrize(
    "indices",
    [
        [[3, 0]] * 4,
        np.array([[3, 0]] * 4),
        torch.tensor([[3, 0]] * 4),
        [np.int64(3), torch.tensor(0)],
        np.array([3, 0]),
    ],
)
def test_train_indices_types(boe, indices):
    tracin = TracInWE(boe.model, boe.train, boe.checkpoints, loss_fn=CE, batch_size=5)
    expected = tracin.word_influence(boe.test_batch(), [3, 0])
    words = tracin.word_influence(boe.test_batch(), indices)
    for got_row, expected_row in zip(words, expected):
        assert [w.train_index for w in got_row] == [3, 0]
        for got, want in zip(got_row, expected_row):
            assert torch.equal(got.token_ids, want.token_ids) and torch.equal(got.scores, want.scores)


def test_train_indices_out_of_range(boe):
    tracin = TracInWE(boe.model, boe.train, boe.checkpoints, loss_fn=CE, batch_size=5)
    with pytest.raises(IndexError, match=re.escape("`train_indices` holds 12, but `train_dataset` has only 12 examples: valid indices are 0 to 11.")):
        tracin.word_influence(boe.test_batch(), np.array([0, 12]))
    with pytest.raises(IndexError, match=re.escape("`train_indices` holds -1: valid indices are 0 to the number of training examples - 1.")):
        tracin.word_influence(boe.test_batch(), [torch.tensor(-1)])
    with pytest.raises(TypeError, match=re.escape("`train_indices` must hold integer indices, got 1.5.")):
        tracin.word_influence(boe.test_batch(), torch.tensor([1.5]))


@pytest.mark.parametrize("rate", [np.float64(0.5), np.float32(0.5), torch.tensor(0.5), np.int64(1)])
def test_learning_rate_types(boe, rate):
    def loader(returned):
        def load(model, path):
            load_checkpoint(model, path)
            return returned

        return load

    def self_influence(returned):
        return TracInWE(boe.model, boe.train, boe.checkpoints[:1], loader(returned), loss_fn=CE).self_influence()

    assert_close(self_influence(rate), float(rate) * self_influence(1.0))


@pytest.mark.parametrize(
    "rate, shown",
    [("0.5", "str '0.5'"), (torch.tensor([0.5, 1.0]), "a torch.float32 tensor of shape (2,)"), (True, "bool True")],
)
def test_learning_rate_must_be_a_real_number(boe, rate, shown):
    tracin = TracInWE(boe.model, boe.train, ["c"], lambda m, p: rate, loss_fn=CE)
    with pytest.raises(TypeError, match=re.escape(f"The learning rate that `checkpoints_load_func` returned for checkpoint 0 ('c') must be a real number or a 0-d tensor, got {shown}.")):
        tracin.self_influence()
    state = TracInWE(boe.model, boe.train, [boe.model.state_dict()], lambda m, p: rate, loss_fn=CE)
    n = len(boe.model.state_dict())
    with pytest.raises(TypeError, match=re.escape(f"returned for checkpoint 0 (<OrderedDict of {n} entries>) must be a real number or a 0-d tensor, got {shown}.")):
        state.self_influence()


# k. one label per example


def test_label_rows_must_match_token_id_rows(boe):
    tracin = TracInWE(boe.model, boe.train, boe.checkpoints, loss_fn=CE, batch_size=5)
    ids, labels = boe.test_batch()
    with pytest.raises(ValueError, match=re.escape("A batch of `inputs` has 3 rows of labels but 4 rows of token ids; give one label per example, with the labels last in the batch.")):
        tracin.influence((ids, labels[:3]))
    short = TensorDataset(boe.train.tensors[0], boe.train.tensors[1])
    loader = torch.utils.data.DataLoader(short, batch_size=5, collate_fn=lambda b: (torch.stack([x for x, _ in b]), torch.stack([y for _, y in b])[:2]))
    tracin = TracInWE(boe.model, loader, boe.checkpoints, loss_fn=CE, batch_size=None)
    with pytest.raises(ValueError, match=re.escape("A batch of `train_dataset` has 2 rows of labels but 5 rows of token ids")):
        tracin.self_influence()


# l. the default loader maps tensors to the model's device


def test_loader_maps_to_the_models_device(tmp_path, monkeypatch):
    path = str(tmp_path / "cpu.pt")
    save_checkpoint(BagOfEmbeddings(), path, learning_rate=0.5)
    loaded, torch_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loaded.append(torch_load(*a, **k)) or loaded[-1])
    on_meta = BagOfEmbeddings().to("meta")  # a device other than the file's, without a GPU
    assert load_checkpoint(on_meta, path) == 0.5
    assert {t.device.type for t in loaded[0]["state_dict"].values()} == {"meta"}
