r"""
A sharded index (DESIGN.md section 9): under ``torch.distributed`` each process
builds one shard, an index of a contiguous part of the training batches, with
the crash-safe writer of `writer` (so an interrupted shard resumes like any
index); once every shard is complete, rank 0 writes a top-level manifest that
lists them and moves the whole folder into place:

    <path>/manifest.json       kind "a sharded training-gradient index", the
                               description of the whole training data, and per
                               shard its folder, first example, size, batches and
                               build id
    <path>/shard-00000/ ...    one index per shard (its manifest's description
                               has a "shard" entry: its position and batches)

`ShardedIndex` reads it in one process as one index (its chunks are the shards'
chunks, in order), or, under torchrun, each process its own shard's chunks.
"""

import itertools
import json
import os
import shutil
import uuid
from contextlib import ExitStack
from typing import Any, Callable, Dict, Iterator, List

import torch
from torch import Tensor

from captum_tracin_we._core.index.format import (
    CHECKSUM,
    compare_description,
    CorruptIndexError,
    folder_kind,
    FORMAT_VERSION,
    INDEX_KINDS,
    IndexMismatchError,
    manifest_checksum,
    MANIFEST,
    SHARDED_KIND,
    sibling,
)
from captum_tracin_we._core.index.reader import GradientIndex
from captum_tracin_we._core.index.writer import (
    build_lock,
    move_into_place,
    PROGRESS,
    refuse_non_index,
    restore_previous,
    write_durably,
)
from captum_tracin_we._core.token_gradients import TokenGradients
from captum_tracin_we._core.token_major import TokenMajorGradients
from captum_tracin_we._utils import distributed

def shard_folder(rank: int) -> str:
    return f"shard-{rank:05d}"


class ShardedIndex:
    r"""
    The shards of a sharded index read as one `GradientIndex` (the same
    methods): chunk k is the k-th chunk of the shards taken in order.
    `shard_chunks(rank)` are the chunks of one shard.
    """

    def __init__(self, path: str, manifest: Dict[str, Any], shards: List[GradientIndex]) -> None:
        self.path, self.shards = path, shards
        first = shards[0].manifest
        # the shards' own per-checkpoint fields, for code that reads an index's manifest
        self.manifest = {
            **manifest,
            **{key: first[key] for key in ("learning_rates", "probe_indices", "checkpoints")},
            "chunks": [sum((shard.manifest["chunks"][c] for shard in shards), [])
                       for c in range(len(first["chunks"]))],
        }
        self.starts = [entry["first_example"] for entry in manifest["shards"]]
        self._chunk_owner = [(s, k) for s, shard in enumerate(shards) for k in range(shard.num_chunks(0))]

    @property
    def num_checkpoints(self) -> int:
        return self.shards[0].num_checkpoints

    @property
    def learning_rates(self) -> List[float]:
        return self.shards[0].learning_rates

    @property
    def num_examples(self) -> int:
        return int(self.manifest["training_data"]["examples"])

    def num_chunks(self, c: int) -> int:
        return len(self._chunk_owner)

    def chunk(self, c: int, k: int, lazy: bool = False) -> TokenGradients:
        shard, local = self._chunk_owner[k]
        return self.shards[shard].chunk(c, local, lazy)

    def chunk_by_token(self, c: int, k: int, lazy: bool = False) -> TokenMajorGradients:
        shard, local = self._chunk_owner[k]
        return self.shards[shard].chunk_by_token(c, local, lazy)

    def chunks(self, c: int) -> Iterator[TokenGradients]:
        for shard in self.shards:
            yield from shard.chunks(c)

    def shard_chunks(self, rank: int) -> List[int]:
        r"""The chunks (global numbers) of shard `rank`."""
        return [k for k, (shard, _) in enumerate(self._chunk_owner) if shard == rank]

    def probe(self, c: int) -> TokenGradients:
        return self.shards[0].probe(c)

    def select(self, c: int, examples: List[int]) -> TokenGradients:
        parts = []
        wanted = torch.tensor(examples, dtype=torch.long)
        for start, shard in zip(self.starts, self.shards):
            local = wanted[(wanted >= start) & (wanted < start + shard_examples(shard))]
            if local.numel():
                parts.append(shard.select(c, (local - start).tolist()))
        return TokenGradients.concat(parts)

    def squared_norms(self, c: int) -> Tensor:
        return torch.cat([shard.squared_norms(c) for shard in self.shards])


def shard_examples(shard: GradientIndex) -> int:
    return sum(shard.manifest["chunks"][0])


def shard_description(description: Dict[str, Any], rank: int, size: int, batches: range) -> Dict[str, Any]:
    r"""What shard `rank` of `size` was built from: the whole description, and its batches."""
    return {**description, "shard": {"index": rank, "count": size, "batches": [batches.start, batches.stop]}}


