r"""
The format of a training-gradient index folder (`writer` writes it, `reader`
reads it): the names of its files, the errors, and the checks of its manifest,
which is checksummed and validated field by field before anything in it is
used, so that an edited or malformed manifest is refused rather than served.

Layout of an index folder (no pickle anywhere; numpy ``.npy`` arrays and JSON;
`chunk_files` and `probe_file` name the files):

- ``manifest.json``: what the index was built from (format version, a
  fingerprint of the model's parameter names and shapes, the embedding shape,
  each checkpoint's identity and learning rate, the training data's length and
  content hash, options), the name, shape, dtype, size and sha256 of every
  array file, and a sha256 of the manifest itself;
- per checkpoint ``c`` and chunk ``k`` of consecutive training examples:
  ``c{c}-k{k}-offsets.npy`` (int64, n_k + 1) and ``c{c}-k{k}-token_ids.npy``
  (int64, nnz), the ragged layout of `TokenGradients`, its inverted view by
  token id (`TokenPostings`): ``c{c}-k{k}-by_token_vocab.npy`` (the distinct
  token ids), ``-by_token_starts`` and ``-by_token_rows`` (int64), and
  ``c{c}-k{k}-grads.npy`` (the stored float dtype, nnz x d; not scaled by the
  learning rate, which the manifest records), the rows in the order of the
  inverted view, grouped by token id (`TokenMajorGradients`): a query looks its
  tokens up without sorting the chunk, and reads each shared token's rows as one
  run of memory (a frequent token's in place, as a GEMM operand). Chunks bound
  the memory of a build; the arrays are memory-mapped on load. With float16
  storage, ``c{c}-k{k}-row_scales.npy`` (float32, nnz, in the rows' order) holds
  each row's largest entry, by which its stored float16 row was divided. ``c{c}-k{k}-squared_norms.npy``
  (float64, n_k) holds each example's squared gradient norm, from the rows as
  stored, so that normalised scores need no pass over the rows;
- per checkpoint, ``c{c}-probe-{offsets,token_ids,grads}.npy``: the exact
  gradients (every token but the excluded ones, unprojected, in the model's
  dtype, or float32 for bfloat16) of the training examples `probe_indices`,
  which `TracInWE.load_index` recomputes with the model and loss it is given,
  since names and shapes cannot tell two forward passes or two loss functions
  apart.
"""

import hashlib
import json
import math
import os
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from captum_tracin_we._utils.files import sha256_of
from captum_tracin_we._utils.text import shorten

# 5: rows stored grouped by token id (4 stored them example by example)
FORMAT_VERSION = 5
MANIFEST = "manifest.json"
CHECKSUM = "manifest_sha256"
# the ragged TokenGradients layout, its inverted view (TokenPostings) and each
# example's squared gradient norm (for normalised scores), per chunk
SQUARED_NORMS = "squared_norms"
ARRAYS = (
    "offsets", "token_ids", "grads", "by_token_vocab", "by_token_starts", "by_token_rows", SQUARED_NORMS
)
# float16 rows are stored divided by their largest entry, kept in float32 beside them:
# float16 alone would round the small gradients of a confident model to 0
SCALED = "torch.float16"
ROW_SCALES = "row_scales"
# per checkpoint, the unprojected, full-precision gradients of a few training
# examples (`probe_indices`), which loading recomputes with the model and loss it is given
PROBE_ARRAYS = ("offsets", "token_ids", "grads")
STORAGE_DTYPES = ("torch.float16", "torch.float32", "torch.float64")


class IndexMismatchError(ValueError):
    r"""The index was built from another model, checkpoints, data or options."""


class CorruptIndexError(ValueError):
    r"""An index file is missing, truncated or altered since the index was built."""


class IndexBuildInProgressError(RuntimeError):
    r"""Another process is building an index at the same path."""


def chunk_files(c: int, k: int, storage_dtype: Optional[str]) -> Dict[str, str]:
    r"""The files of chunk `k` at checkpoint `c` of an index stored in `storage_dtype`, by array name."""
    names = ARRAYS + ((ROW_SCALES,) if storage_dtype == SCALED else ())
    return {name: f"c{c}-k{k}-{name}.npy" for name in names}


def probe_file(c: int, name: str) -> str:
    r"""The file of array `name` of the probe gradients at checkpoint `c`."""
    return f"c{c}-probe-{name}.npy"


