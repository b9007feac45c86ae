r"""Finding the word-embedding module of a model, and the modules sharing its matrix."""

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn, Tensor
from torch.nn import Module


def embedding_modules(model: Module) -> List[str]:
    r"""Dotted names of the ``nn.Embedding`` modules of ``model``."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Embedding)]


def is_token_ids(value: Any) -> bool:
    r"""Whether ``value`` is an integer tensor, as token ids are."""
    return isinstance(value, Tensor) and not (
        value.is_floating_point() or value.is_complex() or value.dtype == torch.bool
    )


def resolve_embedding_layer(
    model: Module, embedding_layer: Optional[Union[Module, str]]
) -> Tuple[Module, str]:
    r"""
    The word-embedding module and its dotted name in ``model``.

    ``embedding_layer`` may be a module, a dotted name, or None: then the model's
    ``get_input_embeddings()`` is used if it has one, or its only ``nn.Embedding``.
    """
    names = {id(m): name for name, m in model.named_modules()}
    if isinstance(embedding_layer, str):
        module = dict(model.named_modules()).get(embedding_layer)
        if module is None:
            raise ValueError(
                f"`embedding_layer` {embedding_layer!r} is not a module of the model. "
                f"Its nn.Embedding modules are: {embedding_modules(model)}."
            )
        return module, embedding_layer
    if isinstance(embedding_layer, Module):
        if id(embedding_layer) not in names:
            raise ValueError(
                f"`embedding_layer` ({type(embedding_layer).__name__}) is not a "
                "submodule of the model; pass the model's own module or its name. "
                f"Its nn.Embedding modules are: {embedding_modules(model)}."
            )
        return embedding_layer, names[id(embedding_layer)]
    if embedding_layer is not None:
        raise TypeError(
            "`embedding_layer` must be an nn.Module, a dotted module name or None, "
            f"got {type(embedding_layer).__name__}."
        )
    get_input_embeddings = getattr(model, "get_input_embeddings", None)
    if callable(get_input_embeddings):
        module = get_input_embeddings()
        if isinstance(module, Module) and id(module) in names:
            return module, names[id(module)]
    candidates = embedding_modules(model)
    if len(candidates) == 1:
        return dict(model.named_modules())[candidates[0]], candidates[0]
    raise ValueError(
        "Cannot tell the word-embedding module of the model: it has no "
        f"`get_input_embeddings()` and {len(candidates)} nn.Embedding modules "
        f"({candidates}). Pass `embedding_layer=` with the module or its name."
    )


def describe(module_name: str, embedding_name: str) -> str:
    r"""
    How error messages name a module sharing the word-embedding matrix: the
    subject of a sentence whose verb follows.
    """
    if module_name == embedding_name:
        return f"`embedding_layer` ({embedding_name})"
    return (
        f"`embedding_layer` ({embedding_name}) shares its weight with {module_name}, "
        "which"
    )


def modules_sharing_weight(
    model: Module, embedding: Module, embedding_name: str
) -> Dict[Module, str]:
    r"""
    The modules of ``model`` whose ``weight`` is ``embedding.weight`` (the same
    Parameter), with their dotted names, ``embedding`` included.

    The gradient of a shared matrix is the sum of the gradients through every
    module that uses it (e.g. BART's ``shared``, ``encoder.embed_tokens`` and
    ``decoder.embed_tokens``), so all of them must be hooked.
    """
    weight = getattr(embedding, "weight", None)
    is_matrix = isinstance(weight, Tensor) and weight.dim() == 2
    if not (is_matrix and weight.is_floating_point()):
        raise ValueError(
            f"`embedding_layer` ({embedding_name}, {type(embedding).__name__}) has no "
            "2-D floating point `weight`. Pass as `embedding_layer` the module that "
            "owns the word-embedding matrix as its `weight` and looks token ids up in "
            f"it. The model's nn.Embedding modules are: {embedding_modules(model)}."
        )
    sharing = {
        m: n for n, m in model.named_modules() if getattr(m, "weight", None) is weight
    }
    for module, name in sharing.items():
        if getattr(module, "scale_grad_by_freq", False):
            # the weight gradient is divided by each token's count in the whole
            # mini-batch, so an example's gradient depends on its batch
            raise ValueError(
                f"{describe(name, embedding_name)} has scale_grad_by_freq=True: PyTorch "
                "then divides each row's gradient by the token's frequency in the "
                "mini-batch, so per-example gradients are not defined. Set "
                "`scale_grad_by_freq=False` on it."
            )
    return sharing


def modules_called_with_token_ids(model: Module, inputs: Sequence[Any]) -> List[str]:
    r"""
    Dotted names of the modules owning a 2-D ``weight`` that ``model(*inputs)``
    calls with token ids: the candidates for ``embedding_layer``. Runs one extra
    forward pass, so it is meant for error messages.
    """
    called: List[str] = []

    def recorder(name: str) -> Any:
        def record(module: Module, args: Tuple[Any, ...]) -> None:
            if args and is_token_ids(args[0]) and name not in called:
                called.append(name)

        return record

    handles = [
        m.register_forward_pre_hook(recorder(n))
        for n, m in model.named_modules()
        if isinstance(getattr(m, "weight", None), Tensor) and m.weight.dim() == 2
    ]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return called
