"""Checkpoint writes that do not stall the training step: snapshot to host memory, write in a background thread.

DeepSpeed 0.19.8 has two writers of its own (``checkpoint.writer`` in its config): ``FastCheckpointEngine``
(the ``fast`` writer needs the async_io op, which needs libaio and is not buildable here: ``AsyncIOBuilder``
reports it incompatible on this machine) and ``DecoupledCheckpointEngine`` (a spawned process that writes
what it is sent through a multiprocessing queue). The decoupled one is not used: it sends the *live*
tensors (on CPU ``torch.multiprocessing`` moves their storage into shared memory, i.e. copies it and
swaps it under the model), only waits for the write at the next optimizer step (the write is blocking
again as soon as it outlasts one forward + backward: on a GPU always), sets the global multiprocessing
start method to ``spawn``, does not fsync, and commits DeepSpeed's own ``latest`` file, not ours.

What this module does instead, for both writing modes:

- ``SnapshotEngine`` replaces the DeepSpeed engine's ``checkpoint_engine``: DeepSpeed's ``save_checkpoint``
  hands it every file it would write (model states, each rank's ZeRO optimizer partition). Background
  mode copies the tensors into host buffers and queues the write; sync mode writes at once.
- Every file is written to a temporary name, fsynced, renamed, and its directory fsynced.
- ``BackgroundWriter`` runs one write job (all of a checkpoint's files on this rank, then its completion
  step) at a time on one thread, in submission order: two checkpoints never interleave. A new save waits
  for the previous job (``wait``), which also re-raises any error of the background write.

What background writing adds: one host copy of this rank's checkpoint state (model, optimizer, EMA),
allocated and touched before the first save (``CheckpointManager.reserve``, which the trainer calls after
its first step, once the optimizer state exists) and reused by every save (the snapshot is a copy into it:
the blocked time; on GPUs into pinned memory); a thread that competes with the training step for CPU while it writes;
and, until the write completes, the newest checkpoint is not yet ``latest`` (a crash then resumes from
the previous one, as before). Snapshots preserve storage sharing (views of one storage stay views of one
copy), so files are what ``torch.save`` of the live state would have written.
"""
from __future__ import annotations

import copy
import os
import pickle
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from biomedgpt.core.durable import atomic_file

#: Fault injection for tests: seconds the background writer sleeps before each file (0: none).
DELAY_ENV = "BIOMEDGPT_CHECKPOINT_WRITE_DELAY_S"


def durable_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through the atomic, fsynced write of ``core/durable.py``."""
    with atomic_file(path) as f:
        torch.save(obj, f)


class HostSnapshot:
    """Copies of state dicts in host memory, into buffers kept for the next save of the same file."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, int], torch.Tensor] = {}  # (file, storage ordinal) -> uint8 host buffer
        self.bytes = 0  # copied by the last ``take`` calls since ``reset_count``

    def reset_count(self) -> None:
        self.bytes = 0

    def take(self, obj: Any, key: str) -> Any:
        """A copy of ``obj`` whose tensors live in this snapshot's buffers; everything else is deep-copied,
        types included."""
        return self._walk(obj, key, copy_data=True)

    def reserve(self, obj: Any, key: str) -> None:
        """Allocate and touch the buffers ``take(obj, key)`` will copy into, copying nothing: a first save
        then blocks no longer than later ones (no allocation, no page faults inside the snapshot)."""
        self._walk(obj, key, copy_data=False)

    def _walk(self, obj: Any, key: str, copy_data: bool) -> Any:
        copies: dict[tuple[int, torch.device], torch.UntypedStorage] = {}
        pending_cuda = [False]

        def storage_copy(t: torch.Tensor) -> torch.UntypedStorage:
            src = t.untyped_storage()
            ident = (src.data_ptr(), t.device)
            if ident not in copies:
                nbytes = src.nbytes()
                slot = (key, len(copies))
                buf = self.buffers.get(slot)
                if buf is None or buf.numel() != nbytes:
                    buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=t.is_cuda)
                    if not t.is_cuda:  # pinned pages are resident already; pageable ones fault on first write
                        buf.zero_()
                    self.buffers[slot] = buf
                if nbytes and copy_data:
                    whole = torch.empty(0, dtype=torch.uint8, device=t.device).set_(src, 0, (nbytes,), (1,))
                    if t.is_cuda:
                        buf.copy_(whole, non_blocking=True)
                        pending_cuda[0] = True
                    else:  # one plain memcpy: no intra-op thread pool to wake per tensor
                        np.copyto(buf.numpy(), whole.numpy())
                self.bytes += nbytes
                copies[ident] = buf.untyped_storage()
            return copies[ident]

        def tensor_copy(value: torch.Tensor) -> torch.Tensor:
            if value.layout != torch.strided:
                return value.detach().to("cpu", copy=True)
            out = torch.empty(0, dtype=value.dtype)
            out.set_(storage_copy(value.detach()), value.storage_offset(), value.size(), value.stride())
            if isinstance(value, torch.nn.Parameter):
                return torch.nn.Parameter(out, requires_grad=value.requires_grad)
            return out.requires_grad_(value.requires_grad) if value.is_leaf else out

        tensors = _tensors_in(obj)
        if not copy_data:
            for tensor in tensors:
                if tensor.layout == torch.strided:
                    storage_copy(tensor.detach())
            return None
        # Everything but the tensors is deep-copied, so every object keeps its type (torch.Size, enums,
        # DeepSpeed's loss scaler, named tuples, ...) and the file is what torch.save of ``obj`` writes.
        memo = {id(tensor): tensor_copy(tensor) for tensor in tensors}
        out = copy.deepcopy(obj, memo)
        if pending_cuda[0]:
            torch.cuda.synchronize()
        return out


