"""Faults a user meets, on real 2-rank DeepSpeed runs (gloo, CPU) through launchers/local.sh:

- a rank that hangs: the watchdog dumps both ranks' stacks into <output_dir>/watchdog/ and the job ends non-zero;
- a truncated checkpoint file in ``latest``: one line naming the file, the tag and the earlier complete tag
  (the trainer's pre-load check, called in-process on the launched run's checkpoint), and following its advice resumes;
- an output_dir holding another model's checkpoint: one line naming the setting and the two ways out;
- ``import_checkpoint`` on a file that is not a checkpoint at all: said to be that, not a pickle refusal;
- every rank killed at once (a node's OOM killer): the launcher ends with their status.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from biomedgpt.engine.checkpoint.layout import LATEST_FILE, rank_state_file
from test_engine_distributed import launch, metrics, run_config, shards  # noqa: F401  (shards: a module fixture)

TESTS = Path(__file__).resolve().parent
WATCHDOG_TIMEOUT_S = 8


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_watchdog_dumps_every_rank_and_ends_a_hung_job(shards, tmp_path, repo_root, vocab_dir):  # noqa: F811
    out = tmp_path / "hung"
    cfg = run_config(shards, out, vocab_dir, optim={"lr": 1e-3, "max_steps": 100000, "warmup_steps": 1},
                     watchdog={"timeout_s": WATCHDOG_TIMEOUT_S, "poll_s": 0.5})
    path = tmp_path / "hung.yaml"
    path.write_text(yaml.safe_dump(cfg))
    hang_file = tmp_path / "hang_started"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HANG_RANK": "1", "HANG_STEP": "2", "HANG_FILE": str(hang_file),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([str(repo_root / "launchers/local.sh"), "-n", "2", "-m", "hang_worker", "--",
                             "--config", str(path)], cwd=repo_root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=360)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the hung job did not end")
    ended = time.time()
    assert hang_file.exists(), output[-4000:]
    detection = ended - float(hang_file.read_text())
    print(f"watchdog: job ended {detection:.1f}s after the hang began (timeout {WATCHDOG_TIMEOUT_S}s)")
    assert proc.returncode not in (0, 75), output[-4000:]
    assert detection <= WATCHDOG_TIMEOUT_S + 30, detection
    assert "watchdog: rank 1 made no progress" in output, output[-4000:]
    stacks = {r: (out / "watchdog" / f"stacks_rank_{r:05d}.txt") for r in (0, 1)}
    for rank, stack in stacks.items():
        assert stack.exists() and "Python stacks of rank" in stack.read_text(), (rank, output[-3000:])
    hung = stacks[1].read_text()
    assert "injected_hang" in hung and "hang_worker.py" in hung, hung
    waiting = stacks[0].read_text()
    assert "trainer.py" in waiting and "in train" in waiting, waiting  # rank 0 waits for rank 1 in the loop


def _two_checkpoints(shards, tmp_path, repo_root, vocab_dir):  # noqa: F811
    out = tmp_path / "run"
    cfg = run_config(shards, out, vocab_dir, optim={"lr": 1e-3, "max_steps": 2, "warmup_steps": 1},
                     checkpoint={"interval": 1, "keep_last_n": 2})
    launch(repo_root, cfg, 2)
    root = out / "checkpoints"
    assert (root / LATEST_FILE).read_text().strip() == "step_00000002"
    return cfg, root


def _error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, output[-4000:]
    assert "Traceback" not in output and "size mismatch" not in output, output[-4000:]
    return lines[0]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_resume_failures_say_which_file_or_setting_and_what_to_do(shards, tmp_path, repo_root,  # noqa: F811
                                                                   vocab_dir, capsys, monkeypatch):
    from biomedgpt.core.config import from_dict, to_dict
    from biomedgpt.core.user_errors import ERRORS_FILE_ENV, command
    from biomedgpt.engine.checkpoint.resume_checks import check_resumable
    from biomedgpt.engine.run_config import RunConfig

    cfg, root = _two_checkpoints(shards, tmp_path, repo_root, vocab_dir)
    # another model size in the same output_dir: the setting that differs and the two ways out
    other = {**cfg, "model": {**cfg["model"], "d_model": 32},
             "optim": {**cfg["optim"], "max_steps": 3}}
    line = _error_line(launch(repo_root, other, 2, expect=1))
    assert "model.d_model: checkpoint 64, this run 32" in line, line
    assert "step_00000002" in line and "new output_dir" in line and "checkpoint.resume=never" in line, line

    # a truncated file of the newest tag: the file, the tag, and the earlier complete tag. The pre-load check
    # the trainer runs (above, on 2 ranks), called in-process on rank 0 through a command's error boundary.
    broken = root / "step_00000002" / rank_state_file(1)
    with open(broken, "r+b") as f:
        f.truncate(broken.stat().st_size // 2)
    resume_cfg = {**cfg, "optim": {**cfg["optim"], "max_steps": 3}}
    monkeypatch.delenv(ERRORS_FILE_ENV, raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_status:
        command(check_resumable)(root, "step_00000002", 0, to_dict(from_dict(RunConfig, resume_cfg)))
    assert exit_status.value.code == 1
    line = _error_line(capsys.readouterr().err)
    assert f"{broken}: truncated or corrupt" in line and "checkpoint step_00000002" in line, line
    assert "the earlier checkpoint step_00000001 is complete" in line and str(root / LATEST_FILE) in line, line

    # following the advice resumes
    (root / "step_00000002").rename(root / "broken_step_00000002")
    (root / LATEST_FILE).write_text("step_00000001")
    resumed = launch(repo_root, resume_cfg, 2)
    assert "resumed from step_00000001" in resumed
    logged = [m["step"] for m in metrics(root.parent) if "loss" in m]
    assert logged == [1, 2, 2, 3], logged  # the resumed run goes on from step 1: steps 2 and 3 again


def test_import_of_a_file_that_is_no_checkpoint(tmp_path, vocab_dir, capsys):
    import torch

    from biomedgpt.tools import import_checkpoint

    junk = tmp_path / "weights.pt"
    junk.write_bytes(os.urandom(4096))
    assert import_checkpoint.main([f"source={junk}", f"output={tmp_path / 'out'}", f"tokenizer={vocab_dir}"]) == 1
    err = capsys.readouterr().err
    assert f"{junk}: not a checkpoint" in err and "no checkpoint needs" not in err, err
    # a truncated real checkpoint is called that
    real = tmp_path / "real.pt"
    torch.save({"model": {"w": torch.zeros(1000)}}, real)
    real.write_bytes(real.read_bytes()[:2000])
    assert import_checkpoint.main([f"source={real}", f"output={tmp_path / 'out'}", f"tokenizer={vocab_dir}"]) == 1
    err = capsys.readouterr().err
    assert f"{real}: truncated or corrupt" in err and "no checkpoint needs" not in err, err
    # a real pickle with an arbitrary object is refused, naming it, with the way out
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": Path("x")}, unsafe)
    assert import_checkpoint.main([f"source={unsafe}", f"output={tmp_path / 'out'}", f"tokenizer={vocab_dir}"]) == 1
    err = capsys.readouterr().err
    assert f"{unsafe}: refers to pathlib." in err and "save its weights alone" in err, err
    assert not (tmp_path / "out").exists()


def _idle_ranks(launcher: int) -> list:
    """The launcher's rank processes so far (its short-lived helpers may be zombies: no command line)."""
    ranks = []
    for child in psutil.Process(launcher).children():
        with contextlib.suppress(psutil.Error):
            if "idle_rank" in child.cmdline():
                ranks.append(child)
    return ranks


@pytest.mark.timeout(240)
def test_launcher_ends_with_the_status_when_every_rank_is_killed_at_once(repo_root):
    """bash 5.2's ``wait -n`` can lose a rank that died while it was reporting another ("no such job"); the
    launcher used to spin on that forever (about one try in four here)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    for attempt in range(12):
        proc = subprocess.Popen([str(repo_root / "launchers/local.sh"), "-n", "2", "-m", "idle_rank"], cwd=repo_root,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 60
        while len(ranks := _idle_ranks(proc.pid)) < 2:
            assert time.time() < deadline and proc.poll() is None, "the ranks did not start"
            time.sleep(0.02)
        time.sleep(0.03 * attempt)  # the kill lands at different points of the launcher's wait
        for rank in ranks:
            with contextlib.suppress(psutil.NoSuchProcess):
                rank.kill()
        try:
            output, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise AssertionError(f"try {attempt}: the launcher still runs 15 s after both its ranks were killed")
        assert proc.returncode == 137, (attempt, output)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
