r"""
Writing an on-disk index of training token gradients (the training side of the
token-influence methods, computed once and read back for every later query;
the layout is in `format`).

An index is written chunk by chunk to a hidden ``.<name>.partial`` folder
beside its destination, and moved into place only when complete: an
interrupted build leaves no index that loads. Every file is flushed to disk
(fsync, then the folder) before the build's progress log, ``progress.jsonl``,
gets one line for it, so a chunk the log lists is whole even after a power
loss; a new build of the same index resumes from the chunks it lists, keeping
those whose files still have their sha256, unless the probe gradients it logged
differ from those of the model and loss now building (then it starts over). While
an index is open, its files are checked not to have changed. A lock on the file ``.<name>.lock`` keeps two
builds from writing the same index at once. A rebuild moves the old index
aside (``.<name>.previous``) only for the instant between two renames; if it is
interrupted there, the next build puts the finished new index (or else the old
one) into place.
"""

import hashlib
import json
import os
import shutil
import socket
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

try:
    import fcntl
except ImportError:  # pragma: no cover  (Windows)
    fcntl = None  # type: ignore[assignment]

from captum_tracin_we._core.index.format import (
    CHECKSUM,
    check_chunk_counts,
    chunk_files,
    expected_files,
    folder_kind,
    FORMAT_VERSION,
    held_examples,
    INDEX_KINDS,
    IndexBuildInProgressError,
    MANIFEST,
    manifest_checksum,
    PROBE_ARRAYS,
    probe_file,
    ROW_SCALES,
    SCALED,
    sibling,
    SQUARED_NORMS,
    validate_manifest,
)
from captum_tracin_we._core.index.reader import GradientIndex
from captum_tracin_we._core.token_gradients import TokenGradients
from captum_tracin_we._utils.files import sha256_of


# one checkpoint of a build: its position, learning rate, probe gradients and the chunks still to write
CheckpointChunks = Tuple[int, float, TokenGradients, Iterator[TokenGradients]]
PROGRESS = "progress.jsonl"


