r"""
The on-disk index of training token gradients: its `format` (file names,
manifest checks, errors), its `writer` (crash-safe, resumable builds), its
`reader` (`open_index`, `GradientIndex`), and `sharded` (one shard per process
under torch.distributed, `ShardedIndex`).
"""

from captum_tracin_we._core.index.format import (
    CorruptIndexError,
    IndexBuildInProgressError,
    IndexMismatchError,
)
from captum_tracin_we._core.index.reader import GradientIndex, open_index
from captum_tracin_we._core.index.sharded import ShardedIndex
from captum_tracin_we._core.index.writer import BuildProgress, CheckpointChunks, write_index

__all__ = [
    "BuildProgress",
    "CheckpointChunks",
    "CorruptIndexError",
    "GradientIndex",
    "IndexBuildInProgressError",
    "IndexMismatchError",
    "open_index",
    "ShardedIndex",
    "write_index",
]
