"""Training checkpoints: DeepSpeed's sharded state + per-rank engine state, an atomic pointer to the newest
complete tag, keep-last-N. The layout and its file names: ``biomedgpt.engine.checkpoint.layout``.

A crash mid-save leaves the pointer at the previous complete checkpoint; a failed write (disk full, ...)
too: it is reported once, as one line (``CheckpointWriteError``: ``no space left on <root>: checkpoint step
N not written; latest is step M``) by every rank together - at the save itself when writing synchronously,
at the next training step when writing in the background (``Trainer.train_step`` shares the flag) - and
the run stops; DeepSpeed's own pointer file is
not written (``save_latest=False``), ours has the same name and format so DeepSpeed's tools
(``zero_to_fp32.py``) still find it.

Writing (``biomedgpt.engine.checkpoint.writer``): every file is fsynced before its rename; with
``background`` the state is snapshotted to host memory and written by a thread while training goes on.
Each rank marks its files durable; rank 0 (in its writer thread) waits for every rank's mark, then writes
the tag's consolidation index (``engine/checkpoint/consolidation_index.py``: consolidating the tag then
needs no torch), the meta file (the tag is complete) and moves the pointer. A new save first waits for the
previous one on every rank, so two checkpoints never interleave.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from biomedgpt.engine.checkpoint import layout
from biomedgpt.engine.checkpoint.layout import TAG_RE, tag_for
from biomedgpt.engine.checkpoint.writer import BackgroundWriter, os_error, snapshot_engine
from biomedgpt.core.durable import atomic_write_text
from biomedgpt.engine.distributed.process_group import all_reduce, barrier
from biomedgpt.core.user_errors import UserError


class CheckpointWriteError(RuntimeError):
    """A checkpoint that could not be written. ``line`` is the one line the reporting rank prints (None on
    the other ranks, which stop quietly)."""

    def __init__(self, line: str | None):
        super().__init__(line or "a checkpoint write failed on another rank")
        self.line = line


class ResumeError(UserError, RuntimeError):
    """A checkpoint that cannot be resumed (incomplete, unsafe, or missing a rank's state)."""


def load_file(path: str | Path, meta: bool = False) -> Any:
    """A checkpoint file for resuming (into memory, not mapped, DeepSpeed's own objects; ``meta``: only
    checked, no tensor read), weights-only: a crafted file is refused with one line (``ResumeError``),
    nothing in it runs."""
    from biomedgpt.engine.checkpoint.load import load_checkpoint_file
    from biomedgpt.models.checkpoint import CheckpointError

    try:
        return load_checkpoint_file(path, mmap=False, meta=meta, live=not meta)
    except CheckpointError as exc:
        raise ResumeError(f"{exc}; the checkpoint cannot be resumed") from None


def to_universal(tag_dir: str | Path, output: str | Path | None = None, overwrite: bool = False,
                 checked: bool = False) -> Path:
    """DeepSpeed's ``ds_to_universal`` on a ZeRO 1-3 tag, published atomically (default ``<tag>/universal``);
    the one conversion, for ``biomedgpt reshard`` and for a run resuming on another world size or stage.

    Every file of the tag is read weights-only first (the converter unpickles them all): a crafted one is
    refused (``CheckpointError``) before it runs (``checked``: the caller has, with ``open_checkpoint``). A
    run then resumes on any number of ranks with ``"checkpoint": {"load_universal": true}`` and
    ``load_checkpoint(<tag dir>, tag="universal")``."""
    from biomedgpt.engine.checkpoint.load import load_checkpoint_file
    from biomedgpt.models.checkpoint import CheckpointError, write_dir_atomically

    tag_dir = Path(tag_dir)
    if not checked:
        for path in sorted(tag_dir.glob("*.pt")):
            load_checkpoint_file(path, meta=True)
    out = Path(output) if output is not None else tag_dir / layout.UNIVERSAL_DIR

    def convert(folder: Path) -> None:
        target = folder / "ckpt"  # ds_to_universal writes a pointer file beside its output: kept out
        result = subprocess.run(
            [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
             "--output_folder", str(target), "--num_extract_workers", "1", "--num_merge_workers", "1",
             "--inject_missing_state"], capture_output=True, text=True)
        if result.returncode != 0:
            raise CheckpointError(f"ds_to_universal failed on {tag_dir}:\n{result.stdout[-2000:]}\n"
                                  f"{result.stderr[-4000:]}")
        for item in target.iterdir():
            os.replace(item, folder / item.name)
        target.rmdir()
        (folder / layout.LATEST_UNIVERSAL_FILE).unlink(missing_ok=True)

    return write_dir_atomically(out, convert, overwrite)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointManager:
    def __init__(self, output_dir: str | Path, rank: int, world_size: int, keep_last_n: int,
                 background: bool = False, timeout_s: float = 600):
        self.root = Path(output_dir) / "checkpoints"
        self.rank, self.world_size, self.keep_last_n = rank, world_size, keep_last_n
        self.root.mkdir(parents=True, exist_ok=True)
        self.writer = BackgroundWriter(background)
        self.writer.on_failure = self._mark_failed
        self.timeout_s = timeout_s
        self._engine_writer = None
        self._abort = threading.Event()  # a failed write was reported: rank 0 stops waiting to commit

    # -- reading -------------------------------------------------------------------------------

    def latest(self) -> str | None:
        """Tag of the newest complete checkpoint, or None for a fresh run."""
        pointer = self.root / layout.LATEST_FILE
        if not pointer.exists():
            return None
        tag = pointer.read_text().strip()
        if not layout.is_complete(self.root / tag):
            raise ResumeError(f"{pointer} names {tag!r}, which has no {layout.META_FILE} (incomplete or deleted)")
        return tag

    def meta(self, tag: str) -> dict:
        return json.loads((self.root / tag / layout.META_FILE).read_text())

    def needs_universal(self, tag: str, plan) -> bool:
        """Whether ``tag`` must go through the universal format to load under ``plan`` (a ``ZeroPlan``)."""
        meta = self.meta(tag)
        return plan.needs_universal(meta["zero_stage"], meta["world_size"])

    def prepare_universal(self, tag: str) -> tuple[str, str]:
        """Convert ``tag`` once (rank 0, ``to_universal``); returns (load_dir, tag) for DeepSpeed's loader."""
        from biomedgpt.models.checkpoint import CheckpointError

        out = self.root / tag / layout.UNIVERSAL_DIR
        if self.rank == 0 and not out.exists():
            try:
                to_universal(self.root / tag)
            except CheckpointError as exc:
                raise ResumeError(f"{exc}; the checkpoint cannot be resumed") from None
        barrier()
        # DeepSpeed loads the universal files with torch.load(weights_only=False): each is checked first
        for path in sorted(out.rglob("*.pt")):
            load_file(path, meta=True)
        return str(self.root / tag), layout.UNIVERSAL_DIR

    def attach(self, engine) -> None:
        """Route the DeepSpeed engine's checkpoint files through this manager: its saves to the writer, its
        loads (``engine.load_checkpoint``) through the weights-only reader. Call before loading."""
        if self._engine_writer is None or engine.checkpoint_engine is not self._engine_writer:
            self._engine_writer = snapshot_engine(self.writer, load_file)
            engine.checkpoint_engine = self._engine_writer

    def load_rank_state(self, tag: str) -> dict:
        """This rank's engine state; a rank new to the job (more ranks than saved) takes rank r mod saved."""
        saved_world = self.meta(tag)["world_size"]
        source = self.rank if self.rank < saved_world else self.rank % saved_world
        path = self.root / tag / layout.rank_state_file(source)
        if not path.exists():
            raise ResumeError(f"{path} is missing: the checkpoint {tag} is incomplete")
        return load_file(path)

    # -- writing -------------------------------------------------------------------------------

    def save(self, engine, step: int, client_state: dict, rank_state: dict, zero_stage: int) -> str:
        """Collective: every rank hands its shards and state to its writer; once every rank's files are
        durable, rank 0 marks the tag complete and moves the pointer (in the background, or before returning)."""
        tag = tag_for(step)
        tag_dir = self.root / tag
        self.writer.wait()  # the previous checkpoint is complete on this rank (rank 0: and committed)
        self.check_writes()
        if self.rank == 0 and tag_dir.exists():
            shutil.rmtree(tag_dir)  # a partial save of this step from a crashed attempt
        barrier()
        self.attach(engine)
        self.writer.snapshot.reset_count()
        self.writer.job_step = step
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
        tag_dir.mkdir(parents=True, exist_ok=True)
        self.writer.add(rank_state, tag_dir / layout.rank_state_file(self.rank))
        if not self.writer.background:
            self.check_writes()  # every rank's files are written (or not): nothing is committed after a failure
        self.writer.finish(lambda: self._complete(tag, step, zero_stage))
        barrier()
        return tag

    def reserve(self, engine, client_state: dict, rank_state: dict) -> None:
        """Collective: allocate and touch the host buffers of background saves now (a save that copies
        nothing, into a scratch folder that is removed), so that the first save blocks no longer than
        the next ones and the memory shows from here on. Call once the optimizer state exists."""
        if not self.writer.background:
            return
        scratch = self.root / ".reserve"
        self.attach(engine)
        self.writer.reserving = True
        try:
            engine.save_checkpoint(str(scratch), tag="buffers", client_state=client_state, save_latest=False)
            self.writer.add(rank_state, scratch / f"rank_{self.rank:05d}.pt")
        finally:
            self.writer.reserving = False
        barrier()
        if self.rank == 0:
            shutil.rmtree(scratch, ignore_errors=True)

    def wait(self) -> None:
        """Until this rank's checkpoint writes (rank 0: and the commit of the pointer) are done."""
        self.writer.wait()

    @property
    def write_failed(self) -> bool:
        """This rank's last checkpoint write failed (the trainer all-reduces it with its step flags)."""
        return self.writer.failure is not None

    def check_writes(self) -> None:
        """Collective: raise ``CheckpointWriteError`` on every rank if any rank's write failed."""
        flag = torch.tensor([1.0 if self.write_failed else 0.0])
        if all_reduce(flag, "max")[0] > 0:
            self.raise_write_failure()

    def raise_write_failure(self) -> None:
        """Collective, once some rank's write failed: every rank raises; the lowest failing rank's error
        carries the line to print, so it is printed once."""
        flag = torch.tensor([-float(self.rank if self.write_failed else self.world_size)])
        first = -int(all_reduce(flag, "max")[0])
        self._abort.set()
        raise CheckpointWriteError(self._failure_line() if self.rank == first else None)

    def _failure_line(self) -> str:
        failure = self.writer.failure
        error = os_error(failure.error)
        if error is not None and error.errno == errno.ENOSPC:
            what = f"no space left on {self.root}"
        elif error is not None:
            what = f"{error.filename or failure.path or self.root}: {error.strerror or error}"
        else:
            what = f"{failure.path or self.root}: {str(failure.error).splitlines()[0] if str(failure.error) else repr(failure.error)}"
        pointer = self.root / layout.LATEST_FILE
        match = TAG_RE.match(pointer.read_text().strip()) if pointer.exists() else None
        latest = f"step {int(match[1])}" if match else "none (no checkpoint is complete)"
        return f"{what}: checkpoint step {failure.step} not written; latest is {latest}"

    def close(self) -> None:
        """Finish the background writes. A failure not reported yet (the run's last save) is raised here,
        with its line on the rank whose write failed."""
        self.writer.close()
        if self.write_failed and not self._abort.is_set():
            self._abort.set()
            elsewhere = isinstance(self.writer.failure.error, CheckpointWriteError)
            raise CheckpointWriteError(None if elsewhere else self._failure_line())

    def _mark_failed(self, failure) -> None:
        """Writer thread: tell rank 0, which waits for every rank's files, that this rank's never come."""
        if failure.step is not None and not isinstance(failure.error, CheckpointWriteError):
            try:
                (self.root / tag_for(failure.step) / layout.failed_mark(self.rank)).touch()
            except OSError:
                pass  # rank 0 then waits until timeout_s, or until the failure is reported at a step

    def _complete(self, tag: str, step: int, zero_stage: int) -> None:
        """After this rank's files are durable (writer thread, or inline): mark them; rank 0 commits."""
        tag_dir = self.root / tag
        atomic_write_text(tag_dir / layout.complete_mark(self.rank), "")
        if self.rank != 0:
            return
        deadline = time.monotonic() + self.timeout_s
        marks = [tag_dir / layout.complete_mark(r) for r in range(self.world_size)]
        while not all(m.exists() for m in marks):
            if self._abort.is_set() or any((tag_dir / layout.failed_mark(r)).exists() for r in range(self.world_size)):
                raise CheckpointWriteError(None)  # another rank's write failed: reported there
            if time.monotonic() > deadline:
                missing = [m.name for m in marks if not m.exists()]
                raise TimeoutError(f"checkpoint {tag}: no completion mark from {missing} in {self.timeout_s}s")
            time.sleep(0.05)
        self._write_consolidation_index(tag_dir, step)
        meta = {"step": step, "world_size": self.world_size, "zero_stage": zero_stage}
        atomic_write_text(tag_dir / layout.META_FILE, json.dumps(meta))
        atomic_write_text(self.root / layout.LATEST_FILE, tag)
        self._prune(keep=tag)

    @staticmethod
    def _write_consolidation_index(tag_dir: Path, step: int) -> None:
        """Rank 0, every rank's files durable, before the meta file: where each tensor of the tag's default
        consolidation lies. A tag it cannot be made for is completed all the same, after one line (its
        consolidation then reads the files with torch); a failed write of it is a failed checkpoint write."""
        from biomedgpt.engine.checkpoint.consolidate import consolidation_index
        from biomedgpt.engine.checkpoint.consolidation_index import write_index

        try:
            document = consolidation_index(tag_dir, step)
        except Exception as exc:  # noqa: BLE001  (the checkpoint itself is complete and usable)
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            print(f"note: {tag_dir}: no consolidation index ({reason}); consolidating it reads the files with torch",
                  file=sys.stderr, flush=True)
            return
        if document is not None:
            write_index(tag_dir, document)

    def _prune(self, keep: str) -> None:
        tags = sorted(p.name for p in self.root.iterdir() if p.is_dir() and TAG_RE.match(p.name))
        complete = [t for t in tags if layout.is_complete(self.root / t)]
        retained = set(complete[-self.keep_last_n:]) | {keep}
        for tag in tags:
            if tag not in retained:
                shutil.rmtree(self.root / tag, ignore_errors=True)
