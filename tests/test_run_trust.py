"""A run a user can trust: one run per output folder, resume never silently ignores a changed setting,
user errors are one line once with exit status 1, a fine-tuning recipe starts on a fresh CPU machine.

Launched runs are 1-rank tiny models (the shards of test_engine_distributed); the run that a second run is
refused from is the one the resume test continues. What needs no launched rank (the settings comparison, the
lock's holder line, the error reports) is tested in-process.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml

from biomedgpt.core.config import load, to_dict
from biomedgpt.engine.run_config import RunConfig
from test_engine_distributed import _wait_for_step, launch, metrics, run_config, running, shards  # noqa: F401  (a fixture)

TINY = ["model.d_model=64", "model.ffn_dim=128", "model.encoder_layers=1", "model.decoder_layers=1",
        "model.resnet_layers=[1,1,1]"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}


def _biomedgpt(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "biomedgpt.tools.cli", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _one_error_line(output: str) -> str:
    """The output's only ``error:`` line; no traceback."""
    lines = [line for line in output.splitlines() if "error: " in line]
    assert len(lines) == 1 and "Traceback" not in output, output[-4000:]
    return lines[0]


# -- one run per output folder ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def live_run(shards, tmp_path_factory, repo_root, vocab_dir) -> dict:  # noqa: F811
    """A 1-rank run of 6 steps (constant lr 2e-3, a checkpoint at the end) and a second run started into its
    folder while it trains; the finished run is also the one the resume test continues."""
    out = tmp_path_factory.mktemp("trust") / "live"
    first = run_config(shards, out, vocab_dir, optim={"lr": 2e-3, "max_steps": 6, "schedule": "constant",
                                                      "warmup_steps": 0}, checkpoint={"interval": 0, "at_end": True})
    with running(repo_root, first, 1) as proc:
        _wait_for_step(out, proc)
        lock_line = (out / ".run.lock").read_text()
        second = {**run_config(shards, out, vocab_dir), "seed": 2}
        start = time.perf_counter()
        refused = launch(repo_root, second, 1, expect=1)
        refused_s = time.perf_counter() - start
        holder = json.loads((out / ".run.lock").read_text())
        first_ranks = [c.pid for c in psutil.Process(proc.pid).children()]
        lock_after = (out / ".run.lock").read_text()
        output, _ = proc.communicate(timeout=300)
    return {"out": out, "config": first, "refused": refused, "refused_s": refused_s, "holder": holder,
            "first_ranks": first_ranks, "lock_line": lock_line, "lock_after": lock_after,
            "returncode": proc.returncode, "output": output, "logged": [m["step"] for m in metrics(out) if "loss" in m],
            "config_yaml": yaml.safe_load((out / "config.yaml").read_text())}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_second_run_into_a_live_runs_folder_is_refused_and_the_first_finishes_untouched(live_run):
    out, holder = live_run["out"], live_run["holder"]
    line = _one_error_line(live_run["refused"])
    assert f"{out} is in use by another run (host {socket.gethostname()}, pid {holder['pid']}" in line, line
    assert holder["pid"] in live_run["first_ranks"]
    assert live_run["refused_s"] < 20, f"refused after {live_run['refused_s']:.1f} s"
    print(f"second run refused in {live_run['refused_s']:.1f} s: {line}")
    assert live_run["lock_after"] == live_run["lock_line"]  # the refused run wrote nothing (config.yaml: below)
    assert live_run["returncode"] == 0, live_run["output"][-4000:]
    assert live_run["logged"] == [1, 2, 3, 4, 5, 6]  # each step once
    assert live_run["config_yaml"]["seed"] == 1


