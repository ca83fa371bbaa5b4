"""Collect a sweep's runs into tables: one row per run with its config, one row per logged step.

    biomedgpt collect sweep_dir=runs/sweeps/demo_sizes

Reads the sweep's manifest (``sweep.json``, written by ``biomedgpt.tools.scaling.sweep``) and each run directory:
``config.yaml`` as planned, ``metrics.jsonl`` (the trainer's logged windows and evaluations),
``sweep_status.json`` (the local launcher's return code and wall time) and an optional ``results.json``
(a flat mapping of downstream results, added as ``result.<key>`` columns). Writes ``results.parquet`` /
``results.csv`` and ``curves.parquet`` / ``curves.csv`` into the sweep directory.

Every planned run gets a row and a ``status``: ``finished`` (reached optim.max_steps), ``failed`` (its
process exited non-zero), ``incomplete`` (started, not at the end: still running, pre-empted or killed)
or ``not_started``. Nothing is dropped silently. ``eval_loss`` is the evaluation at the run's last logged
step (``eval.at_end``), the point the fits use; an earlier evaluation is not an end-of-run loss
(``last_eval_step`` says where the last one was). When no run logged any metrics, the tables are still
written and the command exits 1 with one line saying so.

Tokens are the trainer's logged throughput integrated over each window (tokens_per_s * step_time_s *
steps); FLOPs are ``biomedgpt.engine.flops.train_step_flops`` at the config's nominal batch shape (batch_size rows
of max_src_tokens / max_tgt_tokens tokens and patch_image_size images) per micro-batch, times gradient
accumulation and ranks: an upper bound, as real batches are padded only to their longest sample.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from biomedgpt.core.config import ConfigError, parse_cli, read_json, to_dict
from biomedgpt.core.durable import atomic_file
from biomedgpt.engine.flops import image_tokens, parameter_counts, train_step_flops
from biomedgpt.engine.run_config import RunConfig, saved_run_config
from biomedgpt.models.config import ModelConfig
from biomedgpt.tools.cli import one_line_errors

STATUS_FILE = "sweep_status.json"
EXIT_RESUME = 75  # the trainer's "stopped, resume to continue" status


class SweepDataError(ValueError):
    """A sweep directory that cannot be read or holds nothing to analyse (one line: what and where)."""


@dataclass
class CollectConfig:
    """Collect every run of a sweep into results / curves tables."""

    sweep_dir: str = "runs/sweeps/default"


def read_manifest(sweep_dir: Path) -> dict:
    return read_json(sweep_dir / "sweep.json", SweepDataError,
                     "not a sweep directory: `biomedgpt sweep` writes it")


def read_metrics(path: Path) -> tuple[list[dict], list[dict], Optional[str]]:
    """(training windows, evaluations, note) of a metrics.jsonl; a torn last line (a killed run) is noted.

    A step logged twice (a run restarted without a checkpoint appends to the same file) keeps its last record.
    """
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    note = None
    if not path.exists():
        return train, evals, note
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                note = f"{path}: last line {number} is cut off (the run was killed while writing)"
                continue
            raise SweepDataError(f"{path}: line {number} is not valid JSON ({exc})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise SweepDataError(f"{path}: line {number} has no integer 'step'")
        if "eval/loss" in record:
            evals[record["step"]] = record
        elif "loss" in record:
            train[record["step"]] = record
    return list(train.values()), list(evals.values()), note


def read_status(run_dir: Path) -> dict:
    path = run_dir / STATUS_FILE
    return read_json(path, SweepDataError, "run status") if path.exists() else {}


def classify(steps_done: int, max_steps: int, status_file: dict, started: bool) -> str:
    """finished / failed / incomplete / not_started, from the log's last step and the launcher's record."""
    returncode = status_file.get("returncode")
    if steps_done >= max_steps and returncode in (None, 0) and status_file.get("status") != "running":
        return "finished"
    if returncode not in (None, 0, EXIT_RESUME):
        return "failed"
    return "incomplete" if started or status_file else "not_started"


def is_finished(run_dir: Path, max_steps: int) -> bool:
    """A run is done when its log reached the last step and its launcher (if it recorded one) saw it exit 0."""
    train, _, _ = read_metrics(run_dir / "metrics.jsonl")
    steps_done = max((r["step"] for r in train), default=0)
    return classify(steps_done, max_steps, read_status(run_dir), bool(train)) == "finished"


def _number(value: Any) -> Optional[float]:
    """Logged values as floats (the trainer writes non-finite numbers as strings)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def step_flops(cfg: RunConfig, model_cfg: ModelConfig, ranks: int) -> float:
    """Training FLOPs of one optimizer step at the config's nominal batch shape."""
    d = cfg.data
    n_img = image_tokens(d.patch_image_size, sample_patch_num=cfg.data.sample_patch_num)
    hw = (d.patch_image_size, d.patch_image_size)
    per_micro = train_step_flops(model_cfg, d.batch_size, d.max_src_tokens, d.max_tgt_tokens, n_img, hw)
    return per_micro * cfg.optim.grad_accum * ranks