@dataclass
class BuildProgress:
    r"""
    What an unfinished build has written, per checkpoint: its rate, chunk sizes
    and files. Kept as a log with one JSON line per event (a checkpoint started,
    a chunk written, a checkpoint complete), appended and flushed to disk as
    the build goes, so saving progress costs the same for every chunk.
    """

    description: Dict[str, Any]
    rates: Dict[int, float] = field(default_factory=dict)
    chunks: Dict[int, List[int]] = field(default_factory=dict)
    complete: List[int] = field(default_factory=list)
    files: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    events: List[Dict[str, Any]] = field(default_factory=list)

    def chunks_done(self, c: int) -> int:
        return len(self.chunks.get(c, []))

    def _apply(self, event: Dict[str, Any]) -> None:
        r"""
        Takes in one logged event, after checking it fits the build and what
        was logged before; raises if not (then it and what follows are not trusted).
        """
        c = int(event["checkpoint"])
        if not 0 <= c < len(self.description.get("checkpoints", [c])):
            raise ValueError("no such checkpoint")
        files = event.get("files", {})
        if "chunk" in event:
            if event["chunk"] != self.chunks_done(c) or int(event["examples"]) < 1:
                raise ValueError("chunks out of order")
            expected = set(chunk_files(c, event["chunk"], self.description.get("storage_dtype")).values())
        else:
            expected = {probe_file(c, name) for name in PROBE_ARRAYS} if "rate" in event else set()
        if set(files) != expected:
            raise ValueError("not the files of its chunk or probe")
        examples = held_examples(self.description)
        if examples is None and self.chunks and c != min(self.chunks):
            examples = sum(self.chunks[min(self.chunks)])  # a shard: as many as at its first checkpoint
        if event.get("complete") and examples is not None and sum(self.chunks.get(c, [])) != examples:
            raise ValueError("a checkpoint complete without all its examples")
        self.files.update(files)
        if "rate" in event:
            self.rates[c] = float(event["rate"])
        if "chunk" in event:
            self.chunks.setdefault(c, []).append(int(event["examples"]))
        if event.get("complete") and c not in self.complete:
            self.complete.append(c)
        self.events.append(event)

    def probe(self, folder: str, c: int) -> Optional[TokenGradients]:
        r"""The probe gradients logged for checkpoint `c`, if any."""
        names = [probe_file(c, name) for name in PROBE_ARRAYS]
        if not all(name in self.files for name in names):
            return None
        arrays = [np.load(os.path.join(folder, name), allow_pickle=False) for name in names]
        return TokenGradients(*(torch.from_numpy(array) for array in arrays))

    def start(self, folder: str) -> None:
        r"""Writes the log anew (the header and the events kept), flushed to disk."""
        lines = [{"format_version": FORMAT_VERSION, "description": self.description}] + self.events
        write_durably(os.path.join(folder, PROGRESS), "".join(_json_line(line) for line in lines))

    def record(self, folder: str, event: Dict[str, Any]) -> None:
        r"""Applies `event` and appends it to the log, flushed to disk."""
        self._apply(event)
        with open(os.path.join(folder, PROGRESS), "a", encoding="utf-8") as handle:
            handle.write(_json_line(event))
            handle.flush()
            os.fsync(handle.fileno())

    @classmethod
    def load(cls, folder: str, description: Dict[str, Any]) -> "BuildProgress":
        r"""
        The progress logged in `folder` if it is of the same build, else a
        fresh one. A last line cut short (the process stopped while appending
        it) is dropped. A chunk whose files no longer have their recorded size
        and sha256 is dropped with the later chunks of its checkpoint, which are
        then computed again; a checkpoint whose probe is lost is completed again.
        """
        fresh = cls(description)
        try:
            with open(os.path.join(folder, PROGRESS), encoding="utf-8") as handle:
                lines = handle.read().split("\n")
            header = json.loads(lines[0])
        except (OSError, ValueError, UnicodeDecodeError):
            return fresh
        if not isinstance(header, dict) or header.get("format_version") != FORMAT_VERSION \
                or header.get("description") != description:
            return fresh  # another build, or chunks in another format
        logged = cls(description)
        for line in lines[1:]:
            try:
                logged._apply(json.loads(line))
            except (ValueError, KeyError, TypeError, AttributeError):
                break  # a torn last line; what follows it was never acknowledged
        lost = {name for name, entry in logged.files.items() if not _intact(folder, name, entry)}
        if not lost:
            return logged
        kept, cut, restart = cls(description), set(), set()
        for event in logged.events:
            c, broken = event["checkpoint"], not lost.isdisjoint(event.get("files", {}))
            if "chunk" in event and (broken or c in cut):
                cut.add(c)  # chunks are consecutive: the later ones go too
                continue
            if event.get("complete") and (c in cut or c in restart):
                continue
            if "rate" in event and broken:
                restart.add(c)
                continue
            kept._apply(event)
        return kept


def _intact(folder: str, filename: str, entry: Any) -> bool:
    r"""Whether a file that a build logged still has its recorded size and sha256."""
    file_path = os.path.join(folder, os.path.basename(filename))
    try:
        return os.path.getsize(file_path) == entry["bytes"] and sha256_of(file_path) == entry["sha256"]
    except (OSError, KeyError, TypeError):
        return False


def write_index(
    path: str,
    description: Dict[str, Any],
    per_checkpoint: Callable[[BuildProgress], Iterator[CheckpointChunks]],
    resume: bool = True,
    same_probe: Optional[Callable[[TokenGradients, TokenGradients], bool]] = None,
) -> GradientIndex:
    r"""
    Writes an index to `path`. `per_checkpoint(progress)` yields, per
    checkpoint, its position, learning rate, probe gradients and the chunks of
    training gradients after the `progress.chunks_done(c)` already written
    (none for a checkpoint in `progress.complete`). Each chunk is written as it arrives (memory holds one at a
    time) into the hidden folder `.<name>.partial` beside `path`, with the
    progress logged after it; the folder becomes `path` only when complete.
    With `resume`, a partial folder of the same `description` is continued,
    unless `same_probe(logged, fresh)` says that a checkpoint's probe gradients
    logged there differ from the fresh ones (the partial build was made with
    another model forward or loss, which the description cannot tell): then, as
    without `resume`, it is discarded. An existing index at `path` is replaced
    only once the new one is complete.
    """
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.isdir(path) and folder_kind(path) not in INDEX_KINDS:
        refuse_non_index(path)
    with build_lock(path):
        restore_previous(path)
        try:
            return _write_locked(path, description, per_checkpoint, resume, same_probe)
        except _OtherCode:
            return _write_locked(path, description, per_checkpoint, False, None)


