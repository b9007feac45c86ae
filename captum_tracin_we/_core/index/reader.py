r"""
Reading a training-gradient index (the folder layout is in `format`): `open_index`
checks a folder against what the caller expects and returns a `GradientIndex`,
which serves the chunks of training token gradients, memory-mapped, and refuses
files that changed since it was opened.
"""

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from captum_tracin_we._core.index.format import (
    check_chunk_counts,
    compare_description,
    check_file,
    chunk_files,
    CorruptIndexError,
    expected_files,
    FORMAT_VERSION,
    INDEX_KIND,
    IndexMismatchError,
    MANIFEST,
    PROBE_ARRAYS,
    probe_file,
    read_manifest,
    ROW_SCALES,
    SHARDED_KIND,
    sibling,
    SQUARED_NORMS,
    validate_manifest,
)
from captum_tracin_we._core.token_gradients import TokenGradients, TokenPostings
from captum_tracin_we._core.token_major import TokenMajorGradients
from captum_tracin_we._utils.text import shorten


@dataclass(frozen=True)
class GradientIndex:
    r"""
    An opened index (see the module docstring): `chunks(c)` gives the training
    token gradients of checkpoint `c`, chunk by chunk, `learning_rates[c]` its
    rate, `probe(c)` the exact gradients of its first training examples.
    """

    path: str
    manifest: Dict[str, Any]
    # each file's (inode, size, modification time) when opened: a file replaced
    # or rewritten since (a copy of another build over this one) is refused
    stats: Dict[str, Optional[Tuple[int, int, int]]] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def opened(cls, path: str, manifest: Dict[str, Any]) -> "GradientIndex":
        r"""The index at `path`, with the state of its files now."""
        names = expected_files(manifest["chunks"], manifest["storage_dtype"]) + [MANIFEST]
        return cls(path, manifest, {name: _stat(os.path.join(path, name)) for name in names})

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
        examples), example-major (see `chunk`).
        """
        for k in range(self.num_chunks(c)):
            yield self.chunk(c, k)

    def chunk(self, c: int, k: int, lazy: bool = False) -> TokenGradients:
        r"""
        Chunk `k` of the training gradients at checkpoint `c`, example-major:
        the stored rows reordered (one copy of them; `chunk_by_token` reads them
        as they lie). With `lazy`, float16 rows stay as stored, with their
        scales beside them (`TokenGradients.row_scales`).
        """
        return self.chunk_by_token(c, k, lazy).by_example()

    def chunk_by_token(self, c: int, k: int, lazy: bool = False) -> TokenMajorGradients:
        r"""
        Chunk `k` of the training gradients at checkpoint `c` as stored, grouped
        by token id: memory-mapped copy-on-write (the tensors are writable; the
        files never change), in the stored dtype (float16 rows are read back as
        float32, times their scales). With `lazy`, float16 rows stay as stored,
        with their scales beside them: a product then reads and scales only the
        rows of the tokens it shares.
        """
        arrays = self._chunk(c, k, exclude=(SQUARED_NORMS,))
        grads, scales = arrays["grads"], arrays.get(ROW_SCALES)
        if scales is not None and not lazy:  # float16 rows divided by their largest entry
            grads, scales = grads.float() * scales.unsqueeze(1), None
        postings = TokenPostings(
            arrays["by_token_vocab"], arrays["by_token_starts"], arrays["by_token_rows"]
        )
        # the arrays' shapes and dtypes were checked against the manifest, and their sha256 when opened
        return TokenMajorGradients(arrays["offsets"], arrays["token_ids"], postings, grads, scales, check=False)

    def probe(self, c: int) -> TokenGradients:
        r"""The exact gradients of the first training examples at checkpoint `c`."""
        return TokenGradients(*self._arrays([probe_file(c, name) for name in PROBE_ARRAYS]))

    def _arrays(self, filenames: List[str]) -> List[Tensor]:
        r"""The arrays of `filenames`, mapped, after checking they are this build's."""
        try:
            arrays = [
                np.load(os.path.join(self.path, name), mmap_mode="c", allow_pickle=False)
                for name in filenames
            ]
        except (OSError, ValueError, EOFError) as error:
            self._check_unchanged()  # a rebuild replaced the files: say so
            raise CorruptIndexError(
                f"Cannot read the index at {self.path!r} ({error}); rebuild it with `build_index`."
            ) from error
        # checked after mapping: the arrays are this build's even if it is replaced later
        self._check_unchanged()
        for name, array in zip(filenames, arrays):
            record = self.manifest["files"][name]
            if list(array.shape) != record["shape"] or str(array.dtype) != record["dtype"] or (
                name in self.stats and _stat(os.path.join(self.path, name)) != self.stats[name]
            ):
                raise CorruptIndexError(
                    f"Index file {name!r} of the index at {self.path!r} changed since the index "
                    "was opened; rebuild the index with `build_index`."
                )
        return [torch.from_numpy(array) for array in arrays]

    def _check_unchanged(self) -> None:
        r"""
        Refuses to read files of a build other than the one opened: a manifest
        with the state it had then is the same file (a rebuild writes a new
        one), else its build id must be the same.
        """
        manifest_path = os.path.join(self.path, MANIFEST)
        if self.stats.get(MANIFEST) is not None and _stat(manifest_path) == self.stats[MANIFEST]:
            return  # cheap at every chunk: parsing a large index's manifest is not
        try:
            with open(manifest_path, encoding="utf-8") as handle:
                build_id = json.load(handle).get("build_id")
        except (OSError, ValueError, AttributeError):
            build_id = None
        if build_id != self.manifest.get("build_id"):
            raise IndexMismatchError(
                f"The index at {self.path!r} was rebuilt or removed since it was opened; "
                "open it again with `load_index`."
            )

    def num_chunks(self, c: int) -> int:
        return len(self.manifest["chunks"][c])

    def select(self, c: int, examples: List[int]) -> TokenGradients:
        r"""The gradients at checkpoint `c` of `examples` (sorted), reading only their chunks and rows."""
        parts, start = [], 0
        wanted = torch.tensor(examples, dtype=torch.long)
        for k, count in enumerate(self.manifest["chunks"][c]):
            local = wanted[(wanted >= start) & (wanted < start + count)]
            if local.numel():
                parts.append(self.chunk_by_token(c, k, lazy=True).select(local - start))
            start += count
        return TokenGradients.concat(parts)

    def squared_norms(self, c: int) -> Tensor:
        r"""
        Per training example, the squared norm of its gradient at checkpoint `c`
        as stored (projected and rounded like its rows), in float64, recorded
        when the index was built: normalised scores read no rows.
        """
        return torch.cat([
            self._chunk(c, k, only=(SQUARED_NORMS,))[SQUARED_NORMS] for k in range(self.num_chunks(c))
        ])

    def _chunk(
        self, c: int, k: int, only: Optional[Tuple[str, ...]] = None, exclude: Tuple[str, ...] = ()
    ) -> Dict[str, Tensor]:
        r"""The arrays of chunk `k` at checkpoint `c` by name (`only` those, none of `exclude`)."""
        files = {
            name: filename for name, filename in chunk_files(c, k, self.manifest["storage_dtype"]).items()
            if (only is None or name in only) and name not in exclude
        }
        return dict(zip(files, self._arrays(list(files.values()))))


