r"""File helpers shared by the gradient index and the data downloads."""

import hashlib
import os
from typing import Union


def sha256_of(path: Union[str, os.PathLike]) -> str:
    r"""The hex sha256 of a file's content, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
