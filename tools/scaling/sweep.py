"""Scaling sweeps from one command: expand a grid into run configs, train them, collect, fit, report.

    biomedgpt sweep --config sweeps/demo_sizes                  # a packaged sweep, into ./runs/sweeps/demo_sizes
    biomedgpt sweep --config my_sweep.yaml launcher=slurm sbatch_args='[--partition=gpu]'
    biomedgpt sweep --config sweeps/demo_sizes launcher=plan    # configs + list only
    biomedgpt sweep --config sweeps/demo_sizes overrides.optim.max_steps=10 root=/scratch/sweeps

A sweep is a base run config (a ``RunConfig`` YAML or a packaged recipe's name, or the engine's demo
config) with ``overrides`` applied to every run (``overrides.optim.max_steps=10`` on the command line)
and ``axes``: each axis sets one dotted RunConfig key to each of its values (an axis name is that key,
or its last part where that is unique: ``lr``, ``size``, ``zero_stage``, ``patch_image_size``). The runs
start from the base's settings as its file writes them, so a run's model size supplies every width/depth
field nobody set; a size axis also drops the width/depth the base file writes (``overrides`` of the sweep
still apply). A mapping value sets several keys under the axis key at once: the ``model`` axis with
``{d_model: 64, encoder_layers: 2, ...}`` is a custom width/depth, ``{size: base, encoder_layers: 2}`` a
size with a change. Axes combine as a product (or ``zip``). Every run config is validated before anything
starts.

Paths: ``root``, ``base`` and path settings in ``overrides`` / axis values resolve like every config's
paths, against the sweep file's folder (a packaged sweep and the command line: the current directory);
each generated run config holds absolute paths (its ``output_dir`` is ``<root>/<name>/runs/<run>``), so it
trains into the sweep's folder from any directory, here or as a SLURM array task.

Writes ``<root>/<name>/``: ``sweep.json`` (the manifest), ``configs/<run>.yaml``, ``runs.txt`` (one config
per line: the job-array list of ``launchers/slurm_sweep.sbatch``) and ``runs/<run>/`` (each run's
output_dir). ``local`` trains the runs one after another (``python -m biomedgpt.tools.train``, or
``launchers/local.sh -n RANKS`` for several ranks), then collects (``biomedgpt.tools.scaling.collect``) and fits
(``biomedgpt.tools.scaling.fit``: end-of-run evaluation losses, so keep ``eval.at_end`` on with
``data.eval_streams``); when no run logged any metrics it says so and exits 1 (no empty figure). ``slurm``
submits the unfinished runs as one job array; collect and fit afterwards. Rerunning skips finished runs;
unfinished ones resume from their own checkpoints. Exit status 1 when a run failed.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import re
import subprocess
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from biomedgpt.core.config import (ConfigError, PathStr, deep_merge, field_paths, from_dict, load, parse_cli,
                                     read_settings, resolve_config, resolve_paths, set_dotted, to_dict)
from biomedgpt.core.durable import atomic_write_text
from biomedgpt.engine.run_config import DEMO_CONFIG, RunConfig
from biomedgpt.models.config import SIZE_FIELDS
from biomedgpt.tools.cli import one_line_errors
from biomedgpt.tools.scaling.collect import (STATUS_FILE, SweepDataError, collect, is_finished, require_metrics,
                                             summary)


def axis_key(name: str) -> str:
    """The RunConfig key an axis name stands for: a dotted key (``optim.lr``), a section (``model``: the
    values are mappings of its fields), or the last part of exactly one key (``lr``, ``zero_stage``)."""
    keys = field_paths(RunConfig)
    sections = {name for name, tp in typing.get_type_hints(RunConfig).items() if dataclasses.is_dataclass(tp)}
    if name in keys or name in sections:
        return name
    matches = [k for k in keys if k.rsplit(".", 1)[-1] == name]
    if len(matches) == 1:
        return matches[0]
    hint = f"it could be any of {matches}" if matches else "no RunConfig setting is called that"
    raise ValueError(f"axis {name!r}: {hint}; give its dotted RunConfig key as key=")


@dataclass
class Axis:
    """One swept setting: a RunConfig key (``key``, or the alias of ``name``) and its values."""

    name: str
    values: list[Any]
    key: Optional[str] = None
    labels: Optional[list[str]] = None  # names of the values in run names; default: from the values

    def __post_init__(self) -> None:
        if self.key is None:
            self.key = axis_key(self.name)
        if not self.values:
            raise ValueError(f"axis {self.name!r} has no values")
        if self.labels is None:
            self.labels = [_label(v) for v in self.values]
        if len(self.labels) != len(self.values) or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"axis {self.name!r}: labels {self.labels} must be unique, one per value")


@dataclass
class SweepConfig:
    """A grid of training runs and how to launch them."""

    name: str = "sweep"
    base: Optional[str] = None  # a RunConfig YAML (beside the sweep file) or a packaged recipe; None: the demo config
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted RunConfig key -> value, for every run
    axes: list[Axis] = field(default_factory=list)
    combine: Literal["product", "zip"] = "product"
    root: PathStr = "runs/sweeps"  # the sweep lives in <root>/<name> (absolute in every run config)
    launcher: Literal["local", "slurm", "plan"] = "local"
    ranks: int = 1  # processes per run (local: launchers/local.sh -n RANKS when > 1; SLURM: the script's)
    analyse: bool = True  # local: collect, fit, plot and report after the runs
    stop_on_failure: bool = False  # local: stop the sweep at the first failed run (default: go on)
    slurm_script: str = "launchers/slurm_sweep.sbatch"
    sbatch_args: list[str] = field(default_factory=list)  # e.g. [--partition=gpu, --time=04:00:00]
    max_parallel: int = 0  # SLURM array throttle (``%N``); 0: no limit
    bootstrap: int = 200  # residual-bootstrap resamples of each fit

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.name):
            raise ValueError(f"sweep name {self.name!r}: use letters, digits, '.', '_' and '-' only")
        names = [a.name for a in self.axes]
        if len(set(names)) != len(names):
            raise ValueError(f"axis names must be unique, got {names}")
        if self.combine == "zip" and len({len(a.values) for a in self.axes}) > 1:
            raise ValueError(f"combine: zip needs axes of equal length, got "
                             f"{ {a.name: len(a.values) for a in self.axes} }")
        if self.ranks < 1:
            raise ValueError(f"ranks must be positive, got {self.ranks}")

    @property
    def directory(self) -> Path:
        return Path(self.root).absolute() / self.name


def _label(value: Any) -> str:
    if isinstance(value, dict):
        return "-".join(f"{k}{_label(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "x".join(_label(v) for v in value)
    return re.sub(r"[^A-Za-z0-9.=-]+", "", str(value))


@dataclass
class PlannedRun:
    name: str
    axes: dict[str, str]  # axis name -> value label
    config: RunConfig
    config_path: Path


def sweep_file_folder(argv: list[str] | None) -> Path:
    """Where the sweep file's relative paths resolve: its folder (a packaged sweep, or none: the current one)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config")
    given = parser.parse_known_args(sys.argv[1:] if argv is None else argv)[0].config
    if given is None:
        return Path.cwd()
    path, packaged = resolve_config(given)
    return Path.cwd() if packaged else path.resolve().parent


