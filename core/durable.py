"""Durable, atomic writes: the one implementation every writer of the project uses.

A file is written under a unique hidden name beside its destination, flushed and fsynced, renamed over
the destination, and the folder fsynced (``atomic_file``; ``atomic_write_text`` for a string): a crash
leaves the old file or the new one, never half of one. A folder (a model directory, a dataset, a
universal checkpoint) is filled under a hidden sibling name, every file and folder in it fsynced, then
renamed into place (``publish_directory``; ``write_dir_atomically`` fills it through a callback). New files
get the modes the process umask gives (``tempfile.mkstemp``/``mkdtemp`` would make them private).
Import-light (no torch) so the command-line tools and launchers write the same way.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import IO, Callable, Iterator


def fsync_dir(path: str | Path) -> None:
    """Make a folder's entries (a rename, a new file) durable; given a file, its contents."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sibling(path: Path, kind: str = "tmp") -> Path:
    """A hidden name beside ``path``, unique to this process and call."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.{kind}")


def _unique_sibling(path: Path, create: Callable[[Path], object]) -> tuple[object, Path]:
    """``create`` (which fails with FileExistsError on a taken name) on a new hidden name beside ``path``."""
    while True:
        candidate = _sibling(path)
        try:
            return create(candidate), candidate
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb", fsync: bool = True) -> Iterator[IO]:
    """A file object whose content replaces ``path`` durably when the block ends without an error
    (``mode`` "wb" or "w": text is UTF-8); on an error the temporary file is removed, ``path`` untouched.
    ``fsync=False``: whole for readers but not kept across a crash, for a status file rewritten every
    second that must never wait on a busy disk (the watchdog's heartbeat)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_file writes a whole file: mode 'w' or 'wb', not {mode!r}")
    path = Path(path)
    fd, tmp = _unique_sibling(path, lambda p: os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)


def atomic_write_text(path: str | Path, data: str | bytes, fsync: bool = True) -> None:
    """``path`` replaced durably by ``data`` (a string, written as UTF-8, or bytes); ``fsync``: see
    ``atomic_file``."""
    with atomic_file(path, "w" if isinstance(data, str) else "wb", fsync) as f:
        f.write(data)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_dir(os.path.join(folder, name))
        fsync_dir(folder)


def publish_directory(staging: str | Path, final: str | Path) -> None:
    """Move a filled folder to ``final`` durably, replacing any folder there: its content is fsynced
    first, and the old folder is moved aside before the rename and deleted after it."""
    staging, final = Path(staging), Path(final)
    _fsync_tree(staging)
    if final.exists():
        old = _sibling(final, "old")
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
    fsync_dir(final.parent)


def write_dir_atomically(out_dir: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(folder)`` fills a new hidden sibling of ``out_dir``, which is then published in its place
    (``publish_directory``): a crash never leaves a complete-looking folder. Removes the sibling on error."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _, staging = _unique_sibling(out_dir, lambda p: p.mkdir())
    try:
        write(staging)
        publish_directory(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