class _OtherCode(Exception):
    r"""A partial build's probe gradients differ from those of the code now building."""


def _write_locked(
    path: str,
    description: Dict[str, Any],
    per_checkpoint: Callable[[BuildProgress], Iterator[CheckpointChunks]],
    resume: bool,
    same_probe: Optional[Callable[[TokenGradients, TokenGradients], bool]],
) -> GradientIndex:
    partial = sibling(path, "partial")
    if not resume and os.path.isdir(partial):
        shutil.rmtree(partial)
    os.makedirs(partial, exist_ok=True)
    progress = BuildProgress.load(partial, description)
    if not progress.files:  # nothing to resume: start from an empty folder
        shutil.rmtree(partial)
        os.makedirs(partial)
    progress.start(partial)
    for c, learning_rate, probe, gradient_chunks in per_checkpoint(progress):
        logged = progress.probe(partial, c)
        if same_probe is not None and logged is not None and not same_probe(logged, probe):
            raise _OtherCode
        if c in progress.complete:
            continue
        probe_files = save_arrays(
            partial, {probe_file(c, name): array for name, array in ragged_arrays(probe)}
        )
        progress.record(partial, {"checkpoint": c, "rate": float(learning_rate), "files": probe_files})
        for k, gradients in enumerate(gradient_chunks, start=progress.chunks_done(c)):
            names = chunk_files(c, k, description.get("storage_dtype"))
            arrays = _chunk_arrays(gradients, description.get("storage_dtype"))
            files = save_arrays(partial, {names[name]: array for name, array in arrays.items()})
            event = {"checkpoint": c, "chunk": k, "examples": gradients.num_examples, "files": files}
            progress.record(partial, event)
        progress.record(partial, {"checkpoint": c, "complete": True})
    n = len(progress.complete)
    chunks = [progress.chunks.get(c, []) for c in range(n)]
    check_chunk_counts(chunks, description, partial)
    manifest = {
        "format_version": FORMAT_VERSION, "build_id": uuid.uuid4().hex, **description,
        "learning_rates": [progress.rates[c] for c in range(n)],
        "chunks": chunks,
        "files": {
            name: progress.files[name]
            for name in expected_files(chunks, description.get("storage_dtype"))
        },
    }
    manifest[CHECKSUM] = manifest_checksum(manifest)
    validate_manifest(manifest, partial)  # what is written must load
    write_durably(os.path.join(partial, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))
    os.remove(os.path.join(partial, PROGRESS))
    move_into_place(partial, path)
    return GradientIndex.opened(path, manifest)


def move_into_place(partial: str, path: str) -> None:
    r"""
    Replaces the folder `path` by the complete folder `partial`. The old one is
    out of place only between two renames, and kept aside (``.<name>.previous``,
    put back by `restore_previous`) if the process stops there.
    """
    previous = sibling(path, "previous")
    if os.path.isdir(path):
        os.replace(path, previous)
    os.replace(partial, path)
    _fsync_folder(os.path.dirname(path))
    if os.path.isdir(previous):
        shutil.rmtree(previous)


def ragged_arrays(
    gradients: TokenGradients, storage_dtype: Optional[str] = None
) -> List[Tuple[str, np.ndarray]]:
    r"""
    The ragged arrays of `gradients`, the rows in `storage_dtype` (None: their
    own dtype); float16 rows divided by their largest entry, with those scales.
    """
    gradients = gradients.to(torch.device("cpu"))
    grads = gradients.grads.detach()
    if grads.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
        grads = grads.float()
    scales = None
    if storage_dtype == SCALED:
        scales = grads.abs().amax(dim=1, keepdim=True).float()
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        grads = (grads / scales).half()
    elif storage_dtype is not None:
        grads = grads.to(getattr(torch, storage_dtype[len("torch."):]))
    arrays = [
        ("offsets", gradients.offsets.numpy().astype(np.int64)),
        ("token_ids", gradients.token_ids.numpy().astype(np.int64)),
        ("grads", grads.numpy()),
    ]
    return arrays if scales is None else arrays + [(ROW_SCALES, scales.squeeze(1).numpy())]