def expected_files(chunks: List[List[int]], storage_dtype: Optional[str]) -> List[str]:
    r"""Every array file of an index with these chunk counts per checkpoint."""
    names = []
    for c, counts in enumerate(chunks):
        names += [probe_file(c, name) for name in PROBE_ARRAYS]
        for k in range(len(counts)):
            names += chunk_files(c, k, storage_dtype).values()
    return names


# what a folder with a manifest holds: an index (whose manifest names no kind) or another kind of saved arrays
INDEX_KIND = "a training-gradient index"
SHARDED_KIND = "a sharded training-gradient index"  # shards of an index, one per process (see `sharded`)
INDEX_KINDS = (INDEX_KIND, SHARDED_KIND)


def folder_kind(path: str) -> Optional[str]:
    r"""What the folder `path` holds, by the `kind` its manifest names; None without a readable manifest."""
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError):
        return None
    kind = manifest.get("kind", INDEX_KIND) if isinstance(manifest, dict) else None
    return kind if isinstance(kind, str) else None


def read_manifest(path: str, fix: str) -> Any:
    r"""The JSON of the manifest in `path` (which must exist); `CorruptIndexError` if it is not JSON."""
    manifest_path = os.path.join(path, MANIFEST)
    try:
        with open(manifest_path, encoding="utf-8") as handle:
            return json.load(handle)
    except ValueError as error:
        raise CorruptIndexError(f"{manifest_path} is not valid JSON: {error}; {fix}.") from error


def sibling(path: str, kind: str) -> str:
    r"""The hidden ``.<name>.<kind>`` path beside `path` (partial, previous, lock)."""
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{kind}")


def held_examples(description: Dict[str, Any]) -> Optional[int]:
    r"""
    The training examples an index built as `description` says holds at every
    checkpoint: all of them, or, for a shard (a part of the batches), a number
    known only once built (None; its sharded index checks the sum).
    """
    if description.get("shard") is not None:
        return None
    return description.get("training_data", {}).get("examples")


def check_chunk_counts(chunks: List[List[int]], description: Dict[str, Any], path: str) -> None:
    r"""Every checkpoint's chunks must hold all the training examples (a shard's: the same at each)."""
    expected = held_examples(description)
    if expected is None and description.get("shard") is not None and chunks:
        expected = sum(chunks[0])
    if expected is None:
        return
    for c, counts in enumerate(chunks):
        if sum(counts) != expected:
            raise CorruptIndexError(
                f"The index at {path!r} holds {sum(counts)} examples at checkpoint {c}, but "
                f"its training data has {expected}; rebuild it with `build_index(resume=False)`."
            )


def compare_description(
    manifest: Dict[str, Any], expected: Dict[str, Any], what: str, fix: str, owner: str
) -> None:
    r"""
    Refuses (`IndexMismatchError` naming the field) a saved `manifest` made from
    other inputs than `expected` describes; `what` names the saved thing ("The
    index at ..."), `fix` says how to make it anew, `owner` who is loading it.
    """
    for key, value in expected.items():
        if key == "checkpoints" and len(manifest.get("checkpoints", [])) != len(value):
            raise IndexMismatchError(
                f"{what} was built with {len(manifest.get('checkpoints', []))} checkpoints, "
                f"this {owner} has {len(value)}; {fix}, or pass the "
                "checkpoints it was built from (a folder of checkpoints must hold only them)."
            )
        if manifest.get(key) != value:
            raise IndexMismatchError(
                f"{what} was built with a different {key} "
                f"({shorten(json.dumps(manifest.get(key)))}) than this {owner} has "
                f"({shorten(json.dumps(value))}); "
                f"{fix}, or pass the model, checkpoints, training "
                "data and options it was built from."
            )


def manifest_checksum(manifest: Dict[str, Any]) -> str:
    r"""The sha256 of the manifest's canonical JSON, without the checksum itself."""
    content = {key: value for key, value in manifest.items() if key != CHECKSUM}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _is_json_int(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_optional_int(minimum: int) -> Callable[[Any], bool]:
    return lambda value: value is None or _is_json_int(value, minimum)


def _is_list_of(check: Callable[[Any], bool], minimum_length: int = 0) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, list) and len(value) >= minimum_length and all(
        check(item) for item in value
    )


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