class _TensorFinder(pickle.Pickler):
    """Lists the tensors ``torch.save`` would write, reached the way it reaches them (pickling)."""

    def __init__(self) -> None:
        super().__init__(_Discard(), protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors: dict[int, torch.Tensor] = {}

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            self.tensors.setdefault(id(obj), obj)
            return id(obj)
        return None


class _Discard:
    def write(self, data: bytes) -> int:
        return len(data)


def _tensors_in(obj: Any) -> list[torch.Tensor]:
    finder = _TensorFinder()
    finder.dump(obj)
    return list(finder.tensors.values())


@dataclass
class WriteFailure:
    """A checkpoint write that failed: the error, the file being written (None: the commit), the step."""

    error: BaseException
    path: Optional[str]
    step: Optional[int]


def os_error(exc: BaseException) -> Optional[OSError]:
    """The OSError behind ``exc`` (torch.save reports a failed write, e.g. ENOSPC, as a RuntimeError
    raised while the OSError was being handled)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class BackgroundWriter:
    """One thread, one job at a time, in order. A job: files (path, object), then ``on_done()``."""

    def __init__(self, background: bool):
        self.background = background
        self.snapshot = HostSnapshot()
        self._files: list[tuple[str, Any]] = []
        self._jobs: "queue.Queue[Optional[tuple[list, Callable[[], None]]]]" = queue.Queue()
        self._cond = threading.Condition()
        self._pending = 0
        self.failure: Optional[WriteFailure] = None  # the first failed write; nothing is written after it
        self.job_step: Optional[int] = None  # the step of the checkpoint being handed over (for messages)
        self.on_failure: Optional[Callable[[WriteFailure], None]] = None  # called in the writer thread
        self._thread: Optional[threading.Thread] = None
        self.reserving = False  # ``add`` only allocates the snapshot buffers (``CheckpointManager.reserve``)
        self.delay_s = float(os.environ.get(DELAY_ENV, "0") or 0)

    # -- the caller's side (the training thread) -----------------------------------------------

    def add(self, obj: Any, path: str | Path) -> None:
        """A file of the current job: snapshotted now (background) or written now (sync). A failed
        synchronous write (disk full, ...) is recorded in ``failure``, not raised, so every rank goes
        on through DeepSpeed's save in step and the manager reports it once, collectively."""
        if self.reserving:
            self.snapshot.reserve(obj, Path(path).name)
        elif self.background:
            self._files.append((str(path), self.snapshot.take(obj, Path(path).name)))
        elif self.failure is None:
            try:
                durable_torch_save(obj, path)
            except Exception as exc:  # noqa: BLE001
                if os_error(exc) is None:
                    raise
                self.failure = WriteFailure(exc, str(path), self.job_step)

    def finish(self, on_done: Callable[[], None]) -> None:
        """Close the current job: in the background its files are written, then ``on_done`` runs (not
        after a failed write)."""
        files, self._files = self._files, []
        if not self.background:
            if self.failure is None:
                try:
                    on_done()
                except Exception as exc:  # noqa: BLE001
                    if os_error(exc) is None:
                        raise
                    self.failure = WriteFailure(exc, None, self.job_step)
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
            self._thread.start()
        with self._cond:
            self._pending += 1
        self._jobs.put((files, on_done, self.job_step))

    def wait(self) -> None:
        """Until every queued job is written (or given up after a failure: see ``failure``)."""
        with self._cond:
            self._cond.wait_for(lambda: self._pending == 0)

    @property
    def busy(self) -> bool:
        return self._pending > 0

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._thread is not None:
                self._jobs.put(None)
                self._thread.join()
                self._thread = None

    # -- the writer thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            files, on_done, step = job
            job, path = None, None
            try:
                if self.failure is None:  # after a failure nothing more is written or committed
                    while files:
                        path, obj = files.pop(0)
                        if self.delay_s:
                            time.sleep(self.delay_s)
                        durable_torch_save(obj, path)
                        obj = None
                    path = None
                    on_done()
            except BaseException as exc:  # noqa: BLE001  (reported by the checkpoint manager)
                self.failure = WriteFailure(exc, path, step)
                if self.on_failure is not None:
                    self.on_failure(self.failure)
            finally:
                files = None
                with self._cond:
                    self._pending -= 1
                    self._cond.notify_all()


def snapshot_engine(writer: BackgroundWriter, load: Callable[[str], Any]):
    """A DeepSpeed checkpoint engine that hands every file to ``writer`` and reads every file DeepSpeed
    loads with ``load`` (weights-only, instead of DeepSpeed's ``torch.load(weights_only=False)``)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class SnapshotEngine(TorchCheckpointEngine):
        def __init__(self) -> None:
            super().__init__(None)
            self.name = "BiomedGPTSnapshotEngine"

        def create(self, info) -> None:
            pass

        def save(self, state_dict, path: str) -> None:
            writer.add(state_dict, path)

        def load(self, path: str, map_location=None):
            return load(path)

        def commit(self, info) -> bool:
            return True  # our CheckpointManager commits (the meta file, the pointer) once every rank's files are durable

    return SnapshotEngine()
