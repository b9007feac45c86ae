r"""
Saving and loading checkpoints for TracInWE.

Format: a file written by ``torch.save`` holding either a plain state dict, or a
dict ``{"state_dict": <state dict>, "learning_rate": <float>}``. A plain state
dict may also carry a ``"learning_rate"`` entry (Captum's convention); the
learning rate defaults to 1.0. Only tensors, numbers and strings are stored, so
the file loads with ``torch.load(weights_only=True)``.

A Hugging Face ``Trainer`` checkpoint folder (``checkpoint-N/``) loads too: its
weights from ``model.safetensors`` or ``pytorch_model.bin`` (sharded or not,
never unpickling code), its learning rate from ``trainer_state.json``.
"""

import json
import math
import numbers
import os
import re
from typing import Any, Dict, List, Optional, Tuple

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

    A file is read with ``torch.load(weights_only=True)`` (no code runs on
    load) and mapped to the model's device. A ``"module."`` prefix left by
    ``nn.DataParallel`` is removed, and a checkpoint saved from a Hugging Face
    model (``save_checkpoint(hf_model, ...)``, ``hf_model.state_dict()``) loads
    into the ``HuggingFaceClassifier`` that wraps it (its keys gain the
    wrapper's ``"model."`` prefix), and the other way round. The stored
    learning rate must be a finite number >= 0.

    A folder is read as a Hugging Face ``Trainer`` checkpoint
    (``output_dir/checkpoint-N``): the weights from ``model.safetensors`` or,
    without it, ``pytorch_model.bin`` (``weights_only``), or their sharded
    ``.index.json`` forms; the learning rate is the one ``trainer_state.json``
    logged at the checkpoint's step (``global_step``), or, where that step was
    not logged, the one rate of a constant schedule (a schedule whose rates
    differ is refused: the rate at an unlogged step is not known).

    Args:
        model (torch.nn.Module): the model to load the parameters into.
        path (str): a file in the format written by ``save_checkpoint``, a
                plain state dict, or a ``Trainer`` checkpoint folder.

    Returns:
        learning_rate (float): the stored learning rate, or 1.0 for a file
        without one.
    """
    device = _model_device(model)
    if os.path.isdir(path):
        state_dict, learning_rate = _trainer_weights(path, device), _trainer_learning_rate(path)
    else:
        state_dict, learning_rate = _checkpoint_file(path, device)
    target = model.module if isinstance(model, nn.DataParallel) else model
    state_dict = _matching_prefix(state_dict, target)
    try:
        target.load_state_dict(state_dict)
    except RuntimeError as error:
        raise ValueError(
            f"Checkpoint {path!r} does not match the model given to TracInWE; pass "
            f"checkpoints saved from this model's architecture. PyTorch said: {error}"
        ) from error
    return learning_rate


def _checkpoint_file(path: str, device: Optional[torch.device]) -> Tuple[Dict[str, Any], float]:
    r"""The state dict and learning rate of a file in `save_checkpoint`'s format (or a plain state dict)."""
    checkpoint = _torch_load(path, device)
    if not isinstance(checkpoint, dict):
        raise ValueError(
            f"Checkpoint {path!r} holds a {type(checkpoint).__name__}, not a state "
            "dict; save it with `captum_tracin_we.save_checkpoint`."
        )
    checkpoint = dict(checkpoint)
    learning_rate = check_learning_rate(
        checkpoint.pop("learning_rate", 1.0), f"The learning rate stored in checkpoint {path!r}"
    )
    return checkpoint.get("state_dict", checkpoint), learning_rate


def _torch_load(path: str, device: Optional[torch.device]) -> Any:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as error:
        raise ValueError(
            f"Cannot load checkpoint {path!r} with torch.load(weights_only=True). "
            "Save checkpoints as state dicts, e.g. with "
            "`captum_tracin_we.save_checkpoint`, or pass your own "
            f"`checkpoints_load_func`. PyTorch said: {error}"
        ) from error


# a Trainer folder's weights, in the order Hugging Face prefers them
_TRAINER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
TRAINER_STATE = "trainer_state.json"


def trainer_checkpoints(output_dir: str) -> List[str]:
    r"""
    The checkpoint folders (``checkpoint-N``) that a Hugging Face ``Trainer``
    saved in `output_dir`, in the order of their steps N (``checkpoint-10``
    after ``checkpoint-9``): pass them as ``checkpoints``, or pass `output_dir`
    itself, which ``TracInWE`` expands with this.
    """
    steps = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            steps.append((int(match.group(1)), os.path.join(output_dir, name)))
    return [folder for _, folder in sorted(steps)]


def _trainer_weights(folder: str, device: Optional[torch.device]) -> Dict[str, Any]:
    r"""The state dict of a ``Trainer`` folder: one weights file, or the shards its index names."""
    for name in _TRAINER_WEIGHTS:
        if os.path.isfile(os.path.join(folder, name)):
            return _weights_file(os.path.join(folder, name), device)
        index = os.path.join(folder, name + ".index.json")
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as handle:
                shards = sorted(set(json.load(handle)["weight_map"].values()))
            state_dict: Dict[str, Any] = {}
            for shard in shards:
                state_dict.update(_weights_file(os.path.join(folder, shard), device))
            return state_dict
    raise ValueError(
        f"Checkpoint folder {folder!r} holds no model weights ({', '.join(_TRAINER_WEIGHTS)}, or their "
        "sharded .index.json): pass the checkpoint-N folders a Hugging Face `Trainer` saved, or "
        "checkpoint files."
    )


def _weights_file(path: str, device: Optional[torch.device]) -> Dict[str, Any]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file  # a dependency of transformers

        return load_file(path, device=str(device or "cpu"))
    return _torch_load(path, device)


def _trainer_learning_rate(folder: str) -> float:
    r"""The learning rate at a ``Trainer`` checkpoint's step (see `load_checkpoint`)."""
    state_path = os.path.join(folder, TRAINER_STATE)
    if not os.path.isfile(state_path):
        raise ValueError(
            f"Checkpoint folder {folder!r} has no {TRAINER_STATE}, which holds the learning rate at "
            "its step: pass a folder a Hugging Face `Trainer` saved, or a `checkpoints_load_func` "
            "that returns each checkpoint's learning rate."
        )
    with open(state_path, encoding="utf-8") as handle:
        state = json.load(handle)
    step = state.get("global_step")
    logged = [(entry.get("step"), entry["learning_rate"]) for entry in state.get("log_history", [])
              if isinstance(entry, dict) and "learning_rate" in entry]
    at_step = [rate for logged_step, rate in logged if logged_step == step]
    if at_step:
        return check_learning_rate(at_step[-1], f"The learning rate logged at step {step} in {state_path!r}")
    if logged and len({rate for _, rate in logged}) == 1:  # a constant schedule: every step's rate
        return check_learning_rate(logged[0][1], f"The learning rate logged in {state_path!r}")
    raise ValueError(
        f"{state_path!r} logs no learning rate at step {step} (the checkpoint's), and the rates it "
        "logs at other steps differ (a schedule), so the rate at this step is not known: train with "
        "`logging_steps` dividing `save_steps` and the number of steps, so that every saved step is "
        "logged, or pass a `checkpoints_load_func` that returns each checkpoint's learning rate."
    )


def is_trainer_folder(path: str) -> bool:
    r"""Whether `path` is one ``Trainer`` checkpoint folder (its state or its weights)."""
    names = (TRAINER_STATE,) + _TRAINER_WEIGHTS + tuple(name + ".index.json" for name in _TRAINER_WEIGHTS)
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, name)) for name in names)


