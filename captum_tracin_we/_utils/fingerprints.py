r"""
Fingerprints of what an index is built from (model, checkpoints, loss, data)
and of single batches. Names and shapes cannot identify code: the index also
keeps a few training gradients that loading recomputes (see `TracInWE.load_index`).
"""

import hashlib
import json
import os
from typing import Any, Dict, Iterable, Optional

import torch
from torch import Tensor
from torch.nn import Module

from captum_tracin_we._utils.files import sha256_of


def model_fingerprint(model: Module) -> str:
    r"""A sha256 of the model's parameter and buffer names, shapes and dtypes."""
    digest = hashlib.sha256()
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    return digest.hexdigest()


def checkpoint_identity(checkpoint: Any) -> str:
    r"""
    The content sha256 of a checkpoint file, of the files in a checkpoint
    folder, or of the tensors of an in-memory state dict; otherwise (other
    objects) its string form, which a custom loader's checkpoints should make
    unique.
    """
    if isinstance(checkpoint, (str, os.PathLike)) and os.path.isfile(checkpoint):
        return "sha256:" + sha256_of(str(checkpoint))
    if isinstance(checkpoint, (str, os.PathLike)) and os.path.isdir(checkpoint):
        digest = hashlib.sha256()
        for root, _, names in sorted(os.walk(checkpoint)):
            for name in sorted(names):
                file_path = os.path.join(root, name)
                digest.update(f"{os.path.relpath(file_path, checkpoint)}:{sha256_of(file_path)};".encode())
        return "folder-sha256:" + digest.hexdigest()
    if isinstance(checkpoint, dict):
        digest = hashlib.sha256()
        update_digest(digest, "state_dict", checkpoint)
        return "dict-sha256:" + digest.hexdigest()
    return "str:" + str(checkpoint)


def file_state(checkpoint: Any) -> Any:
    r"""
    The inode, size and modification time of a checkpoint file (or of every
    file in a checkpoint folder), cheap to compare at every query; None for
    checkpoints that are not paths.
    """
    if not isinstance(checkpoint, (str, os.PathLike)) or not os.path.exists(checkpoint):
        return None
    if os.path.isdir(checkpoint):
        return sorted(
            (os.path.relpath(os.path.join(root, name), checkpoint), file_state(os.path.join(root, name)))
            for root, _, names in os.walk(checkpoint) for name in names
        )
    status = os.stat(checkpoint)
    return (status.st_ino, status.st_size, status.st_mtime_ns)


def loss_identity(loss_fn: Any) -> str:
    r"""
    A loss module's class, plain settings (reduction aside, which TracInWE
    normalises) and tensors (e.g. class weights); a function's qualified name.
    """
    if loss_fn is None:
        return "None"
    kind = type(loss_fn)
    if not isinstance(loss_fn, Module):
        return f"{getattr(loss_fn, '__module__', '')}.{getattr(loss_fn, '__qualname__', kind.__qualname__)}"
    digest = hashlib.sha256()
    settings = {
        key: value for key, value in sorted(vars(loss_fn).items())
        if not key.startswith("_") and key != "training" and key != "reduction"
        and isinstance(value, (int, float, str, bool, type(None)))
    }
    update_digest(digest, "state_dict", dict(loss_fn.state_dict()))
    return f"{kind.__module__}.{kind.__qualname__}{json.dumps(settings, sort_keys=True)}:{digest.hexdigest()[:16]}"


def data_fingerprint(batches: Iterable[Any], batch_size: Optional[int]) -> Dict[str, Any]:
    r"""
    The number of examples, the batch size and a sha256 of every batch, in
    order (one pass over the data, no model call).
    """
    digest, examples = hashlib.sha256(), 0
    for batch in batches:
        digest.update(batch_digest(batch).encode())
        items = batch if isinstance(batch, (list, tuple)) else [batch]
        first = items[0]
        examples += first.shape[0] if isinstance(first, Tensor) else len(first)
    return {"examples": examples, "batch_size": batch_size, "sha256": digest.hexdigest()}


def batch_digest(batch: Any) -> str:
    r"""A sha256 of every tensor, array and plain value of a batch, nested anyhow."""
    digest = hashlib.sha256()
    update_digest(digest, "batch", batch)
    return digest.hexdigest()


def update_digest(digest: Any, key: Any, value: Any) -> None:
    r"""Adds `value` (a tensor, or lists, tuples and dicts of them, or plain values) to `digest`."""
    if isinstance(value, Tensor):
        array = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}:{tuple(value.shape)}:{array.dtype};".encode())
        digest.update(array.view(torch.uint8).numpy().tobytes() if array.numel() else b"")
    elif isinstance(value, (list, tuple)):
        digest.update(f"{key}:{type(value).__name__}[{len(value)}];".encode())
        for position, item in enumerate(value):
            update_digest(digest, position, item)
    elif isinstance(value, dict):
        digest.update(f"{key}:dict[{len(value)}];".encode())
        for name in sorted(value, key=str):
            update_digest(digest, name, value[name])
    elif hasattr(value, "tobytes") and hasattr(value, "dtype"):  # numpy arrays and scalars
        digest.update(f"{key}:{getattr(value, 'shape', ())}:{value.dtype};".encode())
        digest.update(value.tobytes())
    elif isinstance(value, (str, bytes, int, float, complex, bool, type(None))):
        digest.update(f"{key}:{value!r};".encode())
    else:  # other objects: their type only (a default repr holds a memory address)
        digest.update(f"{key}:{type(value).__module__}.{type(value).__qualname__};".encode())