def curve_rows(run: str, train: list[dict], evals: list[dict], flops_per_step: float) -> list[dict]:
    rows, tokens, previous = [], 0.0, 0
    for record in sorted(train, key=lambda r: r["step"]):
        steps = record["step"] - previous
        rate, step_time = _number(record.get("tokens_per_s")), _number(record.get("step_time_s"))
        if rate is not None and step_time is not None:
            tokens += rate * step_time * steps
        previous = record["step"]
        rows.append({"run": run, "step": record["step"], "tokens": tokens, "flops": flops_per_step * record["step"],
                     "loss": _number(record.get("loss")), "eval_loss": None})
    for record in evals:
        rows.append({"run": run, "step": record["step"], "tokens": None, "flops": flops_per_step * record["step"],
                     "loss": None, "eval_loss": _number(record.get("eval/loss"))})
    return rows


def _log_tail(run_dir: Path, lines: int = 3) -> Optional[str]:
    log = run_dir / "train.log"
    if not log.exists():
        return None
    tail = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()][-lines:]
    return " / ".join(tail) or None


def run_row(entry: dict, ranks: int, params_cache: dict) -> tuple[dict, list[dict]]:
    """One run's table row (config, status, final figures) and its curve rows."""
    run_dir, name = Path(entry["output_dir"]), entry["run"]
    try:
        cfg = saved_run_config(entry["config"])
    except ConfigError as exc:
        raise SweepDataError(f"sweep.json: run {name}: {exc}") from None
    model_cfg = cfg.model.build()
    key = json.dumps(to_dict(model_cfg), sort_keys=True)
    if key not in params_cache:
        params_cache[key] = parameter_counts(model_cfg)[0]
    train, evals, note = read_metrics(run_dir / "metrics.jsonl")
    status_file = read_status(run_dir)
    flops_per_step = step_flops(cfg, model_cfg, ranks)
    curves = curve_rows(name, train, evals, flops_per_step)
    steps_done = max((r["step"] for r in train), default=0)
    returncode = status_file.get("returncode")
    status = classify(steps_done, cfg.optim.max_steps, status_file,
                      bool(train) or run_dir.joinpath("config.yaml").exists())
    error = None
    if status == "failed":
        error = f"exit status {returncode}: {_log_tail(run_dir)}"
    elif note:
        error = note
    last = max(train, key=lambda r: r["step"]) if train else {}
    last_eval = max(evals, key=lambda r: r["step"]) if evals else {}
    end_eval = last_eval if last_eval and last_eval["step"] >= steps_done else {}
    step_times = sorted(t for t in (_number(r.get("step_time_s")) for r in train) if t is not None)
    memory = [m for m in (_number(r.get("memory_gb")) for r in train) if m is not None]
    mfus = [m for m in (_number(r.get("mfu")) for r in train) if m is not None]
    token_curve = [c["tokens"] for c in curves if c["tokens"] is not None]
    row = {
        "run": name, "status": status, "error": error, "output_dir": str(run_dir),
        **{f"axis.{axis}": label for axis, label in entry.get("axes", {}).items()},
        "size": cfg.model.size, "d_model": model_cfg.d_model, "ffn_dim": model_cfg.ffn_dim,
        "encoder_layers": model_cfg.encoder_layers, "decoder_layers": model_cfg.decoder_layers,
        "heads": model_cfg.heads, "resnet_layers": json.dumps(model_cfg.resnet_layers),
        "position_scheme": model_cfg.position_scheme, "attention_backend": model_cfg.attention_backend,
        "params": params_cache[key], "lr": cfg.optim.lr, "batch_size": cfg.data.batch_size,
        "grad_accum": cfg.optim.grad_accum, "ranks": ranks, "image_size": cfg.data.patch_image_size,
        "zero_stage": cfg.deepspeed.zero_stage, "precision": cfg.deepspeed.precision,
        "max_steps": cfg.optim.max_steps, "steps_done": steps_done,
        "tokens": token_curve[-1] if token_curve else None, "flops": flops_per_step * steps_done,
        "loss": _number(last.get("loss")), "eval_loss": _number(end_eval.get("eval/loss")),
        "last_eval_step": last_eval.get("step"),
        "step_time_s": step_times[len(step_times) // 2] if step_times else None,
        "mfu": sum(mfus) / len(mfus) if mfus else None, "memory_gb": max(memory) if memory else None,
        "wall_s": _number(status_file.get("wall_s")), "returncode": returncode,
        "config_json": json.dumps(entry["config"], sort_keys=True),
    }
    results = run_dir / "results.json"
    if results.exists():
        extra = read_json(results, SweepDataError, "run results")
        if not isinstance(extra, dict):
            raise SweepDataError(f"{results}: expected a JSON object of results")
        for k, v in extra.items():
            if not isinstance(v, (dict, list)):
                row[f"result.{k}"] = _number(v) if _number(v) is not None else str(v)
    return row, curves


def _columns(rows: list[dict]) -> dict[str, list]:
    """Columns over the union of keys, each of one type (numbers as float where any row has a float)."""
    names: list[str] = []
    for r in rows:
        names.extend(k for k in r if k not in names)
    columns = {}
    for name in names:
        values = [r.get(name) for r in rows]
        if any(isinstance(v, float) for v in values) and all(isinstance(v, (int, float)) or v is None
                                                              for v in values if not isinstance(v, bool)):
            values = [None if v is None else float(v) for v in values]
        elif any(isinstance(v, str) for v in values):
            values = [None if v is None else str(v) for v in values]
        columns[name] = values
    return columns


def write_table(rows: list[dict], base: Path) -> None:
    """``base``.parquet and ``base``.csv, each written atomically."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = pa.table(_columns(rows)) if rows else pa.table({"run": pa.array([], pa.string())})
    for ext, write in (("parquet", pq.write_table), ("csv", pacsv.write_csv)):
        path = base.with_suffix(f".{ext}")
        with atomic_file(path) as f:
            write(table, f)


def collect(sweep_dir: str | Path) -> tuple[list[dict], list[dict]]:
    sweep_dir = Path(sweep_dir)
    manifest = read_manifest(sweep_dir)
    rows, curves, cache = [], [], {}
    for entry in manifest["runs"]:
        row, run_curves = run_row(entry, manifest.get("ranks", 1), cache)
        rows.append(row)
        curves.extend(run_curves)
    write_table(rows, sweep_dir / "results")
    write_table(curves, sweep_dir / "curves")
    return rows, curves


def status_counts(rows: list[dict]) -> str:
    """``4 runs: 2 finished, 2 failed``."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))


def summary(rows: list[dict]) -> str:
    def value(v: Optional[float]) -> str:
        return "–" if v is None or math.isnan(v) else f"{v:.4f}"

    lines = [status_counts(rows)]
    for r in rows:
        lines.append(f"  {r['run']:<40} {r['status']:<12} params {r['params'] / 1e6:8.3f}M  steps "
                     f"{r['steps_done']}/{r['max_steps']}  loss {value(r['loss'])}  eval loss {value(r['eval_loss'])}"
                     + (f"  ({r['error']})" if r["error"] else ""))
    return "\n".join(lines)


def require_metrics(rows: list[dict], sweep_dir: str | Path) -> None:
    """Raise SweepDataError when no run of the sweep logged a single step (nothing to fit or plot)."""
    if any(r["steps_done"] > 0 or r["eval_loss"] is not None for r in rows):
        return
    logs = [f"{r['output_dir']}/train.log" for r in rows if r["status"] == "failed"]
    raise SweepDataError(
        f"no run of {sweep_dir} logged any metrics ({status_counts(rows)}): nothing to fit or plot; "
        + (f"see {logs[0]}" if logs else "train the runs first (biomedgpt sweep --config SWEEP)"))


@one_line_errors(SweepDataError)
def main(argv: list[str] | None = None) -> int:
    cfg = parse_cli(CollectConfig, argv, description=__doc__)
    rows, _ = collect(cfg.sweep_dir)
    print(summary(rows))
    require_metrics(rows, cfg.sweep_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
