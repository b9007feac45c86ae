r"""
Saving and loading checkpoints for TracInWE.

Format: a file written by ``torch.save`` holding either a plain state dict, or a
dict ``{"state_dict": <state dict>, "learning_rate": <float>}``. A plain state
dict may also carry a ``"learning_rate"`` entry (Captum's convention); the
learning rate defaults to 1.0. Only tensors, numbers and strings are stored, so
the file loads with ``torch.load(weights_only=True)``.
"""

from typing import Any, Dict, Optional

import torch
from torch import nn
from torch.nn import Module


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
    torch.save({"state_dict": model.state_dict(), "learning_rate": float(learning_rate)}, path)


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
    ``nn.DataParallel`` is removed.

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
    learning_rate = checkpoint.pop("learning_rate", 1.0)
    state_dict: Dict[str, Any] = checkpoint.get("state_dict", checkpoint)
    if all(key.startswith("module.") for key in state_dict):
        state_dict = {key[len("module.") :]: value for key, value in state_dict.items()}
    target = model.module if isinstance(model, nn.DataParallel) else model
    try:
        target.load_state_dict(state_dict)
    except RuntimeError as error:
        raise ValueError(
            f"Checkpoint {path!r} does not match the model given to TracInWE; pass "
            f"checkpoints saved from this model's architecture. PyTorch said: {error}"
        ) from error
    return float(learning_rate)
