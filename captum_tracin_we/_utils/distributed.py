r"""
``torch.distributed`` for the sharded index (DESIGN.md section 9): which part of
the work is this process's, and the few collectives the index needs. A script
run under ``torchrun --nproc-per-node N`` needs no code of its own for it: the
default process group is started here from torchrun's environment (NCCL when
the model is on a GPU, gloo otherwise; both come with PyTorch). Without
torchrun, every function here is that of a single process.
"""

import os
from typing import Any, List, Optional, Tuple

import torch
import torch.distributed as dist


def world(device: Optional[torch.device] = None) -> Tuple[int, int]:
    r"""
    ``(rank, world size)`` of this process: ``(0, 1)`` without torchrun. Under
    torchrun (``WORLD_SIZE`` > 1 in the environment) the default process group
    is started if it is not yet, for `device`'s kind.
    """
    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return 0, 1
        on_gpu = device is not None and torch.device(device).type == "cuda"
        dist.init_process_group("nccl" if on_gpu else "gloo")
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    r"""Waits for every process (nothing to wait for in one)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def gathered(value: Any) -> List[Any]:
    r"""Every process's `value` (picklable; tensors on the CPU), by rank: ``[value]`` in one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    values: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def contiguous_part(count: int, rank: int, size: int) -> range:
    r"""Part `rank` of `size` contiguous, nearly equal parts of ``range(count)``."""
    return range(count * rank // size, count * (rank + 1) // size)