_FILE_RECORD = {
    "shape": (_is_list_of(_is_json_int), "a list of ints >= 0"),
    "dtype": (_is_str, "a string"),
    "bytes": (_is_json_int, "an int >= 0"),
    "sha256": (_is_str, "a string"),
}
_TRAINING_DATA = {
    "examples": (lambda value: _is_json_int(value, 1), "an int >= 1"),
    "batch_size": (_is_optional_int(1), "an int >= 1 or null"),
    "sha256": (_is_str, "a string"),
}
_MANIFEST = {
    "format_version": (_is_json_int, "an int"),
    "build_id": (_is_str, "a string"),
    "model_fingerprint": (_is_str, "a string"),
    "embedding_layer": (_is_str, "a string"),
    "embedding_shape": (lambda v: v is None or (_is_list_of(lambda i: _is_json_int(i, 1))(v) and len(v) == 2),
                        "two ints >= 1 or null"),
    "checkpoints": (_is_list_of(_is_str, 1), "a non-empty list of strings"),
    "learning_rates": (_is_list_of(_is_number, 1), "a non-empty list of finite numbers"),
    "training_data": (lambda v: isinstance(v, dict), "an object"),
    "loss_fn": (_is_str, "a string"),
    "top_k_tokens": (_is_optional_int(1), "an int >= 1 or null"),
    "exclude_token_ids": (_is_list_of(_is_json_int), "a list of ints >= 0"),
    "projection_dim": (_is_optional_int(1), "an int >= 1 or null"),
    "projection_seed": (_is_optional_int(0), "an int >= 0 or null"),
    "storage_dtype": (lambda v: v is None or v in STORAGE_DTYPES, f"null or one of {STORAGE_DTYPES}"),
    "chunk_size": (lambda v: _is_json_int(v, 1), "an int >= 1"),
    "probe_indices": (_is_list_of(_is_json_int, 1), "a non-empty list of ints >= 0"),
    "chunks": (_is_list_of(_is_list_of(lambda i: _is_json_int(i, 1), 1), 1),
               "a non-empty list of non-empty lists of ints >= 1"),
    "files": (lambda v: isinstance(v, dict), "an object"),
    CHECKSUM: (_is_str, "a string"),
}


def validate_manifest(manifest: Any, path: str) -> None:
    r"""
    Refuses (`CorruptIndexError`, naming the field) a manifest whose checksum
    differs from its content, whose fields have the wrong type, or whose files
    are not exactly those of its chunks with shapes that fit them.
    """
    def refuse(field: str, expected: str, value: Any) -> None:
        raise CorruptIndexError(
            f"The index at {path!r} has a malformed manifest: `{field}` must be {expected}, "
            f"got {shorten(json.dumps(value, default=repr))}; rebuild it with "
            "`build_index(resume=False)`."
        )

    def check_fields(record: Any, spec: Dict[str, Any], prefix: str) -> None:
        for name, (check, expected) in spec.items():
            value = record.get(name) if isinstance(record, dict) else None
            if not isinstance(record, dict) or name not in record or not check(value):
                refuse(prefix + name, expected, value)

    if not isinstance(manifest, dict):
        refuse("(the manifest)", "a JSON object", manifest)
    if manifest.get(CHECKSUM) != manifest_checksum(manifest):
        raise CorruptIndexError(
            f"The manifest of the index at {path!r} was edited since the index was built "
            f"(its {CHECKSUM} differs from its content); rebuild the index with `build_index`."
        )
    check_fields(manifest, _MANIFEST, "")
    check_fields(manifest["training_data"], _TRAINING_DATA, "training_data.")
    if max(manifest["probe_indices"]) >= manifest["training_data"]["examples"]:
        refuse("probe_indices", "indices of training examples", manifest["probe_indices"])
    n_checkpoints = len(manifest["checkpoints"])
    for name in ("learning_rates", "chunks"):
        if len(manifest[name]) != n_checkpoints:
            refuse(name, f"a list of {n_checkpoints} entries, one per checkpoint", manifest[name])
    files = manifest["files"]
    expected = expected_files(manifest["chunks"], manifest["storage_dtype"])
    if sorted(files) != sorted(expected):
        unexpected = sorted(set(files) - set(expected))
        missing = sorted(set(expected) - set(files))
        refuse("files", f"exactly the {len(expected)} array files of its chunks (missing: "
               f"{shorten(str(missing))}; unexpected:)", unexpected)
    for filename in expected:
        check_fields(files[filename], _FILE_RECORD, f"files.{filename}.")
    for filename, shape, dtype in _expected_arrays(manifest):
        record = files[filename]
        wrong_shape = shape is not None and record["shape"] != shape
        if wrong_shape or (dtype is not None and record["dtype"] != dtype):
            refuse(f"files.{filename}", f"an array of shape {shape} and dtype {dtype}", record)