def open_index(
    path: str, expected: Dict[str, Any], verify: bool = True, owner: str = "TracInWE"
) -> GradientIndex:
    r"""
    Opens the index at `path` after checking its manifest (checksum, fields,
    the files of its chunks: `CorruptIndexError`), that it was built from what
    `expected` describes (`IndexMismatchError` naming the difference), and that
    every array file lies in the folder with its recorded size, shape and dtype
    and, with `verify`, sha256 (`CorruptIndexError`).
    """
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        previous = sibling(os.path.abspath(path), "previous")
        if os.path.isfile(os.path.join(previous, MANIFEST)):
            raise FileNotFoundError(
                f"No index at {path!r}: a rebuild was interrupted while replacing it, and "
                f"the previous index is at {previous!r}. Run `build_index` again (it first "
                "puts the finished rebuild, or else the previous index, into place), or "
                "rename that folder to `path`."
            )
        raise FileNotFoundError(
            f"No index at {path!r} (no {MANIFEST}); build one with `build_index`."
        )
    manifest = read_manifest(path, "rebuild the index with `build_index`")
    if isinstance(manifest, dict) and manifest.get("kind") == SHARDED_KIND:
        from captum_tracin_we._core.index.sharded import open_sharded_index  # built on this module

        return open_sharded_index(  # type: ignore[return-value]
            path, manifest, expected, lambda folder, shard: open_index(folder, shard, verify, owner), owner
        )
    if isinstance(manifest, dict) and manifest.get("kind", INDEX_KIND) != INDEX_KIND:
        raise IndexMismatchError(
            f"{path!r} holds {shorten(str(manifest.get('kind')))}, not a training-gradient index; "
            "give `load_index` the folder that `build_index` wrote."
        )
    if isinstance(manifest, dict) and manifest.get("format_version") != FORMAT_VERSION:
        raise IndexMismatchError(
            f"The index at {path!r} has format version {shorten(repr(manifest.get('format_version')))}, "
            f"this package reads version {FORMAT_VERSION}; rebuild it with `build_index`."
        )
    validate_manifest(manifest, path)
    compare_description(manifest, expected, f"The index at {path!r}", "rebuild it with `build_index`", owner)
    check_chunk_counts(manifest["chunks"], manifest, path)
    for filename in expected_files(manifest["chunks"], manifest["storage_dtype"]):
        check_file(path, filename, manifest["files"][filename], verify)
    return GradientIndex.opened(os.path.abspath(path), manifest)


def _stat(file_path: str) -> Optional[Tuple[int, int, int]]:
    try:
        status = os.stat(file_path)
    except OSError:
        return None
    return status.st_ino, status.st_size, status.st_mtime_ns