def test_a_killed_runs_lock_never_blocks_the_next_and_a_requeued_job_takes_it_over(tmp_path, monkeypatch):
    from biomedgpt.engine.train.run_lock import OutputDirInUse, RunLock

    out = tmp_path / "run"

    def holder(**env) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", "import sys, time; from biomedgpt.engine.train.run_lock import "
                                 "RunLock; RunLock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(600)",
                                 str(out)], env={**_env(), **env}, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "held"
        return proc

    proc = holder()
    with pytest.raises(OutputDirInUse, match=rf"in use by another run \(host {socket.gethostname()}, pid {proc.pid}, "
                                             r"started \d{4}-\d\d-\d\d "):
        RunLock.acquire(out)
    proc.send_signal(signal.SIGKILL)  # the OS releases the flock of a killed process
    proc.wait()
    RunLock.acquire(out).release()

    # SLURM requeue: the same job (a higher restart count) takes over a lock a dead node's filesystem still holds
    proc = holder(SLURM_JOB_ID="77", SLURM_RESTART_COUNT="0")
    try:
        monkeypatch.setenv("SLURM_JOB_ID", "78")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        with pytest.raises(OutputDirInUse, match="SLURM job 77"):
            RunLock.acquire(out)  # another job
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        lock = RunLock.acquire(out)
        assert "taken over from this SLURM job's previous run (restart 0" in lock.note
        lock.release()
    finally:
        proc.kill()
        proc.wait()


# -- resume with changed settings ---------------------------------------------------------------------


def _checkpoint_of(tmp_path: Path, cfg: RunConfig) -> Path:
    """A checkpoint folder as far as the pre-load checks read it: its tag's model states hold the config."""
    from biomedgpt.engine.checkpoint.layout import LATEST_FILE

    root = tmp_path / "out" / "checkpoints"
    (root / "step_00000002").mkdir(parents=True)
    torch.save({"config": to_dict(cfg), "step": 2}, root / "step_00000002" / "mp_rank_00_model_states.pt")
    (root / LATEST_FILE).write_text("step_00000002")
    return root


def test_resume_refuses_settings_it_cannot_change_before_loading_and_lists_the_optimizer_changes(tmp_path):
    from biomedgpt.engine.checkpoint.manager import ResumeError
    from biomedgpt.engine.checkpoint.resume_checks import check_resumable

    streams = ["data.streams=[{name: a, task: caption, remote: /d/a, proportion: 0.5}, "
               "{name: b, task: summarization, remote: /d/b, proportion: 0.5}]"]
    saved = load(RunConfig, None, [*TINY, *streams, "model.dropout=0.1"])
    root = _checkpoint_of(tmp_path, saved)

    def check(*overrides: str) -> list[str]:
        return check_resumable(root, "step_00000002", 0, to_dict(load(RunConfig, None, [*TINY, *streams, *overrides])))

    assert check("model.dropout=0.1") == []
    assert check("model.dropout=0.0", "model.attention_backend=sdpa", "log.interval=3", "eval.interval=5",
                 "data.num_workers=0") == []  # runtime model fields and everything else may change
    assert check("model.dropout=0.1", "optim.lr=1e-3", "optim.max_steps=50", "optim.clip_norm=0.5") == [
        "optim.lr 5e-05 -> 0.001", "optim.clip_norm 1.0 -> 0.5", "optim.max_steps 1000 -> 50"]
    refusals = {
        "data.batch_size=4": "data.batch_size: checkpoint 16, this run 4",
        "seed=2": "seed: checkpoint 1, this run 2",
        "optim.grad_accum=2": "optim.grad_accum: checkpoint 1, this run 2",
        "data.streams=[{name: a, task: caption, remote: /d/a, proportion: 0.7}, "
        "{name: b, task: summarization, remote: /d/b, proportion: 0.3}]":
            "data.streams[a].proportion: checkpoint 0.5, this run 0.7; data.streams[b].proportion: checkpoint 0.5, "
            "this run 0.3",
        "data.streams=[{name: a, task: caption, remote: /d/a}]": "data.streams: checkpoint ['a', 'b'], this run ['a']",
    }
    for override, named in refusals.items():
        with pytest.raises(ResumeError) as info:
            check(override)
        message = str(info.value)
        assert named in message and "new output_dir" in message and "checkpoint.resume=never" in message, message
    with pytest.raises(ResumeError, match=r"another model \(model.heads: checkpoint 4, this run 8\).*new output_dir"):
        check("model.heads=8")


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_resumed_run_trains_with_the_changed_lr_and_dropout(live_run, repo_root):
    """The schedule's saved state used to win over optim.lr; a changed model.dropout used to fail after loading."""
    out = live_run["out"]
    output = launch(repo_root, live_run["config"], 1, "optim.lr=5e-4", "optim.max_steps=8", "model.dropout=0.0")
    assert "resumed from step_00000006" in output, output[-4000:]
    assert "changed optimizer settings, applied: optim.lr 0.002 -> 0.0005; optim.max_steps 6 -> 8" in output
    lrs = {m["step"]: m["lr"] for m in metrics(out) if "lr" in m}
    assert lrs == {**{s: 2e-3 for s in range(1, 7)}, 7: 5e-4, 8: 5e-4}, lrs
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 5e-4 and saved["model"]["dropout"] == 0.0


