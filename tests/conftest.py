"""Shared test fixtures: the packaged GPT-2 vocabulary, the canonical tokenizer built from it, and the compact
parity cases."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@contextlib.contextmanager
def _environment_restored():
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(autouse=True)
def _restore_environment():
    """Code under test may set RANK/WORLD_SIZE etc. in-process; never let that leak into later tests."""
    with _environment_restored():
        yield


@pytest.fixture(autouse=True, scope="module")
def _restore_environment_of_module():
    """The same for a module's fixtures: a trainer built in one sets RANK, MASTER_PORT, ... for the whole
    process, and a later module's subprocess must not inherit a port this process's store still holds."""
    with _environment_restored():
        yield


@pytest.fixture(scope="session")
def vocab_dir() -> Path:
    """The GPT-2 BPE files shipped as package data (encoder.json, vocab.bpe, dict.txt)."""
    from biomedgpt.models.tokenizer import GPT2_VOCAB_DIR

    return GPT2_VOCAB_DIR


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def canonical_tokenizer(vocab_dir):
    """The released checkpoints' id space (GPT-2 BPE in fairseq order + mask, codes, bins)."""
    from biomedgpt.models.tokenizer import Tokenizer

    return Tokenizer.from_gpt2_files(vocab_dir)


@pytest.fixture(scope="session")
def parity(tmp_path_factory, vocab_dir):
    """The compact parity cases of tests/fixtures (parity_cases.py): checkpoint files in both namings,
    import-tool outputs, inputs and shared models, each built once per session."""
    from parity_cases import ParityBuilds

    return ParityBuilds(tmp_path_factory.mktemp("parity"), vocab_dir)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of microscopic ops: far faster than a contended pool on a shared machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The demo shards (biomedgpt.data.demo, real packaged data; 60 reports keep it to ~40 s), built once for
    the whole suite (under pytest-xdist by the first worker that needs them, under a file lock; the demo
    writes ``data_config.yaml`` last). Tests only read them."""
    import subprocess
    import sys

    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    out = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "demo-data"
    with FileLock(str(out) + ".lock"):
        if not (out / "data_config.yaml").exists():
            done = subprocess.run([sys.executable, "-m", "biomedgpt.data.demo", f"output_dir={out}",
                                   "max_reports=60"], capture_output=True, text=True, timeout=300,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
            assert done.returncode == 0, done.stderr[-3000:]
    return out


def pytest_collection_modifyitems(items):
    """A test that may be the one to run the shared rank job (its fixture's setup counts in the test's time)
    gets the job's time limit."""
    from rank_jobs import JOB_TIMEOUT_S

    for item in items:
        if "rank_jobs" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.timeout(JOB_TIMEOUT_S + 120), append=False)


@pytest.fixture(scope="session")
def rank_jobs(request, tmp_path_factory):
    """The shared 2-rank job of rank_jobs.py, run once for the whole suite (under pytest-xdist the first worker
    that needs it runs it, under a file lock, and the others read its outputs), with the workers of the
    collected test files only. Returns ``result_dir(name)``: a worker's output folder, or the failure."""
    from filelock import FileLock

    import rank_jobs as jobs

    files = {item.path.stem for item in request.session.items}
    names = [name for name, module in jobs.WORKERS.items() if module in files]
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    base = tmp_path_factory.getbasetemp()
    out = (base.parent if worker else base) / "rank_jobs"  # the workers' base folders share their parent
    with FileLock(str(out) + ".lock"):
        if not (out / "job.json").exists():
            jobs.run(out, names)
    return lambda name: jobs.result_dir(out, name)
