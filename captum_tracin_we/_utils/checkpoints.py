r"""
Saving and loading checkpoints for TracInWE.

Format: a file written by ``torch.save`` holding either a plain state dict, or a
dict ``{"state_dict": <state dict>, "learning_rate": <float>}``. A plain state
dict may also carry a ``"learning_rate"`` entry (Captum's convention); the
learning rate defaults to 1.0. Only tensors, numbers and strings are stored, so
the file loads with ``torch.load(weights_only=True)``.
"""

import math
import numbers
from typing import Any, Dict, Optional

import torch
from torch import nn, Tensor
from torch.nn import Module

from captum_tracin_we._utils.text import shorten


def save_checkpoint(model: Module, path: str, learning_rate: float = 1.0) -> None:
    r"""
    Saves ``model``'s state dict and the learning rate used after it, in the
    format ``load_checkpoint`` reads.

    Args:
        model (torch.nn.Module): the model whose parameters to save.
        path (str): the file to write.
        learning_rate (float, optional): the learning rate the checkpoint's
                influence is weighted by. Default: 1.0
    """
    rate = check_learning_rate(learning_rate, "`learning_rate`")
    torch.save({"state_dict": model.state_dict(), "learning_rate": rate}, path)


def check_learning_rate(value: Any, source: str) -> float:
    r"""
    ``value`` as a float, if it is a finite real number >= 0: a Python or numpy
    number, or a 0-d real tensor. Otherwise a ``TypeError`` or ``ValueError``
    whose message starts with ``source``, which names where the value came from.
    """
    if isinstance(value, Tensor):
        if value.dim() == 0 and not value.is_complex() and value.dtype != torch.bool:
            value = float(value)
        else:
            kind = f"a {value.dtype} tensor of shape {tuple(value.shape)}"
            raise TypeError(f"{source} must be a real number or a 0-d tensor, got {kind}.")
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(
            f"{source} must be a real number or a 0-d tensor, got {type(value).__name__} "
            f"{shorten(repr(value))}."
        )
    rate = float(value)
    if not math.isfinite(rate) or rate < 0:
        raise ValueError(
            f"{source} is {rate}, but each checkpoint's influence is weighted by its learning "
            "rate, which must be a finite number >= 0."
        )
    return rate


def _model_device(model: Module) -> Optional[torch.device]:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return None


def load_checkpoint(model: Module, path: str) -> float:
    r"""
    Loads a checkpoint into ``model`` and returns its learning rate; the default
    ``checkpoints_load_func`` of ``TracInWE``.

    The file is read with ``torch.load(weights_only=True)`` (no code runs on
    load) and mapped to the model's device. A ``"module."`` prefix left by
    ``nn.DataParallel`` is removed, and a checkpoint saved from a Hugging Face
    model (``save_checkpoint(hf_model, ...)``, ``hf_model.state_dict()``) loads
    into the ``HuggingFaceClassifier`` that wraps it (its keys gain the
    wrapper's ``"model."`` prefix), and the other way round. The stored
    learning rate must be a finite number >= 0.

    Args:
        model (torch.nn.Module): the model to load the parameters into.
        path (str): a file in the format written by ``save_checkpoint``, or a
                plain state dict.

    Returns:
        learning_rate (float): the stored learning rate, or 1.0.
    """
    try:
        checkpoint = torch.load(path, map_location=_model_device(model), weights_only=True)
    except Exception as error:
        raise ValueError(
            f"Cannot load checkpoint {path!r} with torch.load(weights_only=True). "
            "Save checkpoints as state dicts, e.g. with "
            "`captum_tracin_we.save_checkpoint`, or pass your own "
            f"`checkpoints_load_func`. PyTorch said: {error}"
        ) from error
    if not isinstance(checkpoint, dict):
        raise ValueError(
            f"Checkpoint {path!r} holds a {type(checkpoint).__name__}, not a state "
            "dict; save it with `captum_tracin_we.save_checkpoint`."
        )
    checkpoint = dict(checkpoint)
    learning_rate = check_learning_rate(
        checkpoint.pop("learning_rate", 1.0), f"The learning rate stored in checkpoint {path!r}"
    )
    state_dict: Dict[str, Any] = checkpoint.get("state_dict", checkpoint)
    target = model.module if isinstance(model, nn.DataParallel) else model
    state_dict = _matching_prefix(state_dict, set(target.state_dict()))
    try:
        target.load_state_dict(state_dict)
    except RuntimeError as error:
        raise ValueError(
            f"Checkpoint {path!r} does not match the model given to TracInWE; pass "
            f"checkpoints saved from this model's architecture. PyTorch said: {error}"
        ) from error
    return learning_rate


# prefixes that wrappers add to a model's state dict keys: nn.DataParallel's
# "module.", and "model." of `HuggingFaceClassifier` (a checkpoint saved from the
# Hugging Face model it wraps, as fine-tuning scripts do, has no prefix)
_WRAPPER_PREFIXES = ("module.", "model.")


def _matching_prefix(state_dict: Dict[str, Any], model_keys: set) -> Dict[str, Any]:
    r"""
    ``state_dict`` with a wrapper's key prefix removed or added where that makes
    its keys exactly the model's; as it is otherwise.
    """
    keys = set(state_dict)
    if keys == model_keys:
        return state_dict
    for prefix in _WRAPPER_PREFIXES:
        if all(key.startswith(prefix) for key in keys):
            stripped = {key[len(prefix):]: value for key, value in state_dict.items()}
            if set(stripped) == model_keys:
                return stripped
        if {prefix + key for key in keys} == model_keys:
            return {prefix + key: value for key, value in state_dict.items()}
    return state_dict