# -- user errors: one line, once, exit status 1 ---------------------------------------------------------


def test_a_tag_in_an_override_is_one_line_and_runs_nothing(tmp_path):
    marker = tmp_path / "MARKER"
    result = _biomedgpt(["train", f"seed=!!python/object/apply:os.system ['touch {marker}']"], tmp_path, 60)
    assert result.returncode == 1 and not marker.exists()
    assert result.stderr.strip().splitlines() == [
        f"biomedgpt train: error: command line: seed: expected an integer, got "
        f"\"!!python/object/apply:os.system ['touch {marker}']\""]
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 1e-3\nseed: [1,\n")
    result = _biomedgpt(["train", "--config", str(bad)], tmp_path, 60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"biomedgpt train: error: {bad}, line 4: not valid YAML: expected "
                                                  "the node content, but found '<stream end>'"]


def test_exponent_floats_parse_as_numbers_in_overrides_and_files(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  end_lr: 5E-5\n  eps: -1e-8\n")
    cfg = load(RunConfig, path, ["optim.weight_decay=1e-2", "log.wandb_run_name=1e5x", "seed=10"])
    assert (cfg.optim.lr, cfg.optim.end_lr, cfg.optim.eps, cfg.optim.weight_decay) == (1e-3, 5e-5, -1e-8, 1e-2)
    assert cfg.log.wandb_run_name == "1e5x" and cfg.seed == 10


def test_model_and_image_errors_of_infer_and_evaluate_are_one_line(tmp_path, capsys):
    from biomedgpt.data.images import encode_png
    from biomedgpt.tools import evaluate as downstream
    from biomedgpt.models.checkpoint import save_pretrained
    from biomedgpt.models.config import model_config
    from biomedgpt.models.ofa import BiomedGPT
    from biomedgpt.tools import infer

    image = tmp_path / "x.png"
    image.write_bytes(encode_png(np.zeros((16, 16, 3), dtype=np.uint8)))
    good, truncated = tmp_path / "model", tmp_path / "truncated"
    for folder in (good, truncated):
        save_pretrained(BiomedGPT(model_config("tiny", d_model=64, ffn_dim=128, encoder_layers=1, decoder_layers=1,
                                               resnet_layers=[1, 1, 1], vocab_size=300)), folder, None, overwrite=True)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    cases = [
        (infer.main, [f"model_dir={tmp_path / 'missing'}", f"image={image}", "question=what"],
         f"error: {tmp_path / 'missing'}/config.json: missing (not a model directory)"),
        (infer.main, [f"model_dir={truncated}", f"image={image}", "question=what"],
         f"error: {weights}: not a readable safetensors file (truncated or corrupt?)"),
        (infer.main, [f"model_dir={good}", f"image={tmp_path / 'none.png'}", "question=what"],
         f"error: image {tmp_path / 'none.png'}: file not found"),
        (downstream.main, [f"model_dir={tmp_path / 'missing'}", "data.eval_streams=[{name: v, task: vqa, remote: /x}]"],
         f"error: {tmp_path / 'missing'}/config.json: missing (not a model directory)"),
    ]
    for main, args, expected in cases:
        with pytest.raises(SystemExit) as info:
            main(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 1 and len(err) == 1 and err[0].startswith(expected), (args, err)


def test_a_missing_shard_is_one_line(tmp_path, capsys, monkeypatch):
    from biomedgpt.data.config import DataConfig, StreamConfig
    from biomedgpt.data.loader import build_train_loader
    from biomedgpt.core.user_errors import command
    from biomedgpt.models.tokenizer import GPT2_VOCAB_DIR, Tokenizer
    from test_data_loader import write_text_streams

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(key, "1" if "SIZE" in key else "0")
    stream = Path(write_text_streams(tmp_path, {"summ": 30})["summ"])
    missing = sorted(stream.glob("shard.*.mds"))[1]
    missing.unlink()
    capsys.readouterr()  # the conversion's summary
    cfg = DataConfig(streams=[StreamConfig(name="summ", task="summarization", remote=str(stream))], batch_size=4,
                     num_workers=0, cache_dir=str(tmp_path / "cache"), patch_image_size=16)
    with pytest.raises(SystemExit) as info:
        command(lambda: next(iter(build_train_loader(cfg, Tokenizer.from_gpt2_files(GPT2_VOCAB_DIR)))))()
    assert info.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: stream summ: shard file {missing} is missing (its index.json lists it): the dataset is incomplete; "
        "convert it again"]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_missing_data_path_is_one_line_once_on_two_ranks(tmp_path):
    result = _biomedgpt(["train", "-n", "2", *TINY, f"output_dir={tmp_path / 'run'}", "log.wandb_mode=disabled",
                         f"data.streams=[{{name: s, task: summarization, remote: {tmp_path / 'nothing'}}}]"], tmp_path)
    assert result.returncode == 1, result.stderr[-4000:]
    assert _one_error_line(result.stdout + result.stderr) == (
        f"error: stream s: no index.json under {tmp_path / 'nothing'} (not a converted dataset, or its conversion did "
        "not finish)")
    assert "local.sh" not in result.stderr


# -- a fine-tuning recipe from an empty folder on a CPU -----------------------------------------------------


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_finetuning_recipe_from_an_empty_folder_on_cpu(tmp_path):
    from biomedgpt.data.mds import ShardWriter
    from biomedgpt.data.records import make_record

    for split in ("train", "val", "test"):  # the recipe trains on train and selects on val
        writer = ShardWriter(str(tmp_path / "data/meqsum" / split))
        for i in range(8):
            writer.write(make_record(f"{split}-{i}", "summarization", {"source": f"what dose of aspirin {i}",
                                                                       "summary": f"aspirin dose {i}"}))
        writer.commit()
    small = [*TINY, "data.batch_size=2", "data.num_workers=0", "data.max_src_tokens=32", "data.max_tgt_tokens=8",
             "data.patch_image_size=32", "optim.max_steps=2", "optim.max_epochs=null", "optim.grad_accum=1",
             "optim.lr=1e-3", "eval.at_end=false", "checkpoint.interval=0", "checkpoint.at_end=false",
             "log.wandb_mode=disabled", "log.interval=1", "log.progress_bar=false"]
    result = _biomedgpt(["train", "--config", "finetune/meqsum", *small], tmp_path, 120)
    weights = tmp_path / "pretrained/biomedgpt-tiny"
    assert result.returncode == 1 and result.stdout == "", result.stdout
    assert result.stderr.strip().splitlines() == [
        f"error: checkpoint.init_from {weights}: not a model directory ({weights}/config.json, "
        f"{weights}/model.safetensors missing): make it from a released checkpoint with 'biomedgpt import-checkpoint "
        f"source=<file.pt> output={weights}', or train from scratch with checkpoint.init_from=null"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # nothing written

    result = _biomedgpt(["train", "--config", "finetune/meqsum", *small, "checkpoint.init_from=null"], tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("deepspeed.precision fp16 is not supported on this device (cpu): training in fp32 "
                               "instead") == 1, result.stdout
    out = tmp_path / "runs/meqsum"
    assert [m["step"] for m in metrics(out) if "loss" in m] == [1, 2]
    assert yaml.safe_load((out / "config.yaml").read_text())["deepspeed"]["precision"] == "fp32"