def write_sharded_index(
    path: str,
    description: Dict[str, Any],
    write_shard: Callable[[str], GradientIndex],
    resume: bool,
    rank: int,
    size: int,
) -> ShardedIndex:
    r"""
    Builds the sharded index at `path` with every process: each writes its
    shard with ``write_shard(folder)`` (the crash-safe writer) inside the
    hidden ``.<name>.partial`` folder; once all are complete, rank 0 writes the
    top-level manifest and moves the folder into place, replacing an index
    there. Every process returns the opened index.
    """
    path = os.path.abspath(path)
    partial = sibling(path, "partial")
    with ExitStack() as held:
        if rank == 0:  # rank 0 prepares the folder and holds the build's lock throughout
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if os.path.isdir(path) and folder_kind(path) not in INDEX_KINDS:
                refuse_non_index(path)
            held.enter_context(build_lock(path))
            restore_previous(path)
            single = any(os.path.exists(os.path.join(partial, name)) for name in (PROGRESS, MANIFEST))
            if os.path.isdir(partial) and (single or not resume):
                shutil.rmtree(partial)  # a single-process partial build, or starting over
            os.makedirs(partial, exist_ok=True)
            for name in os.listdir(partial):  # shards of a build with more processes
                if name.startswith("shard-") and name not in {shard_folder(r) for r in range(size)}:
                    shutil.rmtree(os.path.join(partial, name))
        distributed.barrier()
        shard = write_shard(os.path.join(partial, shard_folder(rank)))
        built = distributed.gathered(
            (shard.manifest["build_id"], shard_examples(shard), shard.manifest["shard"]["batches"])
        )
        if rank == 0:
            starts = [0, *itertools.accumulate(examples for _, examples, _ in built)]
            manifest = {
                "kind": SHARDED_KIND, "format_version": FORMAT_VERSION, "build_id": uuid.uuid4().hex,
                **description,
                "shards": [{"folder": shard_folder(r), "first_example": starts[r], "examples": examples,
                            "batches": batches, "build_id": build_id}
                           for r, (build_id, examples, batches) in enumerate(built)],
            }
            manifest[CHECKSUM] = manifest_checksum(manifest)
            write_durably(os.path.join(partial, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))
            move_into_place(partial, path)
    distributed.barrier()
    with open(os.path.join(path, MANIFEST), encoding="utf-8") as handle:
        manifest = json.load(handle)
    return ShardedIndex(path, manifest, [
        GradientIndex.opened(os.path.join(path, entry["folder"]), _shard_manifest(path, entry))
        for entry in manifest["shards"]
    ])


def _shard_manifest(path: str, entry: Dict[str, Any]) -> Dict[str, Any]:
    with open(os.path.join(path, entry["folder"], MANIFEST), encoding="utf-8") as handle:
        return json.load(handle)


def open_sharded_index(
    path: str,
    manifest: Dict[str, Any],
    expected: Dict[str, Any],
    open_shard: Callable[[str, Dict[str, Any]], GradientIndex],
    owner: str,
) -> ShardedIndex:
    r"""
    Opens the sharded index whose top-level `manifest` was read from `path`:
    checks its checksum and description against `expected`, opens every shard
    with ``open_shard(folder, expected_description)``, and checks that the
    shards are the builds it lists and hold all the training examples, in order.
    """
    if manifest.get(CHECKSUM) != manifest_checksum(manifest) or not isinstance(manifest.get("shards"), list):
        raise CorruptIndexError(
            f"The manifest of the sharded index at {path!r} was edited since it was built (its "
            f"{CHECKSUM} differs from its content); rebuild it with `build_index`."
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IndexMismatchError(
            f"The index at {path!r} has format version {manifest.get('format_version')!r}, this package "
            f"reads version {FORMAT_VERSION}; rebuild it with `build_index`."
        )
    compare_description(manifest, expected, f"The index at {path!r}", "rebuild it with `build_index`", owner)
    shards, size, start = [], len(manifest["shards"]), 0
    for rank, entry in enumerate(manifest["shards"]):
        folder = os.path.join(path, entry["folder"])
        batches = entry.get("batches")
        if not (isinstance(batches, list) and len(batches) == 2 and all(isinstance(b, int) for b in batches)):
            raise CorruptIndexError(
                f"The manifest of the sharded index at {path!r} gives shard {rank} no batches; rebuild it "
                "with `build_index`."
            )
        if not os.path.isfile(os.path.join(folder, MANIFEST)):
            raise CorruptIndexError(
                f"Shard {rank} of the index at {path!r} ({folder!r}) is missing; rebuild the index with "
                "`build_index`."
            )
        shard = open_shard(folder, shard_description(expected, rank, size, range(*batches)))
        if shard.manifest["build_id"] != entry["build_id"] or entry["first_example"] != start \
                or shard_examples(shard) != entry["examples"]:
            raise CorruptIndexError(
                f"Shard {rank} of the index at {path!r} ({folder!r}) is not the one its manifest lists "
                "(another build's, or moved); rebuild the index with `build_index`."
            )
        start += entry["examples"]
        shards.append(shard)
    if start != expected["training_data"]["examples"]:
        raise CorruptIndexError(
            f"The shards of the index at {path!r} hold {start} training examples, its training data has "
            f"{expected['training_data']['examples']}; rebuild it with `build_index`."
        )
    return ShardedIndex(os.path.abspath(path), manifest, shards)
