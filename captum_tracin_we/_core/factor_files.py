r"""
Saved curvature factors (`InfluenceWE.fit_factors(path)`): a folder with one
``.npy`` array per factor and checkpoint (``c{c}-{name}.npy``, see
`Curvature.arrays`) and a ``manifest.json`` that records what they were fitted
from (model, checkpoints, training data, loss and options, as an index does),
each checkpoint's damping, every file's shape, dtype, size and sha256, and a
sha256 of itself. No pickle. The folder is written beside its destination and
moved into place when complete.
"""

import json
import os
import shutil
from typing import Any, Dict, List

import numpy as np
import torch

from captum_tracin_we._core.curvature import Curvature
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
    read_manifest,
    sibling,
)
from captum_tracin_we._core.index.writer import (
    build_lock,
    move_into_place,
    restore_previous,
    save_arrays,
    write_durably,
)

FACTORS_VERSION = 1
FACTORS_KIND = "InfluenceWE factors"
_FIX = "fit them again with `fit_factors(path)`"


def save_factors(path: str, description: Dict[str, Any], factors: List[Curvature]) -> None:
    r"""
    Writes `factors` (one per checkpoint) to the folder `path`, replacing saved
    factors there (never another kind of folder), with the index writer's lock
    and crash-safe replacement.
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and folder_kind(path) != FACTORS_KIND:
        kind = folder_kind(path)
        what = "" if kind is None else f" (it holds {kind})"
        raise FileExistsError(f"{path!r} exists and is not a folder of saved factors{what}; choose another `path`.")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with build_lock(path):
        restore_previous(path)
        partial = sibling(path, "partial")
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        files: Dict[str, Any] = {}
        for c, curvature in enumerate(factors):
            arrays = {f"c{c}-{name}.npy": array.cpu().numpy() for name, array in curvature.arrays().items()}
            files.update(save_arrays(partial, arrays))
        manifest = {
            "format_version": FACTORS_VERSION, **description, "kind": FACTORS_KIND,
            "damping": [curvature.damping for curvature in factors],
            "examples": [curvature.examples for curvature in factors],
            "files": files,
        }
        manifest[CHECKSUM] = manifest_checksum(manifest)
        write_durably(os.path.join(partial, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))
        move_into_place(partial, path)


def load_factors(path: str, description: Dict[str, Any], owner: str) -> List[Curvature]:
    r"""
    The factors saved at `path`, after checking the manifest's checksum, that
    they were fitted from what `description` describes (`IndexMismatchError`
    naming the difference) and every file's size, header and sha256
    (`CorruptIndexError`).
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
    factors = []
    for c, (damping, examples) in enumerate(zip(manifest["damping"], manifest["examples"])):
        arrays = {}
        names = ("basis", "eigenvalues", "tokens", "token_counts")
        for name in names + (("corrected",) if description["approximation"] == "ekfac" else ()):
            filename = f"c{c}-{name}.npy"
            if filename not in manifest["files"]:
                raise CorruptIndexError(f"{what} lack the file {filename!r}; {_FIX}.")
            check_file(path, filename, manifest["files"][filename], True, "Factor", _FIX)
            arrays[name] = torch.from_numpy(np.load(os.path.join(path, filename), allow_pickle=False))
        factors.append(Curvature(
            description["approximation"], arrays["basis"], arrays["eigenvalues"], arrays["tokens"],
            arrays["token_counts"], arrays.get("corrected"), float(damping), int(examples),
        ))
    return factors
