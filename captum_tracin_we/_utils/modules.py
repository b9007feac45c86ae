r"""Finding the word-embedding module of a model."""

from typing import List, Optional, Tuple, Union

from torch import nn
from torch.nn import Module


def embedding_modules(model: Module) -> List[str]:
    r"""Dotted names of the ``nn.Embedding`` modules of ``model``."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Embedding)]


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
