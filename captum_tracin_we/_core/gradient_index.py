r"""
An on-disk index of training token gradients: the training side of TracIn-WE,
computed once and read back for every later query.

Layout of an index folder (no pickle anywhere; numpy ``.npy`` arrays and JSON):

- ``manifest.json``: what the index was built from (format version, a
  fingerprint of the model's parameter names and shapes, the embedding shape,
  each checkpoint's identity and learning rate, the dataset length, options)
  and the name, shape, dtype, size and sha256 of every array file;
- per checkpoint ``c`` and chunk ``k`` of consecutive training examples:
  ``c{c}-k{k}-offsets.npy`` (int64, n_k + 1), ``c{c}-k{k}-token_ids.npy`` (int64,
  nnz) and ``c{c}-k{k}-grads.npy`` (the stored float dtype, nnz x d), the ragged
  layout of `TokenGradients` (not scaled by the learning rate, which the
  manifest records), and its inverted view by token id (`TokenPostings`):
  ``c{c}-k{k}-by_token_vocab.npy`` (the distinct token ids), ``-by_token_starts``
  and ``-by_token_rows`` (int64), so that a query looks its tokens up without
  sorting the chunk and reads only the rows of tokens it shares. Chunks bound
  the memory of a build; the arrays are memory-mapped on load.

An index is written chunk by chunk to a hidden ``.<name>.partial`` folder
beside its destination, with its progress saved after every chunk, and moved
into place only when complete: an interrupted build leaves no index that
loads, and a new build of the same index resumes from the chunks it finished.
A lock on the file ``.<name>.lock`` keeps two builds from writing the same
index at once. A rebuild moves the old index aside (``.<name>.previous``) only
for the instant between two renames; if it is interrupted there, the next build
puts the finished new index (or else the old one) into place.
"""

import hashlib
import json
import os
import shutil
import socket
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.nn import Module

try:
    import fcntl
except ImportError:  # pragma: no cover  (Windows)
    fcntl = None  # type: ignore[assignment]

from captum_tracin_we._core.token_gradients import TokenGradients, TokenPostings
from captum_tracin_we._utils.files import sha256_of
from captum_tracin_we._utils.text import shorten

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
_ARRAYS = ("offsets", "token_ids", "grads", "by_token_vocab", "by_token_starts", "by_token_rows")


class IndexMismatchError(ValueError):
    r"""The index was built from another model, checkpoints, data or options."""


class CorruptIndexError(ValueError):
    r"""An index file is missing, truncated or altered since the index was built."""


class IndexBuildInProgressError(RuntimeError):
    r"""Another process is building an index at the same path."""


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
        for key in sorted(checkpoint, key=str):
            _update_with(digest, key, checkpoint[key])
        return "dict-sha256:" + digest.hexdigest()
    return "str:" + str(checkpoint)


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
    for name, tensor in loss_fn.state_dict().items():
        _update_with(digest, name, tensor)
    return f"{kind.__module__}.{kind.__qualname__}{json.dumps(settings, sort_keys=True)}:{digest.hexdigest()[:16]}"


def data_fingerprint(loader: Any) -> Dict[str, Any]:
    r"""
    The number of training examples and a sha256 of every tensor of every
    batch, in order (one pass over the data, no model call).
    """
    digest, examples = hashlib.sha256(), 0
    for batch in loader:
        items = batch if isinstance(batch, (list, tuple)) else [batch]
        for position, item in enumerate(items):
            _update_with(digest, position, item)
        first = items[0]
        examples += first.shape[0] if isinstance(first, Tensor) else len(first)
    return {"examples": examples, "batch_size": getattr(loader, "batch_size", None),
            "sha256": digest.hexdigest()}


def _update_with(digest: Any, key: Any, value: Any) -> None:
    if isinstance(value, Tensor):
        array = value.detach().cpu().contiguous()
        digest.update(f"{key}:{tuple(array.shape)}:{array.dtype};".encode())
        digest.update(array.view(torch.uint8).numpy().tobytes() if array.numel() else b"")
    else:
        digest.update(f"{key}:{value!r};".encode())