def _base_settings(cfg: SweepConfig, folder: Path) -> dict:
    """The base run config's settings as its file writes them (paths absolute), checked by loading it: so
    the model's size fills the fields the base, the overrides and the axes leave unset (``ModelSpec``)."""
    path: str | Path = DEMO_CONFIG
    if cfg.base is not None:
        path = folder / cfg.base if (folder / cfg.base).is_file() else cfg.base
    load(RunConfig, path)  # a bad base fails here, naming its file
    return read_settings(RunConfig, path)[1]


def _sets_size(axis: Axis) -> bool:
    return axis.key == "model.size" or (axis.key == "model" and any(isinstance(v, dict) and "size" in v
                                                                     for v in axis.values))


def _with(data: dict, key: str, value: Any, folder: Path) -> dict:
    """``data`` with ``key`` set to ``value`` (a mapping merged), its path settings absolute against ``folder``."""
    update: dict = {}
    set_dotted(update, key, copy.deepcopy(value))
    return deep_merge(data, resolve_paths(RunConfig, update, folder))


def expand(cfg: SweepConfig, folder: Path | None = None) -> list[PlannedRun]:
    """Every run of the grid as a validated RunConfig (errors name the run and the key); relative paths of
    ``base``, ``overrides`` and axis values resolve against ``folder`` (default: the current directory)."""
    folder = Path.cwd() if folder is None else folder
    base = _base_settings(cfg, folder)
    if any(_sets_size(a) for a in cfg.axes):  # the swept size replaces the width/depth the base writes
        base["model"] = {k: v for k, v in (base.get("model") or {}).items() if k not in SIZE_FIELDS}
    for key, value in cfg.overrides.items():
        base = _with(base, key, value, folder)
    indices = [range(len(a.values)) for a in cfg.axes]
    combos = zip(*indices) if cfg.combine == "zip" else itertools.product(*indices)
    runs = []
    for combo in combos:
        data = copy.deepcopy(base)
        labels = {}
        for axis, i in zip(cfg.axes, combo):
            data = _with(data, axis.key, axis.values[i], folder)
            labels[axis.name] = axis.labels[i]
        name = "_".join(f"{axis}-{label}" for axis, label in labels.items()) or "base"
        data["output_dir"] = str(cfg.directory / "runs" / name)
        try:
            run_cfg = from_dict(RunConfig, data)
        except ConfigError as exc:
            raise ConfigError(f"sweep {cfg.name}, run {name}: {exc}") from None
        if run_cfg.optim.max_steps is None:
            raise ConfigError(f"sweep {cfg.name}, run {name}: set optim.max_steps (a sweep run needs a fixed budget)")
        run_cfg.model.build()  # unknown or inconsistent model fields fail here, before any run starts
        runs.append(PlannedRun(name, labels, run_cfg, cfg.directory / "configs" / f"{name}.yaml"))
    if len({r.name for r in runs}) != len(runs):
        raise ConfigError(f"sweep {cfg.name}: two runs got the same name; give the axes distinct labels")
    return runs


