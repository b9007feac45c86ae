r"""
Tokenized texts padded per batch, not to the longest text of the whole dataset.

Padding every text to the dataset's longest makes every forward and backward pass
as long as the longest text (MR: 48 tokens where sentences average 27). A model
that masks padding (a Hugging Face encoder given its attention mask) gives the
same outputs and the same gradients for the real tokens however much padding a
batch has, so per-batch padding changes no score, only the cost.
"""

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

Batch = Tuple[Tensor, Tensor, Tensor]


@dataclass(frozen=True)
class PadToLongest:
    r"""
    The collate function of `PaddedPerBatch`: stacks examples `(input_ids,
    attention_mask, label)`, padded to the longest of them with `pad_token_id`
    (mask 0). Two are equal when they pad with the same id, so the parts of a
    ``ConcatDataset`` of ``PaddedPerBatch``es share one.
    """

    pad_token_id: int = 0

    def __call__(self, examples: Sequence[Batch]) -> Batch:
        longest = max(ids.numel() for ids, _, _ in examples)
        ids = torch.full((len(examples), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(examples), longest, dtype=torch.long)
        for row, (text, _, _) in enumerate(examples):
            ids[row, : text.numel()], mask[row, : text.numel()] = text, 1
        return ids, mask, torch.stack([label for _, _, label in examples])


class PaddedPerBatch(Dataset):
    r"""
    Tokenized texts, each kept at its own length: item i is
    ``(input_ids, attention_mask, label)`` of text i, and `collate_fn` pads a
    batch to its longest text (``pad_token_id``, mask 0), as Hugging Face's
    ``DataCollatorWithPadding`` does. ``TracInWE``, ``InfluenceWE``, ``compare``
    and ``fine_tune`` batch it with its `collate_fn` (also through a
    ``Subset`` or a ``ConcatDataset`` of them); elsewhere use `loader`, and
    `batch` for test inputs.

    Args:
        input_ids (sequence of Tensor): one 1D integer tensor per text.
        labels (sequence of int or Tensor): one label per text.
        pad_token_id (int, optional): the id padding fills in. Default: 0
    """

    def __init__(self, input_ids: Sequence[Tensor], labels: Any, pad_token_id: int = 0) -> None:
        labels = torch.as_tensor(labels, dtype=torch.long)
        if len(input_ids) != len(labels):
            raise ValueError(f"{len(input_ids)} texts but {len(labels)} labels.")
        self.input_ids = [torch.as_tensor(ids, dtype=torch.long).flatten() for ids in input_ids]
        if any(ids.numel() == 0 for ids in self.input_ids):
            raise ValueError("`input_ids` holds an empty text: every text needs at least one token.")
        self.labels = labels
        self.pad_token_id = int(pad_token_id)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> Batch:
        ids = self.input_ids[i]
        return ids, torch.ones_like(ids), self.labels[i]

    @property
    def collate_fn(self) -> PadToLongest:
        r"""Stacks examples, padded to the longest of them (equal for equal pad ids)."""
        return PadToLongest(self.pad_token_id)

    @property
    def lengths(self) -> Tensor:
        r"""The number of tokens of each text."""
        return torch.tensor([ids.numel() for ids in self.input_ids])

    def loader(self, batch_size: int, **kwargs: Any) -> DataLoader:
        r"""A ``DataLoader`` of this dataset that pads per batch."""
        return DataLoader(self, batch_size=batch_size, collate_fn=self.collate_fn, **kwargs)

    def batch(self, indices: Optional[Sequence[int]] = None) -> Batch:
        r"""The texts `indices` (default: all) as one batch, padded to their longest."""
        indices = range(len(self)) if indices is None else indices
        return self.collate_fn([self[i] for i in indices])
