r"""
Saved curvature factors (`InfluenceWE.fit_factors(path)`): a folder with one
``.npy`` array per factor and checkpoint (``c{c}-{name}.npy``, see
`Curvature.arrays`), the exact gradients of a few training examples per
checkpoint (``c{c}-probe-*.npy``, as an index keeps, which loading recomputes)
and a ``manifest.json`` that records what they were fitted from (model,
checkpoints, training data, loss and options, as an index does), each
checkpoint's damping, every file's shape, dtype, size and sha256, and a sha256
of itself. No pickle. The folder is written beside its destination and
moved into place when complete.
"""

import json
import os
import shutil
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import torch

from captum_tracin_we._core.curvature import Curvature
from captum_tracin_we._core.token_gradients import TokenGradients
from captum_tracin_we._core.index.format import (
    CHECKSUM,
    check_file,
    compare_description,
    CorruptIndexError,
    folder_kind,
    INDEX_KIND,
    IndexMismatchError,
    MANIFEST,
    manifest_checksum,
    PROBE_ARRAYS,
    probe_file,
    read_manifest,
    sibling,
)
from captum_tracin_we._core.index.writer import (
    build_lock,
    move_into_place,
    ragged_arrays,
    restore_previous,
    save_arrays,
    write_durably,
)

FACTORS_VERSION = 1
FACTORS_KIND = "InfluenceWE factors"
_FIX = "fit them again with `fit_factors(path)`"


def check_factor_path(path: str) -> None:
    r"""Refuses a `path` that exists and holds anything but saved factors (before any work)."""
    if os.path.exists(path) and folder_kind(path) != FACTORS_KIND:
        kind = folder_kind(path)
        what = "" if kind is None else f" (it holds {kind})"
        raise FileExistsError(f"{path!r} exists and is not a folder of saved factors{what}; choose another `path`.")


def save_factors(
    path: str,
    description: Dict[str, Any],
    factors: List[Curvature],
    probe_indices: List[int],
    probes: List[TokenGradients],
) -> None:
    r"""
    Writes `factors` (one per checkpoint) to the folder `path`, with the exact
    gradients `probes` of the training examples `probe_indices` at each
    checkpoint (which loading recomputes), replacing saved factors there (never
    another kind of folder), with the index writer's lock and crash-safe replacement.
    """
    path = os.path.abspath(path)
    check_factor_path(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with build_lock(path):
        restore_previous(path)
        partial = sibling(path, "partial")
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        files: Dict[str, Any] = {}
        for c, (curvature, probe) in enumerate(zip(factors, probes)):
            arrays = {f"c{c}-{name}.npy": array.cpu().numpy() for name, array in curvature.arrays().items()}
            arrays.update({probe_file(c, name): array for name, array in ragged_arrays(probe)})
            files.update(save_arrays(partial, arrays))
        manifest = {
            "format_version": FACTORS_VERSION, **description, "kind": FACTORS_KIND,
            "damping": [curvature.damping for curvature in factors],
            "examples": [curvature.examples for curvature in factors],
            "probe_indices": probe_indices,
            "files": files,
        }
        manifest[CHECKSUM] = manifest_checksum(manifest)
        write_durably(os.path.join(partial, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))
        move_into_place(partial, path)


def load_factors(
    path: str, description: Dict[str, Any], owner: str
) -> Tuple[List[Curvature], List[int], Callable[[int], TokenGradients]]:
    r"""
    The factors saved at `path`, the probe indices and a function giving the
    probe gradients of checkpoint c, after checking the manifest's checksum,
    that they were fitted from what `description` describes
    (`IndexMismatchError` naming the difference) and every file's size, header
    and sha256 (`CorruptIndexError`).
    """
    if not os.path.isfile(os.path.join(path, MANIFEST)):
        raise FileNotFoundError(f"No saved factors at {path!r} (no {MANIFEST}); save them with `fit_factors(path)`.")
    manifest = read_manifest(path, _FIX)
    if not isinstance(manifest, dict) or manifest.get(CHECKSUM) != manifest_checksum(manifest):
        raise CorruptIndexError(
            f"The manifest of the factors at {path!r} was edited since they were saved (its "
            f"{CHECKSUM} differs from its content); {_FIX}."
        )
    what = f"The factors at {path!r}"
    if manifest.get("kind", INDEX_KIND) != FACTORS_KIND:
        raise IndexMismatchError(
            f"{path!r} holds {manifest.get('kind', INDEX_KIND)}, not saved factors; give "
            "`load_factors` the folder that `fit_factors(path)` wrote."
        )
    expected = {"format_version": FACTORS_VERSION, **description, "kind": FACTORS_KIND}
    compare_description(manifest, expected, what, _FIX, owner)
    n = len(description["checkpoints"])
    for field in ("damping", "examples"):
        if not isinstance(manifest.get(field), list) or len(manifest[field]) != n:
            raise CorruptIndexError(f"{what} have a malformed manifest: `{field}` must list {n} values; {_FIX}.")

    def read(filename: str) -> torch.Tensor:
        if filename not in manifest.get("files", {}):
            raise CorruptIndexError(f"{what} lack the file {filename!r}; {_FIX}.")
        check_file(path, filename, manifest["files"][filename], True, "Factor", _FIX)
        return torch.from_numpy(np.load(os.path.join(path, filename), allow_pickle=False))

    factors = []
    names = ("basis", "eigenvalues", "tokens", "token_counts")
    for c, (damping, examples) in enumerate(zip(manifest["damping"], manifest["examples"])):
        arrays = {
            name: read(f"c{c}-{name}.npy")
            for name in names + (("corrected",) if description["approximation"] == "ekfac" else ())
        }
        factors.append(Curvature(
            description["approximation"], arrays["basis"], arrays["eigenvalues"], arrays["tokens"],
            arrays["token_counts"], arrays.get("corrected"), float(damping), int(examples),
        ))
    probes = manifest.get("probe_indices")
    if not isinstance(probes, list) or not all(isinstance(i, int) for i in probes):
        raise CorruptIndexError(f"{what} have a malformed manifest: `probe_indices`; {_FIX}.")
    return factors, probes, lambda c: TokenGradients(*(read(probe_file(c, name)) for name in PROBE_ARRAYS))