def write_plan(cfg: SweepConfig, runs: list[PlannedRun]) -> Path:
    """Run configs, the job-array list and the manifest, each written atomically."""
    directory = cfg.directory
    (directory / "configs").mkdir(parents=True, exist_ok=True)
    for run in runs:
        atomic_write_text(run.config_path, yaml.safe_dump(to_dict(run.config), sort_keys=False))
    atomic_write_text(directory / "runs.txt", "".join(f"{r.config_path}\n" for r in runs))
    manifest = {"name": cfg.name, "ranks": cfg.ranks, "axes": [a.name for a in cfg.axes],
                "sweep": to_dict(cfg),
                "runs": [{"run": r.name, "axes": r.axes, "config_path": str(r.config_path),
                          "output_dir": r.config.output_dir, "config": to_dict(r.config)} for r in runs]}
    atomic_write_text(directory / "sweep.json", json.dumps(manifest, indent=2, default=list))
    return directory


def pending(runs: list[PlannedRun]) -> list[PlannedRun]:
    return [r for r in runs if not is_finished(Path(r.config.output_dir), r.config.optim.max_steps)]


def train_command(cfg: SweepConfig, run: PlannedRun) -> list[str]:
    if cfg.ranks == 1:
        return [sys.executable, "-m", "biomedgpt.tools.train", "--config", str(run.config_path)]
    return ["bash", "launchers/local.sh", "-n", str(cfg.ranks), "--", "--config", str(run.config_path)]


def run_local(cfg: SweepConfig, run: PlannedRun) -> int:
    """Train one run, its output in <output_dir>/train.log, its outcome in <output_dir>/sweep_status.json."""
    out = Path(run.config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = train_command(cfg, run)
    started = time.time()
    status = {"status": "running", "command": command, "started": started}
    atomic_write_text(out / STATUS_FILE, json.dumps(status))
    with open(out / "train.log", "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    status.update(status="exited", returncode=returncode, wall_s=time.time() - started)
    atomic_write_text(out / STATUS_FILE, json.dumps(status))
    return returncode


def submit_slurm(cfg: SweepConfig, todo: list[PlannedRun]) -> str:
    """One job array over the unfinished runs; returns sbatch's output (the job id)."""
    listing = cfg.directory / "pending.txt"
    atomic_write_text(listing, "".join(f"{r.config_path}\n" for r in todo))
    array = f"0-{len(todo) - 1}" + (f"%{cfg.max_parallel}" if cfg.max_parallel else "")
    command = ["sbatch", f"--array={array}", f"--job-name=sweep-{cfg.name}", *cfg.sbatch_args, cfg.slurm_script,
               str(listing)]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout.strip()


@one_line_errors(SweepDataError)
def main(argv: list[str] | None = None) -> int:
    cfg = parse_cli(SweepConfig, argv, description=__doc__)
    try:
        runs = expand(cfg, sweep_file_folder(argv))
    except (ConfigError, ValueError) as exc:  # a bad run config or axis: one line, before anything starts
        print(f"error: {exc}", file=sys.stderr)
        return 1
    directory = write_plan(cfg, runs)
    todo = pending(runs)
    print(f"sweep {cfg.name}: {len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to run "
          f"({directory})", flush=True)
    if cfg.launcher == "plan":
        return 0
    if cfg.launcher == "slurm":
        if todo:
            print(submit_slurm(cfg, todo))
        print(f"when the array is done: biomedgpt collect sweep_dir={directory} && "
              f"biomedgpt fit-scaling sweep_dir={directory}")
        return 0
    failed = []
    for i, run in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {run.name}", flush=True)
        returncode = run_local(cfg, run)
        if returncode != 0:
            failed.append(run.name)
            print(f"  failed with exit status {returncode}: see {Path(run.config.output_dir) / 'train.log'}",
                  flush=True)
            if cfg.stop_on_failure:
                break
    if cfg.analyse:
        from biomedgpt.tools.scaling.fit import FitConfig, print_analysis, run as fit_and_report

        rows, _ = collect(directory)
        print(summary(rows), flush=True)
        require_metrics(rows, directory)
        print_analysis(fit_and_report(FitConfig(sweep_dir=str(directory), bootstrap=cfg.bootstrap)), directory)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
