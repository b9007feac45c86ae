r"""
Per-example, per-token gradients at the word-embedding layer, from one forward
and one backward pass per batch.

A forward hook replaces the embedding module's output by a fresh leaf tensor and
remembers the token ids the module was called with. The loss of the batch is
summed over examples and differentiated once with respect to those leaves: as
examples do not interact in a forward pass (the model must be in eval mode), the
gradient at example i's positions is exactly example i's own gradient. Autograd
only runs the part of the graph that leads to the leaves, so no parameter
gradient is ever computed.
"""

from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.nn import Module

from captum_tracin_we._core.token_gradients import TokenGradients

LossFn = Optional[Union[Module, Callable[..., Tensor]]]
REDUCTIONS = ("none", "sum", "mean")


def loss_reduction(loss_fn: LossFn, arg_name: str) -> Optional[str]:
    r"""
    The reduction of ``loss_fn`` read from its ``reduction`` attribute, or None
    when it has none (then it is told from the loss's shape at the first call).
    """
    if loss_fn is None:
        return None
    if not callable(loss_fn):
        raise TypeError(f"`{arg_name}` must be callable, got {type(loss_fn).__name__}.")
    reduction = getattr(loss_fn, "reduction", None)
    if reduction is not None and reduction not in REDUCTIONS:
        raise ValueError(
            f"`{arg_name}.reduction` is {reduction!r}; TracInWE supports "
            f"{', '.join(repr(r) for r in REDUCTIONS)}. Set `{arg_name}.reduction` "
            "to one of them."
        )
    return reduction


def summed_loss(
    out: Tensor,
    labels: Any,
    loss_fn: LossFn,
    reduction: Optional[str],
    arg_name: str,
) -> Tensor:
    r"""
    The sum over the batch of the per-example losses, whatever the reduction of
    ``loss_fn``. Without ``loss_fn`` the model output is the per-example
    quantity, as in Captum's ``TracInCP``.
    """
    if loss_fn is None:
        return out.sum()
    loss = loss_fn(out, labels)
    if reduction is None:
        if loss.dim() == 0:
            raise ValueError(
                f"Cannot tell the reduction of `{arg_name}`: it returned a scalar "
                "and has no `reduction` attribute. Set "
                f"`{arg_name}.reduction = 'sum'` or `'mean'`, or make it return "
                "one loss per example."
            )
        reduction = "none"
    if reduction == "none":
        if loss.dim() == 0 or loss.shape[0] != out.shape[0]:
            raise ValueError(
                f"`{arg_name}` has reduction 'none' but returned a loss of shape "
                f"{tuple(loss.shape)} for a batch of {out.shape[0]} examples; it "
                "must return one loss per example."
            )
        return loss.sum()
    if loss.dim() != 0:
        raise ValueError(
            f"`{arg_name}` has reduction {reduction!r} but returned a loss of shape "
            f"{tuple(loss.shape)}; a reduced loss must be a scalar."
        )
    return loss * out.shape[0] if reduction == "mean" else loss


