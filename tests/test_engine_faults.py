"""Faults of a launched training job (launchers/local.sh, ``python -m biomedgpt.tools.train``, gloo on CPU):
a rank killed, a SIGTERM (preemption) whose checkpoint resumes, here on one rank through a universal
checkpoint, and a diverged run. Split from test_engine_distributed.py (its shards and launch helpers), so
the suite's two workers each take one of the files.
"""
from __future__ import annotations

import json
import signal
import time

import numpy as np
import psutil
import pytest

from biomedgpt.engine.checkpoint.layout import LATEST_FILE, META_FILE
from test_engine_distributed import (_wait_for_step, launch, run_config, running, shards,  # noqa: F401  (a fixture)
                                     train_losses)

pytestmark = [pytest.mark.timeout(600), pytest.mark.distributed, pytest.mark.slow]


def test_a_killed_rank_ends_the_job_with_an_error(shards, tmp_path, repo_root, vocab_dir):  # noqa: F811
    out = tmp_path / "killed"
    cfg = run_config(shards, out, vocab_dir, optim={"lr": 1e-3, "max_steps": 100000, "warmup_steps": 1})
    with running(repo_root, cfg, 2) as proc:
        _wait_for_step(out, proc)
        ranks = [p for p in psutil.Process(proc.pid).children() if p.environ().get("RANK") == "1"]
        assert len(ranks) == 1
        ranks[0].kill()
        start = time.time()
        proc.communicate(timeout=60)
    assert proc.returncode not in (0, 75)
    assert time.time() - start < 60


def test_sigterm_writes_a_checkpoint_that_resumes_on_one_rank(shards, tmp_path, repo_root, vocab_dir):  # noqa: F811
    """A 2-rank ZeRO-3 run (zero.Init, activation checkpointing, EMA) stopped by SIGTERM after some training:
    exit status 75 and a complete checkpoint, which a 1-rank run resumes through a universal checkpoint with
    the trained weights (one job instead of a second 2-rank one; the same-world resume is the resume test's)."""
    out = tmp_path / "preempted"
    ema = {"enabled": True, "decay": 0.9}
    cfg = run_config(shards, out, vocab_dir, optim={"lr": 2e-3, "max_steps": 100000, "warmup_steps": 1},
                     deepspeed={"zero_stage": 3, "activation_checkpointing": True, "zero_init": True}, ema=ema)
    with running(repo_root, cfg, 2) as proc:
        _wait_for_step(out, proc, step=5)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, output[-4000:]
    tag = (out / "checkpoints" / LATEST_FILE).read_text().strip()
    saved_step = json.loads((out / "checkpoints" / tag / META_FILE).read_text())["step"]
    assert saved_step >= 5
    saved = train_losses(out)

    resume = run_config(shards, out, vocab_dir, deepspeed={"zero_stage": 3}, ema=ema,
                        optim={"lr": 2e-3, "max_steps": saved_step + 2, "warmup_steps": 1})
    output = launch(repo_root, resume, 1)
    assert f"resumed from {tag} at step {saved_step} through a universal checkpoint" in output, output[-4000:]
    assert (out / "checkpoints" / tag / "universal").is_dir()
    losses = train_losses(out)
    assert sorted(losses)[-2:] == [saved_step + 1, saved_step + 2]
    # Trained weights were loaded: the resumed loss is far below the first steps' loss.
    assert losses[saved_step + 1] < saved[1] - 1.0 and np.isfinite(losses[saved_step + 2])
    last = out / "checkpoints" / f"step_{saved_step + 2:08d}" / META_FILE
    assert json.loads(last.read_text())["world_size"] == 1


def test_diverged_run_skips_nonfinite_losses_then_stops(shards, tmp_path, repo_root, vocab_dir):  # noqa: F811
    """lr 1e30 blows the weights up after the first update: the following non-finite losses are skipped
    (counted, logged) until max_nonfinite_steps is passed, then the job fails instead of training on NaN."""
    out = tmp_path / "diverged"
    cfg = run_config(shards, out, vocab_dir, optim={"lr": 1e30, "max_steps": 8, "warmup_steps": 0, "clip_norm": 0.0},
                     max_nonfinite_steps=2)
    output = launch(repo_root, cfg, 1, expect=1)
    assert output.count("non-finite loss, micro-batch skipped") >= 3, output[-3000:]
    assert "3 non-finite losses (limit max_nonfinite_steps=2)" in output, output[-3000:]
