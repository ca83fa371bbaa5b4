"""User errors: a bad setting, path, file or checkpoint is ONE ``error:`` line, once per job, exit status 1.

Every command's boundary (``biomedgpt SUB``, and the ``main`` of the modules the launchers start on each
rank) catches these errors and reports them through ``report``; anything else is a bug and keeps its
traceback. Each rank of a job meets the same bad input, so ``launchers/local.sh`` names a file in
``BIOMEDGPT_ERRORS_FILE`` where the ranks de-duplicate their lines (under a file lock): a message is
printed by the first rank that reports it. Without that file (torchrun, srun writing one log per rank)
every rank prints its own line.

torch-free and import-free, so the config loader and the data package can raise ``UserError`` too.
"""
from __future__ import annotations

import fcntl
import functools
import os
import sys
from typing import Callable, TypeVar

ERRORS_FILE_ENV = "BIOMEDGPT_ERRORS_FILE"
F = TypeVar("F", bound=Callable)


class UserError(Exception):
    """Input that cannot be used as given; the message names the file, row or setting and what to do."""


#: User errors of packages that do not import the engine (``models`` stays free of it): (module, class).
FOREIGN = (("biomedgpt.models.model_dir", "CheckpointError"), ("biomedgpt.models.tokenizer", "TokenizerError"))


def is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, UserError):
        return True
    # a class whose module was never imported cannot have raised: no import needed
    return any(isinstance(exc, getattr(sys.modules.get(module), name, ()))
               for module, name in FOREIGN if module in sys.modules)


def one_line(exc: BaseException) -> str:
    """The message on one line: a YAML error's context lines joined with ``; ``; an error a data-loader
    worker raised (torch re-raises it with the worker's whole traceback as its message) as its last line."""
    lines = [part.strip() for part in str(exc).splitlines() if part.strip()]
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        last, name = lines[-1], type(exc).__name__
        return last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last
    return "; ".join(lines) or type(exc).__name__


def report(exc: BaseException, prog: str | None = None) -> None:
    """Print ``[prog: ]error: <message>`` on stderr unless another rank of this job already printed it."""
    line = f"{prog + ': ' if prog else ''}error: {one_line(exc)}"
    path = os.environ.get(ERRORS_FILE_ENV)
    if not path:
        print(line, file=sys.stderr, flush=True)
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released on close; held while printing, so lines never interleave
        f.seek(0)
        if line in f.read().splitlines():
            return
        print(line, file=sys.stderr, flush=True)
        f.write(line + "\n")


def command(main: F) -> F:
    """For a command's ``main``: a user error is reported (``report``) and the process exits 1."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Exception as exc:
            if not is_user_error(exc):
                raise
            report(exc)
            raise SystemExit(1) from None
    return run  # type: ignore[return-value]
