"""Tiny models, data and checkpoints shared by the tests, and Captum's dense oracle."""

import importlib.util
import pathlib
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List

import pytest
import torch
from captum.influence import TracInCP
from torch import nn
from torch.utils.data import TensorDataset
from transformers import BertConfig, BertForSequenceClassification

from captum_tracin_we import HuggingFaceClassifier, save_checkpoint

VOCAB, SEQ_LEN, N_TRAIN, N_TEST, N_CLASSES = 30, 7, 12, 4, 3
LEARNING_RATES = (0.5, 1.0, 2.0)


class BagOfEmbeddings(nn.Module):
    """Masked mean of word embeddings, then a linear layer; id 0 is padding."""

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, dim, padding_idx=0)
        self.linear = nn.Linear(dim, N_CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != 0).unsqueeze(-1).to(self.linear.weight.dtype)
        pooled = (self.embedding(ids) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.linear(torch.tanh(pooled))


class TextCNN(nn.Module):
    """Embedding, a convolution, max-pool over time, linear (no padding_idx)."""

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, dim)
        self.conv = nn.Conv1d(dim, 5, kernel_size=3, padding=1)
        self.out = nn.Linear(5, N_CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(self.tokens(ids).transpose(1, 2)))
        return self.out(h.max(dim=2).values)


class TiedLM(nn.Module):
    """Predicts a token from a sentence with the embedding matrix as output layer."""

    def __init__(self, dim: int = 6, tied: bool = True) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, dim)
        self.hidden = nn.Linear(dim, dim)
        self.decoder = nn.Linear(dim, VOCAB, bias=False)
        if tied:
            self.decoder.weight = self.embedding.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.tanh(self.hidden(self.embedding(ids).mean(1))))


def tiny_bert() -> nn.Module:
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=N_CLASSES,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return HuggingFaceClassifier(BertForSequenceClassification(config))


def token_data(n: int, seed: int, with_mask: bool, n_labels: int = N_CLASSES) -> TensorDataset:
    """Random sentences over a small vocabulary (so tokens repeat), padded with 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, SEQ_LEN), generator=g)
    ids[:, 1] = ids[:, 3]  # every sentence repeats a token
    lengths = torch.randint(3, SEQ_LEN + 1, (n,), generator=g)
    mask = torch.arange(SEQ_LEN).unsqueeze(0) < lengths.unsqueeze(1)
    ids = ids.masked_fill(~mask, 0)
    labels = torch.randint(0, n_labels, (n,), generator=g)
    if with_mask:
        return TensorDataset(ids, mask.long(), labels)
    return TensorDataset(ids, labels)


@dataclass
class Setup:
    name: str
    model: nn.Module
    layer: str
    train: TensorDataset
    test: TensorDataset
    checkpoints: List[str]

    def test_batch(self):
        return self.test.tensors


MODELS: Dict[str, Callable[[], nn.Module]] = {
    "bert": tiny_bert,
    "boe": BagOfEmbeddings,
    "cnn": TextCNN,
}
LAYERS = {"bert": "model.bert.embeddings.word_embeddings", "boe": "embedding", "cnn": "tokens"}


def write_checkpoints(model: nn.Module, directory, seed: int = 0) -> List[str]:
    """Three perturbed copies of the model's weights, with distinct learning rates."""
    torch.manual_seed(seed)
    paths = []
    for i, lr in enumerate(LEARNING_RATES):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
        path = str(directory / f"checkpoint-{i}.pt")
        save_checkpoint(model, path, learning_rate=lr)
        paths.append(path)
    return paths


def make_setup(name: str, directory, n_labels: int = N_CLASSES) -> Setup:
    torch.manual_seed(1)
    model = MODELS[name]().double().eval()
    with_mask = name == "bert"
    train = token_data(N_TRAIN, seed=2, with_mask=with_mask, n_labels=n_labels)
    test = token_data(N_TEST, seed=3, with_mask=with_mask, n_labels=n_labels)
    return Setup(name, model, LAYERS[name], train, test, write_checkpoints(model, directory))


@pytest.fixture(scope="session", params=list(MODELS))
def setup(request, tmp_path_factory) -> Setup:
    return make_setup(request.param, tmp_path_factory.mktemp(request.param))


def dense_oracle(setup: Setup):
    """Captum's dense TracInCP on the embedding layer: scores and self influence."""
    tracin = TracInCP(
        setup.model,
        setup.train,
        setup.checkpoints,
        checkpoints_load_func=_load,
        layers=[setup.layer],
        loss_fn=nn.CrossEntropyLoss(reduction="none"),
        batch_size=5,
    )
    return {
        "influence": tracin.influence(setup.test_batch()),
        "self_influence": tracin.self_influence(),
        "test_self_influence": tracin.self_influence(setup.test_batch()),
    }


def _load(model, path):
    from captum_tracin_we import load_checkpoint

    return load_checkpoint(model, path)


@pytest.fixture(scope="session")
def oracle(setup):
    """Captum's dense TracInCP on the embedding layer for this setup."""
    return dense_oracle(setup)


def stable_top(full: torch.Tensor, k: int, proponents: bool = True):
    """The top-k a stable sort of the whole matrix gives (ties go to the smaller training index), as
    `influence(k=...)` defines it: `(indices, values)`."""
    sign = 1 if proponents else -1
    order = torch.sort(sign * full, dim=1, descending=True, stable=True).indices[:, :k]
    return order, full.gather(1, order)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-10) -> None:
    """Relative error (to the largest magnitude) below rtol."""
    assert actual.shape == expected.shape
    scale = expected.abs().max().clamp(min=1e-300)
    error = ((actual - expected).abs().max() / scale).item()
    assert error < rtol, f"relative error {error:.3g} >= {rtol}"


BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name):
    """Imports `benchmarks/<name>.py` (not a package) as a module."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))
