r"""Fine-tuning that saves TracIn checkpoints, with their learning rates."""

import os
from typing import List, Optional

import torch
from torch import nn
from torch.nn import Module
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm

from captum_tracin_we._utils.checkpoints import save_checkpoint
from captum_tracin_we._utils.loaders import batch_loader


def fine_tune(
    model: Module,
    train_dataset: Dataset,
    output_dir: Optional[str],
    epochs: int = 1,
    learning_rate: float = 5e-5,
    batch_size: int = 16,
    num_checkpoints: int = 3,
    seed: int = 0,
    show_progress: bool = True,
    sampler: Optional[Sampler] = None,
) -> List[str]:
    r"""
    Trains ``model`` with AdamW and a cross-entropy loss, and saves
    ``num_checkpoints`` checkpoints at evenly spaced steps (the last one at the
    end), each with the learning rate, in the format `load_checkpoint` reads.

    Args:
        model (Module): called as `model(*batch[:-1])`, returning logits.
        train_dataset (Dataset): items `(*model_inputs, label)`, batched by
                PyTorch's default or the dataset's own `collate_fn` (e.g.
                `PaddedPerBatch`, padded per batch).
        output_dir (str or None): where checkpoints are written (created if
                needed); None trains without writing any (e.g. the retrainings
                of a case-deletion evaluation).
        epochs (int, optional): passes over the data. Default: 1
        learning_rate (float, optional): AdamW learning rate, constant.
                Default: 5e-5
        batch_size (int, optional): Default: 16
        num_checkpoints (int, optional): Default: 3
        seed (int, optional): seed of the shuffling (and dropout). Default: 0
        show_progress (bool, optional): a progress bar over steps. Default: True
        sampler (Sampler, optional): the order of the examples (e.g.
                `captum_tracin_we.evaluation.SameOrderSampler`, which trains on
                a subset in the order of the full data); None shuffles with
                `seed`. Default: None

    Returns:
        The checkpoint paths, in training order (empty without `output_dir`).
        The model is left in eval mode. The same model, data and seed give the
        same trained weights.
    """
    if num_checkpoints < 1 or epochs < 1:
        raise ValueError("`epochs` and `num_checkpoints` must be at least 1.")
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
    torch.manual_seed(seed)
    if sampler is None:
        loader = batch_loader(
            train_dataset, batch_size, "train_dataset", shuffle=True,
            generator=torch.Generator().manual_seed(seed),
        )
    else:
        loader = batch_loader(train_dataset, batch_size, "train_dataset", sampler=sampler)
    total = epochs * len(loader)
    save_at = {max(1, round(total * (i + 1) / num_checkpoints)) for i in range(num_checkpoints)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    loss_fn = nn.CrossEntropyLoss()
    paths, step = [], 0
    model.train()
    with tqdm(total=total, desc="Fine-tuning", disable=not show_progress) as bar:
        for _ in range(epochs):
            for batch in loader:
                optimizer.zero_grad()
                loss = loss_fn(model(*batch[:-1]), batch[-1])
                loss.backward()
                optimizer.step()
                step += 1
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if output_dir is not None and step in save_at:
                    path = os.path.join(output_dir, f"checkpoint-{step:06d}.pt")
                    save_checkpoint(model, path, learning_rate)
                    paths.append(path)
    model.eval()
    return paths


@torch.no_grad()
def predict_proba(model: Module, dataset: Dataset, batch_size: int = 64) -> torch.Tensor:
    r"""Class probabilities of every example, shape `(n, n_classes)`."""
    model.eval()
    parts = [
        torch.softmax(model(*batch[:-1]), dim=-1)
        for batch in batch_loader(dataset, batch_size=batch_size)
    ]
    return torch.cat(parts)