def _expected_arrays(
    manifest: Dict[str, Any],
) -> Iterator[Tuple[str, Optional[List[int]], Optional[str]]]:
    r"""(file name, shape, dtype) of each array; None where the manifest does not tell."""
    files = manifest["files"]
    embedding_dim = (manifest["embedding_shape"] or [None, None])[1]
    stored_dim = manifest["projection_dim"] or embedding_dim
    storage = manifest["storage_dtype"]
    stored_dtype = storage.replace("torch.", "") if storage else None

    def rows(filename: str, extra: Optional[int] = None) -> Optional[List[int]]:
        length = files[filename]["shape"][:1]  # a 1-D array's length (other shapes: see check_file)
        if extra is None:
            return length
        return length + [extra] if length else None

    for c, counts in enumerate(manifest["chunks"]):
        yield probe_file(c, "offsets"), [len(manifest["probe_indices"]) + 1], "int64"
        yield probe_file(c, "token_ids"), rows(probe_file(c, "token_ids")), "int64"
        grads_shape = rows(probe_file(c, "token_ids"), embedding_dim) if embedding_dim else None
        yield probe_file(c, "grads"), grads_shape, None
        for k, count in enumerate(counts):
            name = chunk_files(c, k, storage).__getitem__
            yield name("offsets"), [count + 1], "int64"
            yield name("token_ids"), rows(name("token_ids")), "int64"
            grads_shape = rows(name("token_ids"), stored_dim) if stored_dim else None
            yield name("grads"), grads_shape, stored_dtype
            yield name("by_token_vocab"), rows(name("by_token_vocab")), "int64"
            vocab = rows(name("by_token_vocab"))
            yield name("by_token_starts"), [vocab[0] + 1] if vocab else None, "int64"
            yield name("by_token_rows"), rows(name("token_ids")), "int64"
            yield name(SQUARED_NORMS), [count], "float64"
            if storage == SCALED:
                yield name(ROW_SCALES), rows(name("token_ids")), "float32"


def check_file(
    folder: str, filename: str, record: Dict[str, Any], verify: bool,
    what: str = "Index", fix: str = "rebuild the index with `build_index`",
) -> str:
    r"""
    The path of an index file, after checking that it lies inside `folder`, has
    the recorded size, an `.npy` header with the recorded shape and dtype and,
    with `verify`, the recorded sha256; `what` and `fix` word the errors (for
    other saved arrays than an index's).
    """
    file_path = os.path.join(folder, filename)
    inside = os.path.commonpath([os.path.realpath(folder), os.path.realpath(file_path)])
    if inside != os.path.realpath(folder):
        raise CorruptIndexError(
            f"{what} file {filename!r} lies outside the folder {folder!r}; {fix}."
        )
    if not os.path.isfile(file_path) or os.path.getsize(file_path) != record["bytes"]:
        raise CorruptIndexError(
            f"{what} file {file_path!r} is missing or has the wrong size (truncated?); {fix}."
        )
    shape, dtype = array_header(file_path, what, fix)
    if list(shape) != record["shape"] or str(dtype) != record["dtype"]:
        raise CorruptIndexError(
            f"{what} file {file_path!r} holds an array of shape {list(shape)} and dtype {dtype}, "
            f"but the manifest records {record['shape']} and {record['dtype']}; {fix}."
        )
    if verify and sha256_of(file_path) != record["sha256"]:
        raise CorruptIndexError(
            f"{what} file {file_path!r} has changed since it was written "
            f"(sha256 differs); {fix}."
        )
    return file_path


def array_header(
    file_path: str, what: str = "Index", fix: str = "rebuild the index with `build_index`"
) -> Any:
    r"""The shape and dtype in an `.npy` file's header (the array is not read)."""
    try:
        with open(file_path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read = {(1, 0): np.lib.format.read_array_header_1_0,
                    (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read is None:
                raise ValueError(f"unknown .npy format version {version}")
            shape, _, dtype = read(handle)
    except (ValueError, OSError, EOFError) as error:
        raise CorruptIndexError(
            f"{what} file {file_path!r} is not a numpy array file ({error}); {fix}."
        ) from error
    return shape, dtype