class EmbeddingTap:
    r"""
    Context manager that hooks ``embedding`` so that each of its calls records
    the token ids and a leaf tensor whose gradient is the gradient at the
    module's output.
    """

    def __init__(self, embedding: Module, embedding_name: str) -> None:
        self.embedding = embedding
        self.embedding_name = embedding_name
        self.token_ids: List[Tensor] = []
        self.leaves: List[Tensor] = []
        self._handles: List[Any] = []

    def _check_ids(self, module: Module, args: Tuple[Any, ...]) -> None:
        ids = args[0] if args else None
        if not isinstance(ids, Tensor):
            raise TypeError(
                f"`embedding_layer` ({self.embedding_name}) was called without a "
                "tensor of token ids as its first argument. Pass as "
                "`embedding_layer` the module that maps token ids to embeddings."
            )
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(
                f"`embedding_layer` ({self.embedding_name}) received {ids.dtype} "
                "inputs, but TracInWE needs integer token ids. Pass integer "
                "(torch.long) `input_ids` in the batches, and as `embedding_layer` "
                "the module that looks up token ids (not one that takes embeddings)."
            )

    def _capture(self, module: Module, args: Tuple[Any, ...], output: Any) -> Tensor:
        if not isinstance(output, Tensor) or not output.is_floating_point():
            raise TypeError(
                f"`embedding_layer` ({self.embedding_name}) must return a floating "
                f"point tensor of embeddings, got {type(output).__name__}."
            )
        # a leaf cuts the graph below the embedding; the clone keeps in-place
        # operations downstream legal
        leaf = output.detach().requires_grad_(True)
        self.token_ids.append(args[0])
        self.leaves.append(leaf)
        return leaf.clone()

    def __enter__(self) -> "EmbeddingTap":
        self._handles = [
            self.embedding.register_forward_pre_hook(self._check_ids),
            self.embedding.register_forward_hook(self._capture),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()


def split_batch(batch: Any, needs_labels: bool) -> Tuple[Tuple[Any, ...], Any]:
    r"""Splits a batch into model inputs and labels (the last element)."""
    if not isinstance(batch, (tuple, list)):
        raise TypeError(
            "Each batch must be a tuple `(*model_inputs, labels)`, got "
            f"{type(batch).__name__}. Wrap single tensors as `(input_ids, labels)`."
        )
    if needs_labels and len(batch) < 2:
        raise ValueError(
            f"A batch has {len(batch)} element(s) but a loss function was given, so "
            "the labels are missing: batches must be `(*model_inputs, labels)`, "
            "with the labels last."
        )
    return tuple(batch[:-1]), batch[-1]


def batch_token_gradients(
    model: Module,
    tap: EmbeddingTap,
    batch: Sequence[Any],
    loss_fn: LossFn,
    reduction: Optional[str],
    loss_arg_name: str,
    excluded_token_ids: Optional[Tensor] = None,
) -> TokenGradients:
    r"""
    The ``TokenGradients`` of one batch: one forward pass, one backward pass.

    Args:
        model (Module): called as ``model(*batch[:-1])``.
        tap (EmbeddingTap): the hook on the word-embedding module.
        batch (tuple): ``(*model_inputs, labels)``.
        loss_fn (Callable or None): the loss, any reduction.
        reduction (str or None): ``loss_reduction(loss_fn)``.
        loss_arg_name (str): the loss's argument name, for error messages.
        excluded_token_ids (Tensor, optional): token ids whose rows are dropped.
    """
    inputs, labels = split_batch(batch, needs_labels=loss_fn is not None)
    tap.token_ids, tap.leaves = [], []
    with tap, torch.enable_grad():
        out = model(*inputs)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"`model` must return a tensor, got {type(out).__name__}. Wrap "
                "Hugging Face models in `captum_tracin_we.HuggingFaceClassifier`."
            )
        if not tap.leaves:
            raise RuntimeError(
                f"`embedding_layer` ({tap.embedding_name}) was not called in the "
                "model's forward pass. Pass the word-embedding module the model uses."
            )
        total = summed_loss(out, labels, loss_fn, reduction, loss_arg_name)
        grads = torch.autograd.grad(total, tap.leaves, allow_unused=True)
    batch_size = out.shape[0] if out.dim() else 1
    ids, pos_grads = [], []
    for token_ids, leaf, grad in zip(tap.token_ids, tap.leaves, grads):
        if token_ids.dim() == 0 or token_ids.shape[0] != batch_size:
            raise ValueError(
                f"`embedding_layer` ({tap.embedding_name}) was called with token ids "
                f"of shape {tuple(token_ids.shape)}, but the model returned "
                f"{batch_size} outputs: TracInWE needs the batch dimension first."
            )
        grad = torch.zeros_like(leaf) if grad is None else grad
        ids.append(token_ids.reshape(batch_size, -1))
        pos_grads.append(grad.reshape(batch_size, -1, grad.shape[-1]))
    token_ids = torch.cat(ids, dim=1)
    keep = None
    if excluded_token_ids is not None and excluded_token_ids.numel():
        keep = ~torch.isin(token_ids, excluded_token_ids.to(token_ids.device))
    return TokenGradients.from_positions(token_ids, torch.cat(pos_grads, dim=1), keep)
