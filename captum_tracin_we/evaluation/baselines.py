r"""
Baselines that rank training examples without gradients, for the evaluations:
the cosine similarity of mean-pooled word embeddings (how alike two texts'
words are, whatever the model learned from them), and label agreement (whether
two examples share a label, nothing else: the control that shows how much of an
LDS the class balance of the subsets explains).
"""

import torch
from torch import Tensor
from torch.nn import Module
from torch.utils.data import DataLoader, Dataset


@torch.no_grad()
def pooled_embeddings(embedding: Module, dataset: Dataset, batch_size: int = 256) -> Tensor:
    r"""
    The mean of each example's word embeddings over its non-padding positions,
    `(n, d)`. Items of `dataset` are `(input_ids, attention_mask, ..., label)`.
    """
    parts = []
    for batch in DataLoader(dataset, batch_size=batch_size):
        ids, mask = batch[0], batch[1].to(torch.float32)
        vectors = embedding(ids) * mask.unsqueeze(-1)
        parts.append(vectors.sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1))
    return torch.cat(parts)


def embedding_similarity(
    embedding: Module, train_dataset: Dataset, test_dataset: Dataset, batch_size: int = 256
) -> Tensor:
    r"""
    Scores `(n_test, n_train)`: the cosine similarity of the test and training
    examples' mean-pooled embeddings (`pooled_embeddings`). Proponents are the
    most similar texts, opponents the least similar.

    Args:

            embedding (torch.nn.Module): The word-embedding module, e.g.
                    `model.get_input_embeddings()`.
            train_dataset, test_dataset (Dataset): Items `(input_ids,
                    attention_mask, ..., label)`.
            batch_size (int, optional): Default: 256
    """
    train = torch.nn.functional.normalize(pooled_embeddings(embedding, train_dataset, batch_size), dim=1)
    test = torch.nn.functional.normalize(pooled_embeddings(embedding, test_dataset, batch_size), dim=1)
    return test @ train.T


def label_agreement(train_labels: Tensor, test_labels: Tensor) -> Tensor:
    r"""
    Scores `(n_test, n_train)`: +1 where the training example has the test
    example's label, -1 elsewhere. On the LDS this predicts a retrained model's
    output from the subset's class balance alone; a method that does not beat it
    adds nothing an example's label does not already say.
    """
    train_labels, test_labels = torch.as_tensor(train_labels), torch.as_tensor(test_labels)
    if train_labels.dim() != 1 or test_labels.dim() != 1:
        raise ValueError(
            f"`train_labels` and `test_labels` must be 1-d (one class per example), got shapes "
            f"{tuple(train_labels.shape)} and {tuple(test_labels.shape)}."
        )
    same = test_labels.unsqueeze(1) == train_labels.unsqueeze(0)
    return same.to(torch.float64) * 2 - 1
