r"""
The toy example: train a tiny bag-of-embeddings sentiment classifier on a
handful of sentences, save three checkpoints with their learning rates, and
print the training sentences that most support and most oppose the prediction
for a test sentence, with the shared words that carry each score. It needs no
download and runs in seconds; the real demo (MiniLM on movie reviews) is
``captum_tracin_we.demo``.

Run it with ``python -m captum_tracin_we toy``.
"""

import argparse
import os
import re
import sys
import tempfile
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import TensorDataset

from captum_tracin_we._core.tracin_we import TracInWE
from captum_tracin_we._utils.checkpoints import save_checkpoint
from captum_tracin_we.visualization import explain, InfluenceExplanation

POSITIVE = [
    "a moving and beautiful film",
    "the acting is wonderful and the story is moving",
    "a funny charming movie with a great cast",
    "beautiful images and a wonderful score",
    "an intelligent and touching drama",
    "the best comedy of the year funny and warm",
    "a great story told with charm",
    "the cast is superb and the script is smart",
    "warm touching and often very funny",
    "a gripping thriller with great performances",
    "smart writing and a beautiful ending",
    "i loved every minute of this charming film",
    "an excellent film that stays with you",
    "the director delivers a wonderful and gripping story",
]
NEGATIVE = [
    "a dull and boring film",
    "the acting is terrible and the story is dull",
    "a tedious movie with a weak cast",
    "ugly images and an annoying score",
    "a stupid and lifeless drama",
    "the worst comedy of the year not funny at all",
    "a boring story told without charm",
    "the cast is awful and the script is stupid",
    "cold tedious and never funny",
    "a predictable thriller with weak performances",
    "lazy writing and a terrible ending",
    "i hated every minute of this boring film",
    "a bad film that wastes your time",
    "the director delivers a dull and predictable story",
]
TEST_SENTENCES = [
    ("a wonderful and touching story", 1),
    ("a dull film with a stupid script", 0),
]
LABELS = ("negative", "positive")


def tokenize(text: str) -> List[str]:
    return re.findall(r"[a-z']+", text.lower())


class Vocabulary:
    r"""Word-level vocabulary; id 0 is padding, id 1 unknown words."""

    def __init__(self, texts: Sequence[str]) -> None:
        words = sorted({w for text in texts for w in tokenize(text)})
        self.words = ["[PAD]", "[UNK]"] + words
        self.ids: Dict[str, int] = {w: i for i, w in enumerate(self.words)}

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        rows = [[self.ids.get(w, 1) for w in tokenize(t)] for t in texts]
        ids = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        return ids

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> List[str]:
        r"""The words of `ids`, as a Hugging Face tokenizer's method of that name."""
        return [self.words[int(i)] for i in ids]


class BagOfWords(nn.Module):
    r"""
    Word embeddings, a per-word tanh layer, the mean over words (padding masked
    out), then a linear classifier.
    """

    def __init__(self, vocab_size: int, dim: int = 16) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.word_layer = nn.Linear(dim, dim)
        self.classifier = nn.Linear(dim, len(LABELS))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != 0).unsqueeze(-1).float()
        words = torch.tanh(self.word_layer(self.embedding(ids)))
        pooled = (words * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.classifier(pooled)


def train(
    model: nn.Module, data: TensorDataset, directory: str, epochs: int, learning_rate: float
) -> List[str]:
    r"""Full-batch SGD; a checkpoint (with its learning rate) after each third."""
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)
    loss_fn = nn.CrossEntropyLoss()
    ids, labels = data.tensors
    paths = []
    for epoch in range(1, epochs + 1):
        model.train()
        optimizer.zero_grad()
        loss_fn(model(ids), labels).backward()
        optimizer.step()
        if epoch % max(1, epochs // 3) == 0 and len(paths) < 3:
            path = os.path.join(directory, f"epoch-{epoch:03d}.pt")
            save_checkpoint(model, path, learning_rate)
            paths.append(path)
    return paths


def run(
    epochs: int = 60, k: int = 3, seed: int = 0, color: bool = False
) -> List[InfluenceExplanation]:
    r"""
    Trains the toy model, prints each test sentence's `k` proponents and
    opponents with their shared words, and returns the explanations.
    """
    torch.manual_seed(seed)
    texts = POSITIVE + NEGATIVE
    vocab = Vocabulary(texts)
    data = TensorDataset(vocab.encode(texts), torch.tensor([1] * len(POSITIVE) + [0] * len(NEGATIVE)))
    model = BagOfWords(len(vocab.words))
    test_ids = vocab.encode([text for text, _ in TEST_SENTENCES])
    test = (test_ids, torch.tensor([label for _, label in TEST_SENTENCES]))
    with tempfile.TemporaryDirectory() as directory:
        checkpoints = train(model, data, directory, epochs, learning_rate=2.0)
        model.eval()
        with torch.no_grad():
            probabilities = torch.softmax(model(test_ids), dim=1)
        predictions = [f"{LABELS[int(p.argmax())]} ({float(p.max()):.2f})" for p in probabilities]
        tracin = TracInWE(model, data, checkpoints, loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=8)
        explanations = explain(tracin, test, vocab, k=k, label_names=LABELS, predictions=predictions)
    for explanation in explanations:
        print("\n" + explanation.to_text(color=color))
    return explanations


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="TracInWE on a tiny sentiment model.")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("-k", type=int, default=3, help="proponents and opponents shown")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run(args.epochs, args.k, args.seed, color=sys.stdout.isatty())
