"""One 2-rank job (gloo, CPU, DeepSpeed's CPU accelerator) that runs the rank workers of several test files in
turn, so the suite starts two Python processes with torch and DeepSpeed once for all of them instead of once
per file (~10 s of a core per rank each). Each worker is the file's own ``worker(out_dir)``; its test reads
what the worker wrote into ``out_dir`` (the ``rank_jobs`` fixture of conftest.py, one job per suite run).

A worker that fails on some rank ends the job (the other rank could wait in a collective for ever): its
traceback is kept and reported by its own test; the tests of workers that had not run yet say so.

Run as a script, this file is one rank: ``python rank_jobs.py OUT_DIR NAME...``.
"""
from __future__ import annotations

import ctypes
import gc
import importlib
import json
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
#: name -> the test module whose ``worker(out_dir)`` the job runs, in the order they run (the trainer-based
#: ones last: a ZeRO-3 trainer sets the process's malloc mmap threshold).
WORKERS = {"eval_max_batches": "test_eval_max_batches", "zero3_gather": "test_zero3_gather", "ema_zero3": "test_ema_zero3", "text_only": "test_text_only",
           "train_features": "test_train_features", "lora": "test_lora"}
JOB_TIMEOUT_S = 1500  # the whole job; about 3 minutes on an idle 2-core machine


def _error_file(out: Path, name: str, rank: int) -> Path:
    return out / f"{name}.rank{rank}.error"


def rank_main(out: Path, names: list[str]) -> None:
    rank = int(os.environ["RANK"])
    for name in names:
        (out / name).mkdir(parents=True, exist_ok=True)
        try:
            importlib.import_module(WORKERS[name]).worker(out / name)
        except BaseException:  # noqa: B036  (SystemExit too: the job cannot go on after any of them)
            _error_file(out, name, rank).write_text(traceback.format_exc())
            sys.stderr.flush()
            os._exit(1)
        _release_memory()
        print(f"rank_jobs: {name} done, {_anon_mib():.0f} MiB resident", file=sys.stderr, flush=True)
        (out / f"{name}.rank{rank}.done").touch()


def _release_memory() -> None:
    """The worker's engines and models (reference cycles), and the heap pages they freed, before the next worker
    builds its own: the workers share one process."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _anon_mib() -> float:
    """This process's anonymous resident memory (Linux), for the rank logs: the workers share one process."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon")) / 1024
    except (OSError, StopIteration):
        return float("nan")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(out: Path, names: list[str], world: int = 2) -> None:
    """The job; returns when every rank ended (a rank that fails ends the others)."""
    out.mkdir(parents=True, exist_ok=True)
    port, procs = _free_port(), []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), str(REPO), os.environ.get("PYTHONPATH")]))}
        with open(out / f"rank{rank}.log", "wb") as log:  # a file, not a pipe: a full pipe blocks that rank
            procs.append(subprocess.Popen([sys.executable, __file__, str(out), *names], env=env, cwd=REPO,
                                          stdout=subprocess.DEVNULL, stderr=log))
    deadline = time.time() + JOB_TIMEOUT_S
    while any(p.poll() is None for p in procs):
        if any(p.returncode not in (None, 0) for p in procs) or time.time() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.2)
    (out / "job.json").write_text(json.dumps({"names": names, "status": [p.returncode for p in procs]}))


def result_dir(out: Path, name: str) -> Path:
    """``name``'s output folder, or the test fails with why the job did not finish it."""
    job = json.loads((out / "job.json").read_text())
    world = len(job["status"])
    if all(_error_file(out, name, r).exists() is False and (out / f"{name}.rank{r}.done").exists()
           for r in range(world)):
        return out / name
    errors = [_error_file(out, name, r).read_text() for r in range(world) if _error_file(out, name, r).exists()]
    if errors:
        raise AssertionError(f"the {name} worker failed:\n" + "\n".join(e[-4000:] for e in errors))
    failed = [n for n in job["names"] if any(_error_file(out, n, r).exists() for r in range(world))]
    logs = "\n".join((out / f"rank{r}.log").read_text()[-3000:] for r in range(world))
    raise AssertionError(f"the shared rank job (status {job['status']}) ended before the {name} worker finished"
                         + (f": the {failed[0]} worker failed before it" if failed else f"; rank logs:\n{logs}"))


if __name__ == "__main__":
    sys.path.insert(0, str(TESTS))
    rank_main(Path(sys.argv[1]), sys.argv[2:])
