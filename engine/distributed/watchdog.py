"""Progress watchdog: a rank that makes no progress for ``watchdog.timeout_s`` dumps every rank's stacks and
ends the job non-zero.

Every rank calls ``beat(phase, step)`` as it makes progress (each micro-batch, evaluation round, around
checkpoint writes); the last beat is kept in ``<output_dir>/watchdog/rank_XXXXX.json``. A thread of each
rank checks its own last beat: past the timeout it writes its Python stacks (``faulthandler``, every
thread) to ``<output_dir>/watchdog/stacks_rank_XXXXX.txt``, drops a ``fired`` marker in that folder and
exits with ``EXIT_WATCHDOG``. Every other rank's thread sees the marker (the output directory is shared
by every node of a job, as checkpoints need) and dumps and exits the same way, so the stacks of the rank
that hung *and* of the ranks waiting for it in a collective are in the log folder, on the local launcher
and under SLURM alike. A hang that holds the GIL (stuck C code) is caught by ``faulthandler``'s own timer
(``timeout_s + grace_s``), which needs no Python to run.
"""
from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from biomedgpt.core.durable import atomic_write_text

EXIT_WATCHDOG = 86
MARKER = "fired"


class Watchdog:
    def __init__(self, output_dir: str | Path, rank: int, timeout_s: float, poll_s: float = 1.0,
                 grace_s: float = 10.0):
        self.dir = Path(output_dir) / "watchdog"
        self.rank, self.timeout_s, self.poll_s, self.grace_s = rank, timeout_s, poll_s, grace_s
        self.heartbeat_path = self.dir / f"rank_{rank:05d}.json"
        self.stacks_path = self.dir / f"stacks_rank_{rank:05d}.txt"
        self._last = time.monotonic()
        self._phase, self._step = "start", 0
        self._written = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stacks = None
        self._started_wall = time.time()

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def start(self) -> "Watchdog":
        if not self.enabled:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        self._started_wall = time.time()
        self._stacks = open(self.stacks_path, "w", buffering=1)
        if hasattr(signal, "SIGUSR2") and threading.current_thread() is threading.main_thread():
            faulthandler.register(signal.SIGUSR2, file=self._stacks, all_threads=True)  # on demand: kill -USR2
        self.beat("start", 0)
        self._thread = threading.Thread(target=self._watch, name="biomedgpt-watchdog", daemon=True)
        self._thread.start()
        return self

    def beat(self, phase: str, step: int) -> None:
        """Progress: re-arms the timers; the heartbeat file is rewritten at most every ``poll_s`` or on a new phase."""
        if not self.enabled or self._stacks is None:
            return
        now = time.monotonic()
        changed = phase != self._phase
        self._last, self._phase, self._step = now, phase, step
        faulthandler.dump_traceback_later(self.timeout_s + self.grace_s, repeat=False, file=self._stacks, exit=True)
        if changed or now - self._written >= self.poll_s:
            self._written = now
            record = {"rank": self.rank, "pid": os.getpid(), "phase": phase, "step": step, "time": time.time()}
            atomic_write_text(self.heartbeat_path, json.dumps(record), fsync=False)  # never waits on the disk

    def stop(self) -> None:
        if self._stacks is None:
            return
        self._stop.set()
        faulthandler.cancel_dump_traceback_later()
        if hasattr(signal, "SIGUSR2") and threading.current_thread() is threading.main_thread():
            faulthandler.unregister(signal.SIGUSR2)
        if self._thread is not None:
            self._thread.join(timeout=self.poll_s * 2 + 1)
        self._stacks.close()
        self._stacks = None
        if self.stacks_path.exists() and self.stacks_path.stat().st_size == 0:
            self.stacks_path.unlink()

    # -- the watching thread ---------------------------------------------------------------------

    def _peer_fired(self) -> str | None:
        marker = self.dir / MARKER
        try:
            if marker.stat().st_mtime >= self._started_wall - 1:
                return marker.read_text().strip() or "another rank"
        except OSError:
            pass
        return None

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                reason = (f"rank {self.rank} made no progress for {idle:.0f}s (watchdog.timeout_s="
                          f"{self.timeout_s:g}) in phase {self._phase!r} after step {self._step}")
                atomic_write_text(self.dir / MARKER, reason, fsync=False)  # a hung disk must not stop the watchdog
                self._fire(reason, wait_for_peers=True)
            peer = self._peer_fired()
            if peer is not None:
                self._fire(f"rank {self.rank} stopping: {peer}", wait_for_peers=False)

    def _fire(self, reason: str, wait_for_peers: bool) -> None:
        stacks = self._stacks
        if stacks is None:
            return
        faulthandler.cancel_dump_traceback_later()
        stacks.write(f"watchdog: {reason}\nPython stacks of rank {self.rank} (pid {os.getpid()}), phase "
                     f"{self._phase!r}, step {self._step}:\n")
        stacks.flush()
        faulthandler.dump_traceback(file=stacks, all_threads=True)
        stacks.flush()
        os.fsync(stacks.fileno())
        print(f"watchdog: {reason}; stacks of every rank in {self.dir}; exiting with status {EXIT_WATCHDOG}",
              file=sys.stderr, flush=True)
        if wait_for_peers:  # let the ranks waiting on this one see the marker and dump before it exits
            time.sleep(self.poll_s * 3 + 1)
        os._exit(EXIT_WATCHDOG)
