"""Scaling-law fits on points from known laws (under-determined fits refused, wide intervals flagged), the compute
frontier, collection of every run's status, and sweep files' paths."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from biomedgpt.core.config import from_dict
from biomedgpt.tools.scaling.collect import SweepDataError, collect, read_metrics
from biomedgpt.tools.scaling.fit import FitConfig, FitError, compute_frontier, fit_optimal_size, fit_power_law, run
from biomedgpt.tools.scaling.sweep import SweepConfig, expand, pending, write_plan


@pytest.mark.parametrize("E,A,alpha,lo,hi", [(1.69, 406.4, 0.34, 1e6, 1e10), (2.0, 50.0, 0.15, 1e15, 1e21),
                                             (0.5, 8.0, 0.6, 10.0, 1e4)])
def test_fit_recovers_known_exponents(E, A, alpha, lo, hi):
    x = np.geomspace(lo, hi, 9)
    exact = fit_power_law(x, E + A * x ** -alpha, bootstrap=0)
    assert exact.alpha == pytest.approx(alpha, rel=1e-3)
    assert exact.E == pytest.approx(E, rel=1e-3)
    assert exact.A == pytest.approx(A, rel=1e-2)
    rng = np.random.default_rng(7)
    noisy = (E + A * x ** -alpha) * (1 + 0.003 * rng.standard_normal(len(x)))
    fit = fit_power_law(x, noisy, bootstrap=100, seed=1)
    assert abs(fit.alpha - alpha) < max(4 * fit.stderr["alpha"], 0.02)
    assert abs(fit.E - E) < max(4 * fit.stderr["E"], 0.02 * E)
    lo_ci, hi_ci = fit.ci95["alpha"]
    assert lo_ci <= fit.alpha <= hi_ci and hi_ci - lo_ci < 0.5 * alpha
    assert fit.rms_rel_residual < 0.01


def test_fit_refuses_no_more_points_than_parameters():
    with pytest.raises(FitError, match=r"under-determined: 3 distinct x value\(s\) for 3 free parameters"):
        fit_power_law([1e6, 1e6, 1e7, 1e8], [3.0, 3.1, 2.5, 2.2])  # an exact interpolation is no measurement


def test_intervals_too_wide_are_flagged_and_bands_bracket_the_fit():
    x = np.geomspace(1e6, 1e9, 8)
    clean = 1.69 + 406.4 * x ** -0.34
    tight = fit_power_law(x, clean * (1 + 0.002 * np.random.default_rng(3).standard_normal(8)), bootstrap=100)
    assert tight.too_wide == [] and tight.warning() is None
    lo, hi = tight.band(x)
    assert np.all(lo <= tight.predict(x) + 1e-9) and np.all(tight.predict(x) <= hi + 1e-9) and np.all(hi - lo < 0.05)
    few = x[[0, 2, 4, 7]]  # four points, 5 % noise: one degree of freedom cannot pin E and A down
    loose = fit_power_law(few, (1.69 + 406.4 * few ** -0.34) * np.array([1.05, 0.95, 1.04, 0.97]), bootstrap=100)
    assert "A" in loose.too_wide and "too wide to use for" in loose.warning()
    assert loose.to_json()["too_wide"] == loose.too_wide and "samples" not in loose.to_json()


def test_frontier_and_optimal_size_follow_a_known_law():
    """Chinchilla-style L(N, D) = E + A/N^a + B/D^b with a = b: the frontier's N_opt grows as C^(b/(a+b)) = C^0.5."""
    E, A, a, B, b = 1.7, 400.0, 0.34, 410.0, 0.34
    points = []
    for n in np.geomspace(1e6, 1e9, 13):
        for d in np.geomspace(1e7, 1e12, 60):
            points.append({"run": f"n{n:.0f}", "params": n, "flops": 6 * n * d, "step": 0,
                           "loss": E + A / n ** a + B / d ** b})
    frontier = compute_frontier(points)
    assert all(p["loss"] > q["loss"] and p["flops"] <= q["flops"] for p, q in zip(frontier, frontier[1:]))
    inner = [p for p in frontier if 1e15 < p["flops"] < 1e18]  # N_opt = D_opt = (C/6)^0.5 inside the grid
    assert fit_optimal_size(inner)["a"] == pytest.approx(b / (a + b), abs=0.06)
    fit = fit_power_law([p["flops"] for p in inner], [p["loss"] for p in inner], bootstrap=0)
    assert fit.E == pytest.approx(E, abs=0.15)


