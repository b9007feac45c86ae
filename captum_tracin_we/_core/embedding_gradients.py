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

The gradient at an output position is the gradient of the looked-up row of the
embedding matrix E only if the output is that row: each call's output is checked
against ``F.embedding(ids, E)``. A constant factor (e.g. BART's ``embed_scale``)
is allowed and multiplied into the gradients; anything else is an error.
"""

import copy
from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.nn import functional as F, Module
from torch.utils.data import Dataset, TensorDataset

from captum_tracin_we._core.token_gradients import TokenGradients
from captum_tracin_we._utils.modules import (
    describe,
    is_token_ids,
    modules_called_with_token_ids,
    modules_sharing_weight,
)

LossFn = Optional[Union[Module, Callable[..., Tensor]]]
REDUCTIONS = ("none", "sum", "mean")


def per_example_loss(loss_fn: LossFn, arg_name: str) -> LossFn:
    r"""
    ``loss_fn`` made to return one loss per example.

    A loss with a ``reduction`` attribute (PyTorch's losses) is shallow-copied
    with ``reduction="none"``: its "mean" may divide by more than the batch size
    (class weights, ``ignore_index``, several outputs per example), so only the
    unreduced loss, summed over its non-batch dimensions, gives exact
    per-example losses. A callable without that attribute is returned as it is
    and must return per-example losses.
    """
    if loss_fn is None:
        return None
    if isinstance(loss_fn, type):
        raise TypeError(
            f"`{arg_name}` is the class {loss_fn.__name__}, not a loss: pass an instance, "
            f"e.g. `{arg_name}={loss_fn.__name__}()`."
        )
    if not callable(loss_fn):
        raise TypeError(f"`{arg_name}` must be callable, got {type(loss_fn).__name__}.")
    reduction = getattr(loss_fn, "reduction", None)
    if reduction is None or reduction == "none":
        return loss_fn
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"`{arg_name}.reduction` is {reduction!r}; TracInWE supports "
            f"{', '.join(repr(r) for r in REDUCTIONS)}. Set `{arg_name}.reduction` "
            "to one of them."
        )
    unreduced = copy.copy(loss_fn)
    unreduced.reduction = "none"
    return unreduced


def per_example_losses(out: Tensor, labels: Any, loss_fn: LossFn, arg_name: str) -> Tensor:
    r"""
    The per-example losses of ``loss_fn`` (from ``per_example_loss``), summed
    over their non-batch dimensions. Without ``loss_fn`` the model output is the
    per-example quantity, as in Captum's ``TracInCP``.
    """
    if loss_fn is None:
        return out.reshape(out.shape[0], -1).sum(1) if out.dim() else out.reshape(1)
    loss = loss_fn(out, labels)
    if not isinstance(loss, Tensor):
        raise TypeError(f"`{arg_name}` must return a tensor, got {type(loss).__name__}.")
    if loss.dim() == 0 and getattr(loss_fn, "reduction", None) is None:
        raise ValueError(
            f"Cannot tell the reduction of `{arg_name}`: it returned a scalar "
            "and has no `reduction` attribute. Set "
            f"`{arg_name}.reduction = 'sum'` or `'mean'`, or make it return "
            "one loss per example."
        )
    if loss.dim() == 0 or loss.shape[0] != out.shape[0]:
        raise ValueError(
            f"`{arg_name}` with reduction 'none' returned a loss of shape "
            f"{tuple(loss.shape)} for a batch of {out.shape[0]} examples; it must "
            "return one loss per example (the batch dimension first)."
        )
    return loss.reshape(loss.shape[0], -1).sum(1)


class Lookup(NamedTuple):
    r"""
    One call of a module that looks token ids up in the embedding matrix: the
    ids, the leaf standing for its output, the factor ``scale`` with
    ``output == scale * weight[token_ids]``, and the module's ``padding_idx``.
    """

    token_ids: Tensor
    leaf: Tensor
    scale: float
    padding_idx: Optional[int]


class EmbeddingTap:
    r"""
    Context manager that hooks ``embedding`` and every other module of ``model``
    sharing its ``weight``, so that each call with token ids records a
    ``Lookup`` whose leaf's gradient is the gradient at the call's output.
    Calls of a sharing module with anything but token ids (e.g. a tied output
    projection) are not lookups and are left alone.
    """

    def __init__(self, model: Module, embedding: Module, embedding_name: str) -> None:
        self.embedding = embedding
        self.embedding_name = embedding_name
        self.modules = modules_sharing_weight(model, embedding, embedding_name)
        self.lookups: List[Lookup] = []
        self._handles: List[Any] = []
        self.data_name = "inputs"  # the argument the batch comes from, for messages

    def _describe(self, module: Module) -> str:
        return describe(self.modules[module], self.embedding_name)

    def _check_ids(self, module: Module, args: Tuple[Any, ...]) -> None:
        ids = args[0] if args else None
        if module is self.embedding:
            if not isinstance(ids, Tensor):
                raise TypeError(
                    f"`embedding_layer` ({self.embedding_name}) was called without a "
                    "tensor of token ids as its first argument. Pass as "
                    "`embedding_layer` the module that maps token ids to embeddings."
                )
            if not is_token_ids(ids):
                raise TypeError(
                    f"`embedding_layer` ({self.embedding_name}) received {ids.dtype} "
                    "inputs, but TracInWE needs integer token ids. Pass integer "
                    "(torch.long) `input_ids` in the batches, and as `embedding_layer` "
                    "the module that looks up token ids (not one that takes embeddings)."
                )
        if not is_token_ids(ids):
            return  # another use of a shared matrix (a tied output projection)
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(
                f"{self._describe(module)} was given token ids of dtype {ids.dtype}, but "
                "embedding lookups take torch.long (or torch.int32) ids: convert the token "
                f"ids of `{self.data_name}` with `.long()`."
            )
        rows = module.weight.shape[0]
        low, high = (int(ids.min()), int(ids.max())) if ids.numel() else (0, 0)
        if low < 0 or high >= rows:
            raise IndexError(
                f"{self._describe(module)} was given token ids from {low} to "
                f"{high}, but its weight has {rows} rows: token ids must be 0 to "
                f"{rows - 1}. Check that `{self.data_name}` was tokenized with this model's "
                f"tokenizer (a vocabulary of {rows} tokens)."
            )

    def _capture(
        self, module: Module, args: Tuple[Any, ...], output: Any
    ) -> Optional[Tensor]:
        ids = args[0] if args else None
        if not is_token_ids(ids):
            # another use of the shared matrix, such as a tied output projection:
            # TracInWE measures the input side only
            return None
        if not isinstance(output, Tensor) or not output.is_floating_point():
            raise TypeError(
                f"{self._describe(module)} must return a floating point tensor of "
                f"embeddings, got {type(output).__name__}."
            )
        # each module's own `weight`, read now: a checkpoint loader may replace it
        weight = module.weight.detach()
        expected = tuple(ids.shape) + (weight.shape[1],)
        if tuple(output.shape) != expected:
            raise ValueError(
                f"{self._describe(module)} returned an output of shape "
                f"{tuple(output.shape)} for token ids of shape {tuple(ids.shape)}; "
                f"TracInWE needs one embedding per token id, of shape {expected}. "
                "Pass as `embedding_layer` a module that looks each token id up, "
                "such as an nn.Embedding (not an nn.EmbeddingBag or a module that "
                "pools the embeddings)."
            )
        # a leaf cuts the graph below the embedding; the clone keeps in-place
        # operations downstream legal
        leaf = output.detach().requires_grad_(True)
        padding_idx = getattr(module, "padding_idx", None)
        scale = self.output_scale(module, ids, output, weight)
        self.lookups.append(Lookup(ids, leaf, scale, padding_idx))
        return leaf.clone()

    def output_scale(
        self, module: Module, ids: Tensor, output: Tensor, weight: Tensor
    ) -> float:
        r"""
        The factor s with ``output == s * weight[ids]``: the gradient of a row of
        the weight is then s times the gradient at the output. Any other output
        (positions added, a norm, a projection) has gradients that are not the
        weight's, and is an error.
        """
        with torch.no_grad():
            output = output.detach()
            lookup = F.embedding(ids, weight).to(output.dtype)
            if torch.equal(output, lookup):
                return 1.0
            finite = torch.isfinite(lookup)
            if not bool(finite.all()):
                # rows of NaN or inf weights (NaN is never equal to itself): compared
                # elsewhere, and their examples refused with their index once the loss is known
                output, lookup = output.where(finite, 0.0), lookup.where(finite, 0.0)
                if torch.equal(output, lookup):
                    return 1.0
            scale = getattr(module, "embed_scale", None)
            if scale is None:  # least squares fit, in float64 for accuracy
                scale = (output.double() * lookup).sum() / lookup.double().square().sum()
            scale = float(scale)
            tolerance = 16 * torch.finfo(output.dtype).eps
            atol = tolerance * float(output.abs().max())
            if torch.allclose(output, scale * lookup, rtol=tolerance, atol=atol):
                return scale
        raise ValueError(
            f"{self._describe(module)} returned outputs that are not rows of its "
            "`weight` (nor rows times a constant), so their gradients are not the "
            "gradients of the word-embedding matrix. Pass as `embedding_layer` the "
            "module that only looks token ids up, such as the nn.Embedding inside "
            "the module (positions, norms and other additions come after it)."
        )

    def __enter__(self) -> "EmbeddingTap":
        self.lookups = []
        self._handles = [m.register_forward_pre_hook(self._check_ids) for m in self.modules]
        self._handles += [m.register_forward_hook(self._capture) for m in self.modules]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()


def check_batch(batch: Any) -> None:
    r"""Refuses a batch that is not a tuple (or list) `(*model_inputs, labels)`."""
    if not isinstance(batch, (tuple, list)):
        hint = "Wrap single tensors as `(input_ids, labels)`."
        if isinstance(batch, Dataset) and callable(getattr(batch, "batch", None)) and callable(
            getattr(batch, "loader", None)
        ):  # a PaddedPerBatch
            hint = (
                f"Pass a {type(batch).__name__} as one batch, `dataset.batch()` (or `dataset.batch(indices)`), "
                "or as a DataLoader, `dataset.loader(batch_size)`."
            )
        elif isinstance(batch, TensorDataset):
            hint = "Pass a Dataset as a DataLoader, or one batch as a tuple (e.g. `dataset.tensors`)."
        elif isinstance(batch, Dataset):
            hint = "Pass a Dataset as a DataLoader, or one batch as a tuple `(*model_inputs, labels)`."
        elif isinstance(batch, dict):
            hint = "Return tuples from the dataset or `collate_fn`, e.g. `(input_ids, attention_mask, labels)`."
        raise TypeError(
            f"Each batch must be a tuple `(*model_inputs, labels)`, got {type(batch).__name__}. {hint}"
        )


def split_batch(batch: Any, needs_labels: bool) -> Tuple[Tuple[Any, ...], Any]:
    r"""Splits a batch into model inputs and labels (the last element)."""
    check_batch(batch)
    if needs_labels and len(batch) < 2:
        raise ValueError(
            f"A batch has {len(batch)} element(s) but a loss function was given, so "
            "the labels are missing: batches must be `(*model_inputs, labels)`, "
            "with the labels last."
        )
    return tuple(batch[:-1]), batch[-1]


def _check_rows(
    tap: EmbeddingTap, batch_size: int, labels: Any, check_labels: bool, data_name: str
) -> None:
    r"""Token ids and labels must have one row per example, before the loss mixes them."""
    for lookup in tap.lookups:
        if lookup.token_ids.dim() == 0 or lookup.token_ids.shape[0] != batch_size:
            raise ValueError(
                f"`embedding_layer` ({tap.embedding_name}) was called with token ids "
                f"of shape {tuple(lookup.token_ids.shape)}, but the model returned "
                f"{batch_size} outputs: TracInWE needs the batch dimension first."
            )
    if check_labels and isinstance(labels, Tensor) and labels.dim() > 0:
        if labels.shape[0] != batch_size:
            raise ValueError(
                f"A batch of `{data_name}` has {labels.shape[0]} rows of labels but "
                f"{batch_size} rows of token ids; give one label per example, with "
                "the labels last in the batch."
            )


def batch_token_gradients(
    model: Module,
    tap: EmbeddingTap,
    batch: Sequence[Any],
    loss_fn: LossFn,
    loss_arg_name: str,
    data_name: str,
    excluded_token_ids: Optional[Tensor] = None,
    example_indices: Optional[Sequence[int]] = None,
    context: str = "",
    on_positions: Optional[Callable[[Tensor, Tensor], None]] = None,
) -> TokenGradients:
    r"""
    The ``TokenGradients`` of one batch: one forward pass, one backward pass.

    Args:
        model (Module): called as ``model(*batch[:-1])``.
        tap (EmbeddingTap): the hook on the word-embedding module.
        batch (tuple): ``(*model_inputs, labels)``.
        loss_fn (Callable or None): a per-example loss, from ``per_example_loss``.
        loss_arg_name (str): the loss's argument name, for error messages.
        data_name (str): the argument the batch comes from, for error messages.
        excluded_token_ids (Tensor, optional): token ids whose rows are dropped.
        example_indices (Sequence[int], optional): the index in `data_name` of
                each example of the batch, for error messages (default: 0, 1, ...).
        context (str, optional): where the batch is computed (" at checkpoint
                ..."), for error messages.
        on_positions (Callable, optional): called with the token ids and the
                gradient rows of the kept positions, before they are summed
                per token (curvature factors need the positions).
    """
    inputs, labels = split_batch(batch, needs_labels=loss_fn is not None)
    if any(isinstance(item, Tensor) and item.dim() and item.shape[0] == 0 for item in batch):
        raise ValueError(
            f"A batch of `{data_name}` holds no examples (its tensors have 0 rows); give "
            "at least one example."
        )
    tap.data_name = data_name
    where = _batch_place(data_name, example_indices, context)
    with tap, torch.enable_grad():
        with _noted(where, "`model`", _batch_dimension_hint(inputs)):
            out = model(*inputs)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"`model` must return a tensor, got {type(out).__name__}. Wrap "
                "Hugging Face models in `captum_tracin_we.HuggingFaceClassifier`."
            )
        if not tap.lookups:
            raise RuntimeError(
                f"Neither `embedding_layer` ({tap.embedding_name}) nor a module sharing "
                "its weight was called with token ids in the model's forward pass. "
                "The modules called with token ids were: "
                f"{modules_called_with_token_ids(model, inputs)}. Pass as "
                "`embedding_layer` the word-embedding module the model uses."
            )
        batch_size = out.shape[0] if out.dim() else 1
        _check_rows(tap, batch_size, labels, loss_fn is not None, data_name)
        with _noted(where, f"`{loss_arg_name}`"):
            losses = per_example_losses(out, labels, loss_fn, loss_arg_name)
        grads = torch.autograd.grad(
            losses.sum(), [lookup.leaf for lookup in tap.lookups], allow_unused=True
        )
    ids, pos_grads, keeps = [], [], []
    for lookup, grad in zip(tap.lookups, grads):
        grad = torch.zeros_like(lookup.leaf) if grad is None else grad * lookup.scale
        token_ids = lookup.token_ids.reshape(batch_size, -1)
        ids.append(token_ids)
        pos_grads.append(grad.reshape(batch_size, -1, grad.shape[-1]))
        # PyTorch gives the padding row no gradient through this module
        keep = torch.ones_like(token_ids, dtype=torch.bool)
        if lookup.padding_idx is not None:
            keep &= token_ids != lookup.padding_idx
        keeps.append(keep)
    token_ids, keep = torch.cat(ids, dim=1), torch.cat(keeps, dim=1)
    position_grads = torch.cat(pos_grads, dim=1)
    if excluded_token_ids is not None and excluded_token_ids.numel():
        keep &= ~torch.isin(token_ids, excluded_token_ids.to(token_ids.device))
    _check_finite(losses.detach(), position_grads, keep, data_name, example_indices, context)
    if on_positions is not None:
        on_positions(token_ids[keep], position_grads[keep])
    return TokenGradients.from_positions(token_ids, position_grads, keep)


def _batch_place(data_name: str, example_indices: Optional[Sequence[int]], context: str) -> str:
    r"""Which examples a batch holds, and where, for the note added to an error."""
    if example_indices is None or not len(example_indices):
        return f"a batch of `{data_name}`{context}"
    first, last = int(example_indices[0]), int(example_indices[-1])
    return f"the batch of `{data_name}` with examples {first} to {last}{context}"


def _batch_dimension_hint(inputs: Sequence[Any]) -> str:
    first = inputs[0] if inputs else None
    if isinstance(first, Tensor) and first.dim() == 1 and is_token_ids(first):
        return (
            " Its token ids have no batch dimension: a DataLoader with `batch_size=None` "
            "yields single examples; give it a `batch_size`."
        )
    return ""


@contextmanager
def _noted(where: str, what: str, hint: str = "") -> Iterator[None]:
    r"""
    Adds to an error raised inside (by the model or the loss, or a check of
    ours) a note that says on which examples it happened; the error itself, its
    type and message, stay as they are.
    """
    try:
        yield
    except Exception as error:
        note = f"TracInWE: raised while calling {what} on {where}.{hint}"
        if hasattr(error, "add_note") and note not in getattr(error, "__notes__", []):
            error.add_note(note)  # Python 3.11+
        raise


def _check_finite(
    losses: Tensor,
    position_grads: Tensor,
    keep: Tensor,
    data_name: str,
    example_indices: Optional[Sequence[int]],
    context: str,
) -> None:
    r"""
    Refuses a NaN or inf loss or gradient: such an example would be the top
    proponent, the top opponent and the top self influence at once. Only the
    positions that are scored count (padding and excluded tokens are dropped).
    """
    finite_rows = torch.isfinite(position_grads).all(-1) | ~keep
    finite = torch.isfinite(losses) & finite_rows.all(1)
    if bool(finite.all()):
        return
    first = int((~finite).nonzero()[0])
    index = first if example_indices is None else int(example_indices[first])
    loss = float(losses[first])
    what = f"loss ({loss})" if not torch.isfinite(losses[first]) else "gradient at the word embeddings"
    raise ValueError(
        f"Example {index} of `{data_name}` (in the order it is read, as in the scores) has a "
        f"non-finite {what}{context}, which would make it the top proponent, the top opponent "
        "and the top self influence at once. Check its inputs and labels for NaN or inf, and "
        "the checkpoint's weights."
    )
