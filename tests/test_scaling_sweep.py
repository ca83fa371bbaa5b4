"""The README's sweep example as a new user runs it: ``biomedgpt sweep --config sweeps/demo_sizes`` from an
empty folder, made tiny on the command line (2 sizes, 2 steps, 1 rank). Real training runs land in the
sweep's folder, ``collect`` finds every run finished, ``fit-scaling``'s report says the fit is
under-determined, a rerun skips the finished runs (``check_the_readme_sweep``, which test_readme_commands
runs on the README's own sweep line); with no metrics at all ``collect``, ``fit-scaling`` and the sweep
itself exit 1 with one line and draw nothing."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from biomedgpt.tools.cli import main as biomedgpt

#: the packaged sweep made tiny: two micro sizes, 2 steps, small batches, a one-batch evaluation at the end
TINY = ["axes=[{name: model, labels: [micro, mini], values: ["
        "{d_model: 16, ffn_dim: 32, encoder_layers: 1, decoder_layers: 1, heads: 2}, "
        "{d_model: 32, ffn_dim: 64, encoder_layers: 1, decoder_layers: 1, heads: 2}]}]",
        "overrides.optim.max_steps=2", "overrides.log.interval=1", "overrides.checkpoint.interval=0",
        "overrides.data.batch_size=2", "overrides.data.eval_batch_size=4", "overrides.eval.max_batches=1",
        "overrides.data.num_workers=0", "overrides.data.max_src_tokens=32", "overrides.data.max_tgt_tokens=12",
        "bootstrap=20"]
pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def empty_folder(tmp_path, demo_data, monkeypatch) -> Path:
    """A fresh current folder holding only the demo shards where the demo config looks for them (building
    them is the demo's own test); the runs' subprocesses get two threads and no wandb."""
    fresh = tmp_path / "fresh"
    (fresh / "runs").mkdir(parents=True)
    (fresh / "runs" / "demo-data").symlink_to(demo_data, target_is_directory=True)
    monkeypatch.chdir(fresh)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    return fresh


def check_the_readme_sweep(folder: Path, elsewhere: Path, sweep_output: str) -> None:
    """What the README's sweep made tiny (``TINY``), run in ``folder`` and printing ``sweep_output``, must
    leave: every run trained into the sweep's folder; ``collect`` and ``fit-scaling`` from another folder
    (``elsewhere``) find both runs finished and report the fit under-determined; a rerun skips the finished
    runs and leaves their logs as they were. test_readme_commands calls it on the README line that trains
    the sweep, as a user runs it (the sweep's training runs are the costly part: run once in the suite)."""
    directory = folder / "runs" / "sweeps" / "demo_sizes"
    assert "2 runs: 2 finished" in sweep_output, sweep_output

    for name in ("model-micro", "model-mini"):  # every run trained into the sweep's folder, nowhere else
        config = yaml.safe_load((directory / "configs" / f"{name}.yaml").read_text())
        assert config["output_dir"] == str(directory / "runs" / name)
        assert (directory / "runs" / name / "metrics.jsonl").stat().st_size > 0
    assert not (directory / "configs" / "runs").exists()

    with contextlib.chdir(elsewhere):  # collect and fit from another folder
        assert biomedgpt(["collect", f"sweep_dir={directory}"]) == 0
        rows = pq.read_table(directory / "results.parquet").to_pylist()
        assert [r["run"] for r in rows] == ["model-micro", "model-mini"]
        assert all(r["status"] == "finished" and r["steps_done"] == 2 for r in rows), rows
        assert all(r["eval_loss"] > 0 and r["tokens"] > 0 and r["flops"] > 0 for r in rows), rows
        assert rows[0]["params"] < rows[1]["params"]

        (directory / "report.md").unlink()
        assert biomedgpt(["fit-scaling", f"sweep_dir={directory}", "bootstrap=20"]) == 0
    report = (directory / "report.md").read_text()
    assert "**loss vs parameters N (each size's most-trained run)**: not fitted — under-determined: 2 distinct" \
        in report, report
    assert "Fits use `eval_loss`, the evaluation loss at the end of the run" in report
    assert "| model-micro | finished |" in report and "![scaling](scaling.png)" in report
    fits = json.loads((directory / "fits.json").read_text())
    assert fits["metric"] == "eval_loss" and "under-determined" in fits["not_fitted"]["params"]
    assert {p["loss"] for p in fits["frontier"]} <= {r["eval_loss"] for r in rows}  # end-of-run evaluations
    assert (directory / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    logs = {r["run"]: (Path(r["output_dir"]) / "metrics.jsonl").read_text() for r in rows}
    rerun = io.StringIO()
    with contextlib.chdir(folder), contextlib.redirect_stdout(rerun):
        assert biomedgpt(["sweep", "--config", "sweeps/demo_sizes", *TINY, "analyse=false"]) == 0
    assert "2 already finished, 0 to run" in rerun.getvalue()
    assert logs == {r["run"]: (Path(r["output_dir"]) / "metrics.jsonl").read_text() for r in rows}


def _one_error_line(status: int, capsys) -> str:
    err = capsys.readouterr().err
    assert status == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_no_metrics_is_one_line_and_no_figure(empty_folder, tmp_path, capsys):
    missing = tmp_path / "no-such-shards"
    failing = [*TINY[1:], "axes=[{name: model, labels: [micro], values: [{d_model: 16, heads: 2}]}]",
               f"overrides.data.streams=[{{name: gone, task: caption, remote: {missing}}}]"]
    error = _one_error_line(biomedgpt(["sweep", "--config", "sweeps/demo_sizes", *failing]), capsys)
    directory = empty_folder / "runs" / "sweeps" / "demo_sizes"
    assert "no run of" in error and "logged any metrics (1 runs: 1 failed)" in error, error
    assert "train.log" in error
    for command in ("collect", "fit-scaling"):
        error = _one_error_line(biomedgpt([command, f"sweep_dir={directory}"]), capsys)
        assert "logged any metrics" in error and "nothing to fit or plot" in error, error
    assert not list(directory.glob("scaling.*")) and not (directory / "report.md").exists()


def test_a_swept_size_supplies_every_field_nobody_set(tmp_path):
    """The runs start from the base's settings as written: the size of each run fills the width/depth fields
    (the demo base's own ones dropped, never nulled), what the overrides and axes set stays, and each run's
    written config loads back to the same run."""
    from biomedgpt.core.config import from_dict, load
    from biomedgpt.engine.run_config import RunConfig
    from biomedgpt.models.config import model_config
    from biomedgpt.tools.scaling.sweep import SweepConfig, expand, write_plan

    cfg = from_dict(SweepConfig, {
        "name": "sizes", "root": str(tmp_path), "overrides": {"optim.max_steps": 2, "model.heads": 8},
        "axes": [{"name": "model", "labels": ["base", "medium-2"],
                  "values": [{"size": "base"}, {"size": "medium", "encoder_layers": 2}]}], "combine": "zip"})
    runs = expand(cfg, tmp_path)
    assert [r.config.model.build() for r in runs] == [model_config("base", heads=8),
                                                      model_config("medium", heads=8, encoder_layers=2)]
    write_plan(cfg, runs)
    for run in runs:
        written = yaml.safe_load(run.config_path.read_text())["model"]
        assert None not in written.values(), written
        assert load(RunConfig, run.config_path) == run.config
