"""Host memory that training frees goes back to the operating system.

glibc's malloc serves allocations below its mmap threshold from heap arenas and keeps what is freed there,
and the threshold grows (up to 32 MiB) each time a larger block is freed. A training step allocates and
frees tensors of a few MiB by the thousand (activations, ZeRO-3's gathered layers and gradient buckets on a
CPU rank, offloaded states' staging), so the arenas fragment and a rank's resident memory grows by
gigabytes above what it holds. Measured with base on 2 CPU ranks under ZeRO-3 (ds_configs/zero3_low_memory.json,
no checkpoint): 5.09 GiB per rank at glibc's default (5.24 with ``MALLOC_ARENA_MAX=2``), 3.95 GiB with a fixed
1 MiB threshold, the step no slower. Each mmap'd block costs page faults when it is touched, though: a
base CPU step without ZeRO (one process, batch 4) took ~35% longer, so the trainer sets it at ZeRO-3 only
(``deepspeed.host_mmap_threshold_mib``). PyTorch's CPU allocator has no setting for this; ``mallopt`` is
glibc's own, applied once per process before the model is built (the same as ``MALLOC_MMAP_THRESHOLD_`` in
the environment, which takes precedence when set).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3  # glibc malloc.h


def set_mmap_threshold(mib: float) -> bool:
    """Allocations of ``mib`` MiB and more are mmap'd (returned on free); 0 or a non-glibc libc: unchanged.
    Returns whether the threshold was set."""
    if mib <= 0 or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(mib * 2**20)))