# prefixes that wrappers add to a model's state dict keys: nn.DataParallel's
# "module.", and "model." of `HuggingFaceClassifier` (a checkpoint saved from the
# Hugging Face model it wraps, as fine-tuning scripts do, has no prefix)
_WRAPPER_PREFIXES = ("module.", "model.")


def _matching_prefix(state_dict: Dict[str, Any], target: Module) -> Dict[str, Any]:
    r"""
    ``state_dict`` with a wrapper's key prefix removed or added where that makes
    its keys the model's, and with the keys of tied parameters it left out
    (safetensors stores a shared tensor once) filled in from the key they share
    storage with; as it is otherwise (loading then names the difference).
    """
    tied = _tied_keys(target)
    model_keys = set(target.state_dict())

    def fits(keys: set) -> bool:
        return keys <= model_keys and all(key in keys or tied.get(key, set()) & keys for key in model_keys)

    candidates = [state_dict]
    for prefix in _WRAPPER_PREFIXES:
        if all(key.startswith(prefix) for key in state_dict):
            candidates.append({key[len(prefix):]: value for key, value in state_dict.items()})
        candidates.append({prefix + key: value for key, value in state_dict.items()})
    for candidate in candidates:
        if fits(set(candidate)):
            completed = dict(candidate)
            for key in model_keys - set(candidate):
                completed[key] = candidate[sorted(tied[key] & set(candidate))[0]]
            return completed
    return state_dict


def _tied_keys(model: Module) -> Dict[str, set]:
    r"""For each state-dict key of `model`, the other keys whose tensor shares its storage (tied weights)."""
    by_storage: Dict[Tuple[int, int, Tuple[int, ...]], set] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if isinstance(tensor, Tensor) and tensor.numel():
            place = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            by_storage.setdefault(place, set()).add(key)
    return {key: group - {key} for group in by_storage.values() for key in group if len(group) > 1}
