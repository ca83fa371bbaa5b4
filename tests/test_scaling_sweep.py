"""A real sweep end to end: four sizes trained on the demo data (CPU), collected, fitted, plotted, reported;
then rerun, which must skip every finished run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

SIZES = [  # micro to tiny's transformer width/depth; a one-block ResNet keeps CPU steps short
    {"d_model": 32, "ffn_dim": 64, "encoder_layers": 1, "decoder_layers": 1, "heads": 2},
    {"d_model": 64, "ffn_dim": 256, "encoder_layers": 1, "decoder_layers": 1, "heads": 4},
    {"d_model": 128, "ffn_dim": 512, "encoder_layers": 2, "decoder_layers": 2, "heads": 4},
    {"d_model": 256, "ffn_dim": 1024, "encoder_layers": 4, "decoder_layers": 4, "heads": 4},
]
STEPS = 3
pytestmark = pytest.mark.timeout(600)  # ~90 s on two idle cores; the demo data build is ~40 s of it


def _run(args: list[str], repo_root: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, *args], cwd=repo_root, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_sweep_end_to_end_and_resume(tmp_path, demo_data, repo_root, vocab_dir):
    data = yaml.safe_load((demo_data / "data_config.yaml").read_text())
    data.update(batch_size=2, patch_image_size=64, max_src_tokens=32, max_tgt_tokens=12, num_workers=0,
                group_weights=[1.0], train_transform="resize", cache_dir=str(tmp_path / "cache"), eval_streams=[])
    base = {"model": {"size": "tiny", "resnet_layers": [1, 1, 1], "dropout": 0.0},
            "data": data, "optim": {"lr": 2e-3, "max_steps": STEPS, "warmup_steps": 0},
            "eval": {"at_end": False}, "log": {"interval": 1, "progress_bar": False, "wandb_mode": "disabled"},
            "checkpoint": {"interval": 0, "at_end": False}, "bpe_dir": str(vocab_dir)}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = {"name": "sizes", "base": str(tmp_path / "base.yaml"), "root": str(tmp_path / "sweeps"),
             "bootstrap": 50,
             "axes": [{"name": "model", "values": SIZES, "labels": ["micro", "mini", "small", "tinywidth"]}]}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))

    done = _run(["-m", "biomedgpt.tools.scaling.sweep", "--config", str(tmp_path / "sweep.yaml")], repo_root, 600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    directory = tmp_path / "sweeps" / "sizes"
    rows = pq.read_table(directory / "results.parquet").to_pylist()
    assert [r["run"] for r in rows] == [f"model-{n}" for n in ("micro", "mini", "small", "tinywidth")]
    assert all(r["status"] == "finished" and r["steps_done"] == STEPS for r in rows), rows
    params = [r["params"] for r in rows]
    assert params == sorted(params) and params[0] < params[-1] / 5
    assert all(r["tokens"] > 0 and r["flops"] > 0 and r["loss"] > 0 for r in rows)
    assert json.loads(rows[-1]["config_json"])["model"]["d_model"] == 256
    curves = pq.read_table(directory / "curves.parquet").to_pylist()
    assert len([c for c in curves if c["loss"] is not None]) == 4 * STEPS
    assert (directory / "results.csv").exists()

    fits = json.loads((directory / "fits.json").read_text())
    assert set(fits["fits"]) | set(fits["not_fitted"]) == {"params", "tokens", "compute"}
    assert fits["frontier"], "the compute frontier has points"
    report = (directory / "report.md").read_text()
    assert "| model-micro | finished |" in report and "![scaling](scaling.png)" in report
    png = (directory / "scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert (directory / "scaling.svg").stat().st_size > 10_000

    logs = {r["run"]: (Path(r["output_dir"]) / "metrics.jsonl").read_text() for r in rows}
    again = _run(["-m", "biomedgpt.tools.scaling.sweep", "--config", str(tmp_path / "sweep.yaml"), "analyse=false"], repo_root, 120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 already finished, 0 to run" in again.stdout
    assert logs == {r["run"]: (Path(r["output_dir"]) / "metrics.jsonl").read_text() for r in rows}
