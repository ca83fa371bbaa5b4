"""Durable file writes (fsynced before the rename, so a crash leaves the old file or the new one, never
half of one). Import-light (no torch) so the command-line tools write their reports the same way."""
from __future__ import annotations

import os
import secrets
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_temporary(path: Path) -> tuple[int, Path]:
    """A new, unique hidden file beside ``path``, opened for writing, with the modes the process umask
    gives any new file (``tempfile.mkstemp`` would make it 0600, unreadable to the group)."""
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = create_temporary(path)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