@dataclass(frozen=True)
class GradientIndex:
    r"""
    An opened index (see the module docstring): `chunks(c)` gives the training
    token gradients of checkpoint `c`, chunk by chunk, `learning_rates[c]` its
    rate.
    """

    path: str
    manifest: Dict[str, Any]

    @property
    def num_checkpoints(self) -> int:
        return len(self.manifest["checkpoints"])

    @property
    def learning_rates(self) -> List[float]:
        return [float(rate) for rate in self.manifest["learning_rates"]]

    @property
    def num_examples(self) -> int:
        return int(self.manifest["training_data"]["examples"])

    def chunks(self, c: int) -> Iterator[TokenGradients]:
        r"""
        The training gradients at checkpoint `c`, chunk by chunk (consecutive
        examples), memory-mapped copy-on-write (the tensors are writable; the
        files never change), in the stored dtype.
        """
        for k in range(len(self.manifest["chunks"][c])):
            offsets, token_ids, grads, vocab, starts, rows = [
                torch.from_numpy(
                    np.load(self._file(c, k, name), mmap_mode="c", allow_pickle=False)
                )
                for name in _ARRAYS
            ]
            # checked after mapping: the arrays are this build's even if it is replaced later
            self._check_unchanged()
            yield TokenGradients(offsets, token_ids, grads, TokenPostings(vocab, starts, rows))

    def _check_unchanged(self) -> None:
        r"""Refuses to read files of a build other than the one opened."""
        try:
            with open(os.path.join(self.path, MANIFEST), encoding="utf-8") as handle:
                build_id = json.load(handle).get("build_id")
        except (OSError, ValueError):
            build_id = None
        if build_id != self.manifest.get("build_id"):
            raise IndexMismatchError(
                f"The index at {self.path!r} was rebuilt or removed since it was opened; "
                "open it again with `load_index`."
            )

    def num_chunks(self, c: int) -> int:
        return len(self.manifest["chunks"][c])

    def select(self, c: int, examples: List[int]) -> TokenGradients:
        r"""The gradients at checkpoint `c` of `examples` (sorted), reading only their chunks."""
        parts, start = [], 0
        wanted = torch.tensor(examples, dtype=torch.long)
        for count, chunk in zip(self.manifest["chunks"][c], self.chunks(c)):
            local = wanted[(wanted >= start) & (wanted < start + count)]
            if local.numel():
                parts.append(chunk.select(local - start))
            start += count
        return TokenGradients.concat(parts)

    def squared_norms(self, c: int, dtype: torch.dtype) -> Tensor:
        r"""Per training example, the squared norm of its gradient at checkpoint `c`, in `dtype`."""
        return torch.cat([
            TokenGradients(chunk.offsets, chunk.token_ids, chunk.grads.to(dtype)).squared_norms()
            for chunk in self.chunks(c)
        ])

    def _file(self, c: int, k: int, name: str) -> str:
        return os.path.join(self.path, f"c{c}-k{k}-{name}.npy")


# one checkpoint of a build: its position, learning rate and chunks still to write
CheckpointChunks = Tuple[int, float, Iterator[TokenGradients]]
PROGRESS = "progress.json"


@dataclass
class BuildProgress:
    r"""What an unfinished build has written: per checkpoint, its rate and chunk sizes."""

    description: Dict[str, Any]
    rates: Dict[int, float] = field(default_factory=dict)
    chunks: Dict[int, List[int]] = field(default_factory=dict)
    complete: List[int] = field(default_factory=list)
    files: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def chunks_done(self, c: int) -> int:
        return len(self.chunks.get(c, []))

    def save(self, folder: str) -> None:
        record = {
            "format_version": FORMAT_VERSION,
            "description": self.description,
            "rates": {str(c): rate for c, rate in self.rates.items()},
            "chunks": {str(c): counts for c, counts in self.chunks.items()},
            "complete": self.complete,
            "files": self.files,
        }
        _write_json_atomically(os.path.join(folder, PROGRESS), record)

    @classmethod
    def load(cls, folder: str, description: Dict[str, Any]) -> "BuildProgress":
        r"""The progress saved in `folder` if it is of the same build, else a fresh one."""
        try:
            with open(os.path.join(folder, PROGRESS), encoding="utf-8") as handle:
                record = json.load(handle)
        except (OSError, ValueError):
            return cls(description)
        if record.get("format_version") != FORMAT_VERSION or record.get("description") != description:
            return cls(description)  # another build, or chunks in another format
        progress = cls(
            description,
            {int(c): rate for c, rate in record["rates"].items()},
            {int(c): counts for c, counts in record["chunks"].items()},
            list(record["complete"]),
            record["files"],
        )
        # a chunk counts only if its files are all there, whole
        for filename, entry in progress.files.items():
            file_path = os.path.join(folder, filename)
            if not os.path.isfile(file_path) or os.path.getsize(file_path) != entry["bytes"]:
                return cls(description)
        return progress


