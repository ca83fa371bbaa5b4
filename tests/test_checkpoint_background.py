"""Background checkpoint writes on 2 CPU ranks (DeepSpeed, gloo): a ``kill -9`` in the middle of a write keeps
``latest`` at the previous complete checkpoint and the run resumes exactly; saves in quick succession are
written one after the other, never interleaved. The writer is slowed down by its fault-injection delay
(``BIOMEDGPT_CHECKPOINT_WRITE_DELAY_S``: seconds before each file), so the kill lands inside a write. One
run saving after every step serves both tests (2-rank launches are the suite's main cost)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest

from biomedgpt.engine.checkpoint.layout import LATEST_FILE, META_FILE, is_optim_file, rank_state_file
from tests.test_engine_distributed import launch, run_config, running, shards, train_losses  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(900)
DELAY = "BIOMEDGPT_CHECKPOINT_WRITE_DELAY_S"


STEPS = 6
OPTIM = {"lr": 2e-3, "max_steps": STEPS, "warmup_steps": 1, "schedule": "constant"}


def _latest(out: Path) -> str | None:
    path = out / "checkpoints" / LATEST_FILE
    return path.read_text().strip() if path.exists() else None


@pytest.fixture(scope="module")
def every_step(shards, tmp_path_factory, repo_root, vocab_dir) -> tuple[Path, str]:  # noqa: F811
    """A save after every step, each file of it delayed: the quick-succession run, and the uninterrupted run
    the killed one is compared with (the losses do not depend on when checkpoints are written)."""
    out = tmp_path_factory.mktemp("background") / "every_step"
    cfg = run_config(shards, out, vocab_dir, deepspeed={"zero_stage": 2}, optim=OPTIM,
                     checkpoint={"interval": 1, "keep_last_n": 10, "at_end": True})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(DELAY, "0.3")
        return out, launch(repo_root, cfg, 2)


def test_kill_during_background_write_keeps_previous_latest_and_resumes_exactly(every_step, shards, tmp_path,  # noqa: F811
                                                                               repo_root, vocab_dir, monkeypatch):
    common = dict(deepspeed={"zero_stage": 2}, checkpoint={"interval": 2, "keep_last_n": 5, "at_end": False})
    straight, killed = every_step[0], tmp_path / "killed"

    monkeypatch.setenv(DELAY, "1")
    cfg = run_config(shards, killed, vocab_dir, optim={**OPTIM, "max_steps": 100000}, **common)
    second = killed / "checkpoints" / "step_00000004"
    with running(repo_root, cfg, 2) as proc:
        deadline = time.time() + 400
        while not (_latest(killed) == "step_00000002" and second.is_dir()):
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            assert time.time() < deadline, "no second checkpoint started in time"
            time.sleep(0.02)
        ranks = [p for p in psutil.Process(proc.pid).children() if p.environ().get("RANK") in ("0", "1")]
        assert len(ranks) == 2
        for rank in ranks:
            rank.kill()  # SIGKILL: the background write of step 4 is cut off
        proc.communicate(timeout=60)
    assert proc.returncode not in (0, 75)
    assert _latest(killed) == "step_00000002"
    assert not (second / META_FILE).exists()
    assert (killed / "checkpoints" / "step_00000002" / META_FILE).exists()

    monkeypatch.delenv(DELAY)
    output = launch(repo_root, run_config(shards, killed, vocab_dir, optim=OPTIM, **common), 2)
    assert "resumed from step_00000002 at step 2" in output
    expected, resumed = train_losses(straight), train_losses(killed)  # the last logged loss of each step
    for step in (3, 4, 5, 6):
        assert resumed[step] == pytest.approx(expected[step], abs=1e-6), step
    assert _latest(killed) == "step_00000006"


def test_saves_in_quick_succession_never_interleave(every_step):
    out, output = every_step
    assert "writing in the background" in output
    # the snapshot buffers are reserved after the first step, before it is logged and saved
    assert output.index("checkpoint snapshot buffers:") < output.index("step 1: ")
    root = out / "checkpoints"
    spans = []
    for step in range(1, STEPS + 1):
        tag = root / f"step_{step:08d}"
        files = [p for p in tag.rglob("*") if p.is_file() and p.suffix != ".py"]
        meta = json.loads((tag / META_FILE).read_text())
        assert meta["step"] == step and meta["world_size"] == 2
        # both ranks' optimizer partitions, the model states, both ranks' engine state
        assert len([p for p in files if is_optim_file(p.name)]) == 2
        assert {rank_state_file(r) for r in (0, 1)} <= {p.name for p in files}
        written = [p.stat().st_mtime_ns for p in files if p.name != META_FILE]
        spans.append((min(written), (tag / META_FILE).stat().st_mtime_ns))
    for (_, committed), (next_start, _) in zip(spans, spans[1:]):
        assert committed <= next_start  # checkpoint N was complete before any file of N+1 was written
    assert _latest(out) == f"step_{STEPS:08d}"


def test_reserved_buffers_are_the_ones_a_save_copies_into():
    """``HostSnapshot.reserve`` allocates every buffer ``take`` needs (a first save allocates nothing) and
    copies nothing; ``take`` then copies the values, views of one storage staying views of one copy."""
    import torch

    from biomedgpt.engine.checkpoint.writer import HostSnapshot

    weights = torch.randn(6, 4)
    state = {"w": weights, "row": weights[2], "moments": [torch.arange(5.0)], "step": 3}
    snapshot = HostSnapshot()
    snapshot.reserve(state, "model.pt")
    reserved = {slot: buf.data_ptr() for slot, buf in snapshot.buffers.items()}
    assert len(reserved) == 2 and all(not buf.any() for buf in snapshot.buffers.values())
    copy = snapshot.take(state, "model.pt")
    assert {slot: buf.data_ptr() for slot, buf in snapshot.buffers.items()} == reserved
    assert torch.equal(copy["w"], weights) and torch.equal(copy["moments"][0], state["moments"][0])
    assert copy["row"].untyped_storage().data_ptr() == copy["w"].untyped_storage().data_ptr() != weights.data_ptr()
    assert copy["step"] == 3
