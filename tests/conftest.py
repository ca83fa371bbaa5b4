"""Shared test fixtures: where ../shared lies, and the canonical tokenizer built from it."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("BIOMEDGPT_SHARED", REPO_ROOT.parent / "shared"))


@pytest.fixture(autouse=True)
def _restore_environment():
    """Code under test may set RANK/WORLD_SIZE etc. in-process; never let that leak into later tests."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED_DIR.is_dir():
        pytest.fail(f"../shared not found at {SHARED_DIR} (set BIOMEDGPT_SHARED)")
    return SHARED_DIR


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def canonical_tokenizer(shared_dir):
    """The released checkpoints' id space (GPT-2 BPE in fairseq order + mask, codes, bins)."""
    from models.tokenizer import Tokenizer

    return Tokenizer.from_gpt2_files(shared_dir / "bpe")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of microscopic ops: far faster than a contended pool on a shared machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
