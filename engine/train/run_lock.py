"""One run per output folder: rank 0 holds an ``flock`` on ``<output_dir>/.run.lock`` for the run's life.

Two runs writing one folder interleave ``metrics.jsonl``, delete each other's checkpoint folders and leave a
``config.yaml`` that matches neither. The lock is taken before anything is written into the folder; a
second run there stops with one line naming the holder (host, pid, start time) from the lock file. The OS
releases an ``flock`` when its process dies, so a killed run (``kill -9``, an OOM kill) never blocks the
next one.

SLURM requeue: a requeued job normally finds the lock free (its previous processes are dead). On a shared
filesystem whose server still holds a lock of a node that died (an NFS lease lasts about 90 s), the run
takes the folder over when the holder recorded the same ``SLURM_JOB_ID`` with a lower
``SLURM_RESTART_COUNT``: that holder is this job's own previous incarnation.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import IO, Optional

from biomedgpt.core.user_errors import UserError

LOCK_FILE = ".run.lock"
_HELD: dict[Path, "RunLock"] = {}  # this process's locks (a second flock on its own file would refuse itself)


class OutputDirInUse(UserError):
    """Another live run holds the output folder."""


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime()),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)}


def _read_holder(path: Path) -> dict:
    for _ in range(10):  # the holder writes its line right after locking: wait a moment for it
        try:
            text = path.read_text().strip()
            if text:
                return json.loads(text)
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    return {}


def _is_requeue_of(holder: dict) -> bool:
    job = os.environ.get("SLURM_JOB_ID")
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    return bool(job) and holder.get("slurm_job_id") == job and int(holder.get("slurm_restart_count") or 0) < restart


class RunLock:
    """The held lock (released by ``release`` or when the process ends)."""

    def __init__(self, path: Path, handle: Optional[IO[str]], note: Optional[str] = None):
        self.path, self.handle, self.note = path, handle, note

    @classmethod
    def acquire(cls, output_dir: str | Path) -> "RunLock":
        """Lock ``output_dir`` (created if missing) or raise ``OutputDirInUse`` naming the holder."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / LOCK_FILE
        if path.resolve() in _HELD:
            return _HELD[path.resolve()]
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            holder = _read_holder(path)
            if _is_requeue_of(holder):
                return _HELD.setdefault(path.resolve(), cls(path, None, note=f"output_dir {out}: taken over from this SLURM job's previous run "
                                            f"(restart {holder.get('slurm_restart_count')}, host {holder.get('host')})"))
            who = (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"
                   + (f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""))
            raise OutputDirInUse(f"{out} is in use by another run ({who}): wait for it to end, or train into "
                                 f"another output_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(_holder()) + "\n")
        handle.flush()
        return _HELD.setdefault(path.resolve(), cls(path, handle))

    def release(self) -> None:
        _HELD.pop(self.path.resolve(), None)
        if self.handle is not None:
            self.handle.close()  # closing the last descriptor releases the flock
            self.handle = None


def lock_output_dir(output_dir: str | Path, rank: int) -> Optional[RunLock]:
    """Collective: rank 0 takes the lock; if it cannot, every rank raises the same ``OutputDirInUse``
    (one line once), before any rank writes into the folder. Returns rank 0's lock (None elsewhere)."""
    from biomedgpt.engine.distributed.process_group import gather_lists

    lock, refusal = None, None
    if rank == 0:
        try:
            lock = RunLock.acquire(output_dir)
        except OutputDirInUse as exc:
            refusal = str(exc)
    refusals = gather_lists([refusal] if rank == 0 else [])
    if refusals[0] is not None:
        raise OutputDirInUse(refusals[0])
    return lock
