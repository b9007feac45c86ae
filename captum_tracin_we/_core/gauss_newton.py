r"""
Gauss-Newton-vector products of the training loss restricted to the
word-embedding matrix E, for the ASTRA refinement of `InfluenceWE` (DESIGN.md
section 7):

    H v = (1/n) sum_z J_z^T H_out(z) J_z v,

with J_z the Jacobian of example z's outputs with respect to E and H_out the
Hessian of its loss in the outputs. ``J_z v`` is one forward pass in forward
mode (scaled dot-product attention runs its math kernel there, the fused ones
have no forward-mode derivative), whose tangent at each embedding output is v's
row of its token (times the lookup's scale); ``J_z^T u`` is the usual backward
pass of ``<outputs, u>`` at the embedding outputs, summed per token. A vector
over E is a ``TokenGradients`` of one example whose rows are the tokens it
touches, so nothing of size V x d is built.
"""

from contextlib import contextmanager
from typing import Any, Iterable, Iterator, List, Tuple

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor
from torch.nn import Module
from torch.nn.attention import sdpa_kernel, SDPBackend

from captum_tracin_we._core.embedding_gradients import (
    batch_token_gradients,
    EmbeddingTap,
    split_batch,
)
from captum_tracin_we._core.token_gradients import TokenGradients
from captum_tracin_we._utils.modules import is_token_ids

# the losses whose Hessian in the outputs is known in closed form
GAUSS_NEWTON_LOSSES = (torch.nn.CrossEntropyLoss, torch.nn.MSELoss)


def check_gauss_newton_loss(loss_fn: Any, arg_name: str) -> None:
    r"""Refuses a loss whose output Hessian this module does not know."""
    if not isinstance(loss_fn, GAUSS_NEWTON_LOSSES):
        raise ValueError(
            f"`refinement_steps` needs the Gauss-Newton matrix of the loss, which InfluenceWE knows for "
            f"torch.nn.CrossEntropyLoss and torch.nn.MSELoss; `{arg_name}` is "
            f"{type(loss_fn).__name__ if loss_fn is not None else 'None'}. Pass one of them, or "
            "`refinement_steps=0`."
        )
    if isinstance(loss_fn, torch.nn.CrossEntropyLoss) and loss_fn.weight is not None:
        raise ValueError(
            f"`refinement_steps` does not support a CrossEntropyLoss with class `weight`s in `{arg_name}`; "
            "pass one without, or `refinement_steps=0`."
        )


def output_hessian_times(loss_fn: Module, outputs: Tensor, labels: Any, u: Tensor) -> Tensor:
    r"""H_out u per example: softmax's ``diag(p) - p p^T`` for cross-entropy, 2 I for squared error."""
    if isinstance(loss_fn, torch.nn.MSELoss):
        return 2.0 * u
    p = outputs.detach().softmax(dim=1)  # the class dimension of cross-entropy
    hu = p * u - p * (p * u).sum(dim=1, keepdim=True)
    if isinstance(labels, Tensor) and not labels.is_floating_point() and labels.dim() == hu.dim() - 1:
        # class indices, (N, ...) for outputs (N, C, ...): positions labelled ignore_index have no loss
        hu = hu * (labels != loss_fn.ignore_index).unsqueeze(1).to(hu.dtype)
    return hu


def add_rows(terms: Iterable[Tuple[float, TokenGradients]]) -> TokenGradients:
    r"""`sum coefficient * vector` of one-example vectors over E, one row per token touched."""
    parts = [TokenGradients(v.offsets, v.token_ids, v.grads * coefficient) for coefficient, v in terms]
    return TokenGradients.concat(parts).summed()


def rows_at(vector: TokenGradients, token_ids: Tensor) -> Tensor:
    r"""The rows of a one-example vector for `token_ids` (any shape), zeros for tokens it lacks."""
    flat = token_ids.reshape(-1).long()
    dim = vector.grads.shape[1]
    if not vector.token_ids.numel():
        return vector.grads.new_zeros(*token_ids.shape, dim)
    position = torch.searchsorted(vector.token_ids, flat).clamp_(max=vector.token_ids.numel() - 1)
    found = (vector.token_ids[position] == flat).unsqueeze(1)
    return (vector.grads[position] * found).reshape(*token_ids.shape, dim)


@contextmanager
def _tangents(tap: EmbeddingTap, vector: TokenGradients) -> Iterator[None]:
    r"""Makes every lookup of E return dual embeddings whose tangent is `vector`'s rows (times the scale)."""

    def dual(module: Module, args: Tuple[Any, ...], output: Tensor) -> Any:
        ids = args[0] if args else None
        if not is_token_ids(ids):
            return None  # a tied output projection: not a lookup
        scale = tap.output_scale(module, ids, output, module.weight.detach())
        tangent = rows_at(vector, ids).to(device=output.device, dtype=output.dtype) * scale
        padding_idx = getattr(module, "padding_idx", None)
        if padding_idx is not None:  # the padding row gets no gradient, so it is no direction of E
            tangent = tangent * (ids != padding_idx).unsqueeze(-1)
        return forward_ad.make_dual(output.detach(), tangent)

    handles = [module.register_forward_hook(dual) for module in tap.modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def gauss_newton_times(
    model: Module,
    tap: EmbeddingTap,
    batches: Iterable[Tuple[Any, Any]],
    loss_fn: Module,
    vector: TokenGradients,
    excluded_token_ids: Tensor,
    context: str = "",
) -> TokenGradients:
    r"""
    ``H v`` over the training `batches` (each with its examples' indices), for
    the training loss `loss_fn` (a per-example copy of a cross-entropy or MSE
    loss): the mean over the examples of the batches given, so a sample of the
    training batches gives the sample's Gauss-Newton matrix.
    """
    parts: List[TokenGradients] = []
    num_examples = 0
    for indices, batch in batches:
        num_examples += len(indices)
        inputs, labels = split_batch(batch, needs_labels=True)
        with torch.no_grad(), forward_ad.dual_level(), _tangents(tap, vector), sdpa_kernel(SDPBackend.MATH):
            outputs = model(*inputs)
            jv = forward_ad.unpack_dual(outputs).tangent
        jv = torch.zeros_like(outputs) if jv is None else jv
        u = output_hessian_times(loss_fn, outputs, labels, jv).detach()

        def linear(out: Tensor, _labels: Any, u: Tensor = u) -> Tensor:
            return (out * u).reshape(out.shape[0], -1).sum(dim=1)

        rows = batch_token_gradients(
            model, tap, batch, linear, "loss_fn", "train_dataset", excluded_token_ids, indices, context
        )
        parts.append(rows.summed())
    return add_rows([(1.0 / num_examples, part) for part in parts])