def _write_metrics(run_dir: Path, steps: int, tail: str = "", eval_loss: float | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": s, "loss": 10.0 / s ** 0.2, "tokens_per_s": 100.0, "step_time_s": 0.5})
             for s in range(1, steps + 1)]
    if eval_loss is not None:
        lines.append(json.dumps({"step": steps, "eval/loss": eval_loss}))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n" + tail)


def test_collect_marks_every_run_and_reruns_only_unfinished(tmp_path):
    cfg = from_dict(SweepConfig, {
        "name": "statuses", "root": str(tmp_path), "launcher": "plan",
        "overrides": {"optim.max_steps": 4, "model.resnet_layers": [1, 1, 1]},
        "axes": [{"name": "model", "labels": ["a", "b", "c", "d", "e"],
                  "values": [{"d_model": 16 * k, "heads": 2} for k in (1, 2, 3, 4, 5)]}]})
    runs = expand(cfg)
    directory = write_plan(cfg, runs)
    out = {r.name: Path(r.config.output_dir) for r in runs}
    _write_metrics(out["model-a"], 4, eval_loss=7.5)
    (out["model-a"] / "sweep_status.json").write_text(json.dumps({"status": "exited", "returncode": 0, "wall_s": 3}))
    _write_metrics(out["model-b"], 4, tail='{"step": 5, "lo', eval_loss=7.0)  # finished, then killed mid-line
    _write_metrics(out["model-c"], 1)
    (out["model-c"] / "sweep_status.json").write_text(json.dumps({"status": "exited", "returncode": 1}))
    (out["model-c"] / "train.log").write_text("step 1\nRuntimeError: image grid 4x4 exceeds image_bucket_size 2\n")
    _write_metrics(out["model-d"], 2, eval_loss=6.0)  # an evaluation, but not at the run's end (max_steps 4)
    (out["model-d"] / "sweep_status.json").write_text(json.dumps({"status": "exited", "returncode": 75}))

    rows, curves = collect(directory)
    status = {r["run"]: r["status"] for r in rows}
    assert status == {"model-a": "finished", "model-b": "finished", "model-c": "failed", "model-d": "incomplete",
                      "model-e": "not_started"}
    by_run = {r["run"]: r for r in rows}
    assert "image_bucket_size" in by_run["model-c"]["error"] and "cut off" in by_run["model-b"]["error"]
    assert by_run["model-a"]["tokens"] == pytest.approx(4 * 100 * 0.5)
    assert by_run["model-a"]["wall_s"] == 3
    assert (by_run["model-a"]["eval_loss"], by_run["model-c"]["eval_loss"]) == (7.5, None)
    assert [r["run"] for r in pq.read_table(directory / "results.parquet").to_pylist()] == sorted(status)
    assert len(curves) == 4 + 4 + 1 + 2 + 3  # training windows and evaluations
    assert sorted(r.name for r in pending(runs)) == ["model-c", "model-d", "model-e"]

    analysis = run(FitConfig(sweep_dir=str(directory), bootstrap=0))
    report = (directory / "report.md").read_text()
    for name in ("model-c", "model-d", "model-e"):
        assert f"- `{name}`: " in report
    assert "not fitted — under-determined: 2 distinct x value(s)" in report  # two finished sizes, 3 parameters
    assert [p["loss"] for p in analysis.frontier] == [7.5, 7.0]  # end-of-run evaluations, finished runs only
    assert (directory / "scaling.png").exists()