def write_index(
    path: str,
    description: Dict[str, Any],
    per_checkpoint: Callable[[BuildProgress], Iterator[CheckpointChunks]],
    resume: bool = True,
) -> GradientIndex:
    r"""
    Writes an index to `path`. `per_checkpoint(progress)` yields, per
    checkpoint not yet complete, its position, learning rate and the chunks
    of training gradients after the `progress.chunks_done(c)` already written.
    Each chunk is written as it arrives (memory holds one at a time) into the
    hidden folder `.<name>.partial` beside `path`, with the progress saved after
    it; the folder becomes `path` only when complete. With `resume`, a partial
    folder of the same `description` is continued; otherwise it is discarded.
    An existing index at `path` is replaced only once the new one is complete.
    """
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, MANIFEST)):
        _refuse_non_index(path)
    with _build_lock(path):
        _restore_previous(path)
        return _write_locked(path, description, per_checkpoint, resume)


def _write_locked(
    path: str,
    description: Dict[str, Any],
    per_checkpoint: Callable[[BuildProgress], Iterator[CheckpointChunks]],
    resume: bool,
) -> GradientIndex:
    partial = _sibling(path, "partial")
    if not resume and os.path.isdir(partial):
        shutil.rmtree(partial)
    os.makedirs(partial, exist_ok=True)
    progress = BuildProgress.load(partial, description)
    if not progress.files:  # nothing to resume: start from an empty folder
        shutil.rmtree(partial)
        os.makedirs(partial)
    for c, learning_rate, gradient_chunks in per_checkpoint(progress):
        progress.rates[c] = float(learning_rate)
        for k, gradients in enumerate(gradient_chunks, start=progress.chunks_done(c)):
            gradients = gradients.to(torch.device("cpu"))
            postings = gradients.postings()
            arrays = {
                "offsets": gradients.offsets.numpy().astype(np.int64),
                "token_ids": gradients.token_ids.numpy().astype(np.int64),
                "grads": gradients.grads.detach().numpy(),
                "by_token_vocab": postings.vocab.numpy().astype(np.int64),
                "by_token_starts": postings.starts.numpy().astype(np.int64),
                "by_token_rows": postings.rows.numpy().astype(np.int64),
            }
            for name, array in arrays.items():
                filename = f"c{c}-k{k}-{name}.npy"
                np.save(os.path.join(partial, filename), array, allow_pickle=False)
                progress.files[filename] = _file_record(os.path.join(partial, filename), array)
            progress.chunks.setdefault(c, []).append(gradients.num_examples)
            progress.save(partial)
        progress.complete.append(c)
        progress.save(partial)
    n = len(progress.complete)
    _check_chunk_counts([progress.chunks.get(c, []) for c in range(n)], description, partial)
    manifest = {
        "format_version": FORMAT_VERSION, "build_id": uuid.uuid4().hex, **description,
        "learning_rates": [progress.rates[c] for c in range(n)],
        "chunks": [progress.chunks.get(c, []) for c in range(n)],
        "files": progress.files,
    }
    _write_json_atomically(os.path.join(partial, MANIFEST), manifest)
    os.remove(os.path.join(partial, PROGRESS))
    # the old index is out of place only between these two renames, and kept
    # aside (restored by the next build) if the process stops there
    previous = _sibling(path, "previous")
    if os.path.isdir(path):
        os.replace(path, previous)
    os.replace(partial, path)
    if os.path.isdir(previous):
        shutil.rmtree(previous)
    return GradientIndex(path, manifest)


def _sibling(path: str, kind: str) -> str:
    r"""The hidden ``.<name>.<kind>`` path beside `path` (partial, previous, lock)."""
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{kind}")


def _restore_previous(path: str) -> None:
    r"""
    Finishes a rebuild interrupted between moving the old index aside and the
    new one in: the new one, complete, goes into place, or else the old one
    comes back.
    """
    previous, partial = _sibling(path, "previous"), _sibling(path, "partial")
    if not os.path.isdir(path):
        if os.path.isfile(os.path.join(partial, MANIFEST)):
            os.replace(partial, path)
        elif os.path.isdir(previous):
            os.replace(previous, path)
    if os.path.isdir(previous):
        shutil.rmtree(previous)


