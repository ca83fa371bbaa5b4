"""streaming's shared memory on a machine that several jobs share (SLURM nodes, test workers).

streaming (0.13) names a dataset's shared memory by a prefix number that every rank finds on its own by
scanning /dev/shm, after which the local leader registers it. Two jobs starting together interleave
those scans and registrations: a rank then attaches to the other job's memory ("shared memory registered
does not match local leader") or registration collides (FileExistsError). And streaming's
``clean_stale_shared_memory`` unlinks every streaming segment on the machine, live jobs' included. This
module adds what streaming lacks for that:

- ``registration_lock()``: one job registers at a time on a machine. Every rank scans only while its
  local leader holds the machine's lock, and a job takes its nodes' locks all or none (try, agree over
  the group, back off), so two multi-node jobs sharing nodes cannot deadlock on them;
- ``remove_orphaned_segments()``: unlinks only the segments no live process maps (a crashed run's),
  which streaming would otherwise take for a live dataset using the same local cache directory.
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import tempfile
import time
from pathlib import Path

SHM_DIR = Path("/dev/shm")
#: a segment changed this recently may be mid-creation (opened, not yet mapped): never taken for orphaned
ORPHAN_MIN_AGE_S = 5.0


def _lock_path() -> str:
    # Beside what it protects: processes sharing /dev/shm share the lock; nodes with their own /dev/shm
    # (but perhaps a shared /tmp) do not.
    base = SHM_DIR if SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK) else Path(tempfile.gettempdir())
    return str(base / "biomedgpt-streaming-register.lock")


def _segment_pattern() -> re.Pattern:
    from biomedgpt.data.streaming_api import SHM_TO_CLEAN

    return re.compile(r"\d{6}_(?:" + "|".join(map(re.escape, SHM_TO_CLEAN)) + r")")


def _mapped_shm_files() -> set[str]:
    """/dev/shm files mapped by a process this user may inspect (the only ones it may unlink)."""
    mapped = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            maps = (proc / "maps").read_text()
        except OSError:  # gone, or another user's
            continue
        for line in maps.splitlines():
            at = line.find(str(SHM_DIR) + "/")
            if at >= 0:
                mapped.add(line[at:].removesuffix(" (deleted)"))
    return mapped


def remove_orphaned_segments() -> list[str]:
    """Unlink this user's streaming segments that no live process maps; their names."""
    if not SHM_DIR.is_dir():
        return []
    pattern, uid = _segment_pattern(), os.getuid()
    candidates, now = [], time.time()
    for path in SHM_DIR.iterdir():
        try:
            info = path.stat()
        except OSError:
            continue
        if pattern.fullmatch(path.name) and info.st_uid == uid and now - info.st_mtime > ORPHAN_MIN_AGE_S:
            candidates.append(path)
    if not candidates:
        return []
    mapped = _mapped_shm_files()  # read after listing: a segment created since is not a candidate
    removed = []
    for path in candidates:
        if str(path) not in mapped:
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path.name)
    return removed


def _group_device():
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def registration_lock(backoff_s: float = 0.05):
    """Hold the machine's registration lock (the local leader does) while every rank of the job builds its
    streaming datasets; on the way in the leader removes orphaned segments. Collective when
    torch.distributed is up: every rank of the group must enter."""
    import torch
    import torch.distributed as dist
    from filelock import FileLock, Timeout

    lock = FileLock(_lock_path()) if int(os.environ.get("LOCAL_RANK", 0)) == 0 else None
    grouped = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not grouped:
        if lock is not None:
            lock.acquire()
    else:
        jitter = random.Random(os.getpid())
        while True:
            held = False
            if lock is not None:
                with contextlib.suppress(Timeout):
                    held = lock.acquire(timeout=0) is not None
            everyone = torch.tensor([int(held or lock is None)], device=_group_device())
            dist.all_reduce(everyone, op=dist.ReduceOp.MIN)
            if everyone.item():
                break
            if held:
                lock.release()
            time.sleep(jitter.uniform(backoff_s, 4 * backoff_s))
    try:
        if lock is not None:
            remove_orphaned_segments()
        yield
        if grouped:
            dist.barrier()  # every rank has attached before another job may register
    finally:
        if lock is not None:
            lock.release()