def test_no_metric_fails_in_one_line_and_draws_nothing(tmp_path):
    cfg = from_dict(SweepConfig, {"name": "noeval", "root": str(tmp_path), "launcher": "plan",
                                  "overrides": {"optim.max_steps": 4, "model.resnet_layers": [1, 1, 1]},
                                  "axes": [{"name": "model", "values": [{"d_model": 16, "heads": 2}]}]})
    runs = expand(cfg)
    directory = write_plan(cfg, runs)
    collect(directory)
    with pytest.raises(SweepDataError, match="logged any metrics .1 runs: 1 not_started.: nothing to fit or plot"):
        run(FitConfig(sweep_dir=str(directory)))
    _write_metrics(Path(runs[0].config.output_dir), 4)  # trained, but never evaluated
    collect(directory)
    with pytest.raises(SweepDataError, match="has `eval_loss` .* turn on evaluation at the end of each run"):
        run(FitConfig(sweep_dir=str(directory)))
    assert not list(directory.glob("scaling.*"))
    run(FitConfig(sweep_dir=str(directory), metric="loss", bootstrap=0))  # the last training window instead
    assert "Fits use `loss`, the last training-window loss" in (directory / "report.md").read_text()


def test_bad_metrics_line_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(SweepDataError, match=r"metrics.jsonl: line 2 is not valid JSON"):
        read_metrics(path)


def test_sweep_expansion_validates_every_run(tmp_path):
    cfg = from_dict(SweepConfig, {
        "name": "grid", "root": str(tmp_path), "overrides": {"optim.max_steps": 10},
        "axes": [{"name": "size", "values": ["tiny", "base"]}, {"name": "lr", "values": [1e-4, 3e-4]},
                 {"name": "zero_stage", "values": [2, 3]}, {"name": "position_scheme", "values": ["ofa", "rope"]},
                 {"name": "attention_backend", "values": ["eager", "sdpa"]},
                 {"name": "patch_image_size", "values": [128, 256]}]})
    runs = expand(cfg)
    assert len(runs) == 2 ** 6
    first = runs[0].config
    assert (first.model.size, first.optim.lr, first.deepspeed.zero_stage) == ("tiny", 1e-4, 2)
    assert first.model.build().d_model == 256  # the size axis drops the demo base's own width
    assert runs[-1].config.model.position_scheme == "rope"
    assert runs[-1].config.data.patch_image_size == 256
    bad = from_dict(SweepConfig, {"name": "bad", "root": str(tmp_path), "overrides": {"optim.max_steps": 10},
                                  "axes": [{"name": "model", "values": [{"d_model": 30, "heads": 4}]}]})
    with pytest.raises(ValueError, match="d_model 30 is not divisible by heads 4"):
        expand(bad)
    typo = from_dict(SweepConfig, {"name": "typo", "root": str(tmp_path),
                                   "axes": [{"name": "lr", "key": "optim.learning_rate", "values": [1e-4]}]})
    with pytest.raises(ValueError, match="optim.learning_rate"):
        expand(typo)


def test_sweep_file_paths_resolve_against_its_folder(tmp_path, monkeypatch, capsys):
    """A sweep file's relative root, base and path overrides mean its own folder, from any current directory;
    every generated run config holds absolute paths."""
    from biomedgpt.tools.scaling.sweep import main as sweep

    project = tmp_path / "project"
    project.mkdir()
    base = {"optim": {"max_steps": 3}, "model": {"d_model": 16, "heads": 2}}
    (project / "base.yaml").write_text(yaml.safe_dump(base))
    (project / "sweep.yaml").write_text(yaml.safe_dump({
        "name": "paths", "base": "base.yaml", "root": "sweeps", "launcher": "plan",
        "overrides": {"data.cache_dir": "cache",
                      "data.streams": [{"name": "s", "task": "caption", "remote": "shards"}]},
        "axes": [{"name": "lr", "values": [1e-4, 2e-4]}]}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert sweep(["--config", str(project / "sweep.yaml")]) == 0
    directory = project / "sweeps" / "paths"
    assert f"2 runs, 0 already finished, 2 to run ({directory})" in capsys.readouterr().out
    for name in ("lr-0.0001", "lr-0.0002"):
        config = yaml.safe_load((directory / "configs" / f"{name}.yaml").read_text())
        assert config["output_dir"] == str(directory / "runs" / name)
        assert config["optim"]["max_steps"] == 3 and config["model"]["d_model"] == 16  # the base beside the file
        assert config["data"]["cache_dir"] == str(project / "cache")
        assert config["data"]["streams"][0]["remote"] == str(project / "shards")
    assert not (elsewhere / "sweeps").exists()