@contextmanager
def _build_lock(path: str) -> Iterator[None]:
    r"""
    Holds an exclusive `flock` on the file ``.<name>.lock`` for the duration of
    a build, or raises if another build holds it. The kernel releases the lock
    when its process ends, however it ends; the file itself stays. (Where
    `fcntl` is missing, e.g. on Windows, builds are not locked.)
    """
    if fcntl is None:  # pragma: no cover
        yield
        return
    lock = _sibling(path, "lock")
    with open(lock, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise IndexBuildInProgressError(
                f"Another build of the index at {path!r} is running ({holder} holds "
                f"{lock!r}); wait for it to finish, or build to another `path`."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_chunk_counts(chunks: List[List[int]], description: Dict[str, Any], path: str) -> None:
    expected = description.get("training_data", {}).get("examples")
    if expected is None:
        return
    for c, counts in enumerate(chunks):
        if sum(counts) != expected:
            raise CorruptIndexError(
                f"The index at {path!r} holds {sum(counts)} examples at checkpoint {c}, but "
                f"its training data has {expected}; rebuild it with `build_index(resume=False)`."
            )


def _write_json_atomically(path: str, record: Dict[str, Any]) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def open_index(path: str, expected: Dict[str, Any], verify: bool = True) -> GradientIndex:
    r"""
    Opens the index at `path` after checking that it was built from what
    `expected` describes (raises `IndexMismatchError` naming the difference)
    and, with `verify`, that every array file has its recorded size and sha256
    (raises `CorruptIndexError`).
    """
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        previous = _sibling(os.path.abspath(path), "previous")
        if os.path.isfile(os.path.join(previous, MANIFEST)):
            raise FileNotFoundError(
                f"No index at {path!r}: a rebuild was interrupted while replacing it, and "
                f"the previous index is at {previous!r}. Run `build_index` again (it first "
                "puts the finished rebuild, or else the previous index, into place), or "
                "rename that folder to `path`."
            )
        raise FileNotFoundError(
            f"No index at {path!r} (no {MANIFEST}); build one with `TracInWE.build_index`."
        )
    try:
        with open(manifest_path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except ValueError as error:
        raise CorruptIndexError(f"{manifest_path} is not valid JSON: {error}") from error
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IndexMismatchError(
            f"The index at {path!r} has format version {manifest.get('format_version')}, "
            f"this package reads version {FORMAT_VERSION}; rebuild it with `build_index`."
        )
    for key, value in expected.items():
        if manifest.get(key) != value:
            raise IndexMismatchError(
                f"The index at {path!r} was built with a different {key} "
                f"({shorten(json.dumps(manifest.get(key)))}) than this TracInWE has ({shorten(json.dumps(value))}); "
                "rebuild it with `build_index`, or pass the model, checkpoints, training "
                "data and options it was built from."
            )
    _check_chunk_counts(manifest.get("chunks", []), manifest, path)
    for c, counts in enumerate(manifest.get("chunks", [])):
        for k in range(len(counts)):
            missing = [name for name in _ARRAYS if f"c{c}-k{k}-{name}.npy" not in manifest["files"]]
            if missing:
                raise CorruptIndexError(
                    f"The index at {path!r} lists no {missing} file for checkpoint {c}, chunk {k}; "
                    "rebuild it with `build_index(resume=False)`."
                )
    for filename, record in manifest["files"].items():
        file_path = os.path.join(path, filename)
        if not os.path.isfile(file_path) or os.path.getsize(file_path) != record["bytes"]:
            raise CorruptIndexError(
                f"Index file {file_path!r} is missing or has the wrong size (truncated?); "
                "rebuild the index with `build_index`."
            )
        if verify and sha256_of(file_path) != record["sha256"]:
            raise CorruptIndexError(
                f"Index file {file_path!r} has changed since the index was built "
                "(sha256 differs); rebuild the index with `build_index`."
            )
    return GradientIndex(os.path.abspath(path), manifest)


def _file_record(path: str, array: np.ndarray) -> Dict[str, Any]:
    return {
        "shape": list(array.shape),
        "dtype": str(array.dtype),
        "bytes": os.path.getsize(path),
        "sha256": sha256_of(path),
    }


def _refuse_non_index(path: str) -> None:
    raise FileExistsError(f"{path!r} exists and is not a TracInWE index; choose another `path`.")


