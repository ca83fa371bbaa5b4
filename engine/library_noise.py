"""Known third-party console noise, filtered by exact message so that every other warning still shows.

Each entry is a message a dependency prints on every run that says nothing to a user of this project:
- torch, when DeepSpeed imports its extension builder on a machine with a CUDA toolkit but no GPU:
  ``No CUDA runtime is found, using CUDA_HOME=...`` (one line per rank);
- DeepSpeed's CPU accelerator, at process-group start: ``DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op
  built successfully`` (a ``print`` per rank);
- torch, for each collective DeepSpeed's ZeRO-3 calls by its deprecated name (``all_gather_into_tensor``,
  ``reduce_scatter_tensor``): a FutureWarning that DeepSpeed re-arms, so it repeats every step.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import warnings
from typing import Iterator

DEPRECATED_COLLECTIVES = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"
NO_CUDA_RUNTIME = "No CUDA runtime is found"
SHM_OP_BUILT = re.compile(r"^DeepSpeed \S+ built successfully\s*$")


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_known_noise() -> None:
    """Install the filters (idempotent). Call before ``deepspeed`` is imported: its import logs the first."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _DropMessage) for f in logger.filters):
        logger.addFilter(_DropMessage(NO_CUDA_RUNTIME))
    warnings.filterwarnings("ignore", message=DEPRECATED_COLLECTIVES, category=FutureWarning)  # deduplicated


class _LineFilter(io.TextIOBase):
    """A text stream that forwards every line to ``target`` except those matching ``drop``."""

    def __init__(self, target, drop: re.Pattern) -> None:
        self.target, self.drop, self.pending = target, drop, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if not self.drop.match(line):
                self.target.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self.pending and not self.drop.match(self.pending):
            self.target.write(self.pending)
        self.pending = ""
        self.target.flush()


@contextlib.contextmanager
def without_shm_build_line() -> Iterator[None]:
    """Standard output without DeepSpeed's per-rank ``... built successfully`` line (everything else passes)."""
    stream = _LineFilter(sys.stdout, SHM_OP_BUILT)
    with contextlib.redirect_stdout(stream):
        try:
            yield
        finally:
            stream.flush()