def _chunk_arrays(gradients: TokenGradients, storage_dtype: Optional[str]) -> Dict[str, np.ndarray]:
    r"""
    The arrays of one chunk by name: the rows in `storage_dtype`, grouped by
    token id, the ragged layout and its inverted view (which orders them), and
    each example's squared norm of the rows as stored.
    """
    gradients = gradients.to(torch.device("cpu"))
    arrays = dict(ragged_arrays(gradients, storage_dtype))
    stored = torch.from_numpy(arrays["grads"]).double()
    if ROW_SCALES in arrays:
        stored = stored * torch.from_numpy(arrays[ROW_SCALES]).double().unsqueeze(1)
    postings = gradients.postings()
    # the rows (and scales) stored grouped by token id, as a join reads them (`TokenMajorGradients`)
    rows = postings.rows.numpy()
    arrays["grads"] = arrays["grads"][rows]
    if ROW_SCALES in arrays:
        arrays[ROW_SCALES] = arrays[ROW_SCALES][rows]
    arrays.update({
        "by_token_vocab": postings.vocab.numpy().astype(np.int64),
        "by_token_starts": postings.starts.numpy().astype(np.int64),
        "by_token_rows": postings.rows.numpy().astype(np.int64),
        SQUARED_NORMS: TokenGradients(gradients.offsets, gradients.token_ids, stored).squared_norms().numpy(),
    })
    return arrays


class _HashingWriter:
    r"""A file writer that hashes what it writes, so a file is never read back to hash it."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle, self.digest, self.size = handle, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.handle.write(data)


def save_arrays(folder: str, arrays: Dict[str, np.ndarray]) -> Dict[str, Dict[str, Any]]:
    r"""Writes each array to its `.npy` file, each flushed to disk, then the folder; their records."""
    records = {}
    for filename, array in arrays.items():
        with open(os.path.join(folder, filename), "wb") as handle:
            writer = _HashingWriter(handle)
            np.lib.format.write_array(writer, np.ascontiguousarray(array), allow_pickle=False)
            handle.flush()
            os.fsync(handle.fileno())
        records[filename] = {
            "shape": list(array.shape), "dtype": str(array.dtype),
            "bytes": writer.size, "sha256": writer.digest.hexdigest(),
        }
    _fsync_folder(folder)
    return records


def _json_line(record: Dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n"


def write_durably(path: str, text: str) -> None:
    r"""Replaces `path` by `text` atomically, flushed to disk before and after the rename."""
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(path + ".tmp", path)
    _fsync_folder(os.path.dirname(path))


def _fsync_folder(folder: str) -> None:
    r"""Flushes a folder's entries (new and renamed files) to disk, where the system allows it."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover  (e.g. Windows cannot open folders)
        return
    try:
        os.fsync(descriptor)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(descriptor)


def restore_previous(path: str) -> None:
    r"""
    Finishes a rebuild interrupted between moving the old index aside and the
    new one in: the new one, complete, goes into place, or else the old one
    comes back.
    """
    previous, partial = sibling(path, "previous"), sibling(path, "partial")
    if not os.path.isdir(path):
        if os.path.isfile(os.path.join(partial, MANIFEST)):
            os.replace(partial, path)
        elif os.path.isdir(previous):
            os.replace(previous, path)
    if os.path.isdir(previous):
        shutil.rmtree(previous)


@contextmanager
def build_lock(path: str) -> Iterator[None]:
    r"""
    Holds an exclusive `flock` on the file ``.<name>.lock`` for the duration of
    a build, or raises if another build holds it. The kernel releases the lock
    when its process ends, however it ends; the file itself stays. (Where
    `fcntl` is missing, e.g. on Windows, builds are not locked.)
    """
    if fcntl is None:  # pragma: no cover
        yield
        return
    lock = sibling(path, "lock")
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


def refuse_non_index(path: str) -> None:
    kind = folder_kind(path)
    what = "is not a TracInWE index" if kind is None else f"holds {kind}, not a TracInWE index"
    raise FileExistsError(f"{path!r} exists and {what}; choose another `path`.")
