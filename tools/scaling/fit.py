"""Scaling laws of a collected sweep: power-law fits with uncertainty, the compute-optimal frontier, plots, report.

    python -m biomedgpt.tools.scaling.fit sweep_dir=runs/sweeps/demo-sizes

Reads ``results.parquet`` (one row per run) and ``curves.parquet`` (one row per logged step) written by
``biomedgpt.tools.scaling.collect`` and writes ``fits.json``, ``scaling.png`` / ``scaling.svg`` and ``report.md`` there.

Every fit is ``L(x) = E + A * x^-alpha`` (an irreducible loss E plus a power law), by least squares on
relative residuals (``scipy.optimize.curve_fit``, so each point counts by its relative error). Standard
errors come from the fit's covariance (A through the delta method); 95 % intervals from a residual
bootstrap. Fits:
- loss vs parameters: the final loss of each finished run (the most-trained run per model size);
- loss vs tokens: the training curve of the largest finished model;
- loss vs compute: the compute-optimal frontier, the lower envelope of every run's curve (Chinchilla's
  approach 1), and the model size on the frontier as ``N_opt ∝ C^a`` where at least two sizes lie on it.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from biomedgpt.engine.config import parse_cli
from biomedgpt.engine.durable import atomic_write_text

PARAMETERS = ("E", "A", "alpha")


@dataclass
class FitConfig:
    """Fit, plot and report a collected sweep."""

    sweep_dir: str = "runs/sweeps/default"
    metric: str = "loss"  # "loss" (training windows) or "eval_loss" (evaluations) for the final points
    bootstrap: int = 200  # residual-bootstrap resamples for the 95 % intervals (0: covariance only)
    seed: int = 0


@dataclass
class PowerLawFit:
    """``L = E + A * x^-alpha`` with standard errors and bootstrap 95 % intervals (NaN where undetermined)."""

    E: float
    A: float
    alpha: float
    stderr: dict[str, float]
    ci95: dict[str, tuple[float, float]]
    n_points: int
    rms_rel_residual: float

    def predict(self, x) -> np.ndarray:
        return self.E + self.A * np.asarray(x, dtype=float) ** -self.alpha

    def describe(self) -> str:
        def one(name: str) -> str:
            value, err = getattr(self, name), self.stderr[name]
            lo, hi = self.ci95[name]
            text = f"{value:.4g}"
            if math.isfinite(err):
                text += f" ± {err:.2g}"
            if math.isfinite(lo):
                text += f" (95 % {lo:.4g} .. {hi:.4g})"
            return f"{name} = {text}"

        return ", ".join(one(name) for name in PARAMETERS)


class FitError(ValueError):
    """Too few or unusable points for a fit."""


def _model(log_x: np.ndarray, e: float, log_a: float, alpha: float) -> np.ndarray:
    return e + np.exp(log_a - alpha * log_x)


def _fit_once(log_x: np.ndarray, y: np.ndarray, p0: tuple[float, float, float]):
    from scipy.optimize import OptimizeWarning, curve_fit

    bounds = ([0.0, -np.inf, 1e-4], [float(y.min()), np.inf, 10.0])
    with warnings.catch_warnings():  # an undetermined covariance (3 points) is reported as NaN errors instead
        warnings.simplefilter("ignore", OptimizeWarning)
        return curve_fit(_model, log_x, y, p0=p0, sigma=y, bounds=bounds, maxfev=20000)


def _initial_guess(log_x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    e0 = 0.5 * float(y.min())
    slope, intercept = np.polyfit(log_x, np.log(y - e0), 1)
    return e0, float(intercept), float(min(max(-slope, 1e-3), 5.0))


def fit_power_law(x, y, bootstrap: int = 200, seed: int = 0) -> PowerLawFit:
    """Fit ``y = E + A x^-alpha``; x is centred on its geometric mean so the fit is well conditioned."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    x, y = x[keep], y[keep]
    if len(np.unique(x)) < 3:
        raise FitError(f"a power law with an irreducible term needs >= 3 distinct x values, got {len(np.unique(x))}")
    log_x0 = float(np.mean(np.log(x)))
    log_x = np.log(x) - log_x0
    p0 = _initial_guess(log_x, y)
    popt, pcov = _fit_once(log_x, y, p0)
    e, log_a, alpha = (float(v) for v in popt)
    a = math.exp(log_a + alpha * log_x0)  # back to uncentred x: A x^-alpha = exp(log_a) (x / x0)^-alpha
    dof = len(x) - 3
    stderr = dict.fromkeys(PARAMETERS, math.nan)
    if dof > 0 and np.all(np.isfinite(pcov)):
        stderr["E"], stderr["alpha"] = math.sqrt(pcov[0, 0]), math.sqrt(pcov[2, 2])
        var_log_a = pcov[1, 1] + log_x0 ** 2 * pcov[2, 2] + 2 * log_x0 * pcov[1, 2]
        stderr["A"] = a * math.sqrt(max(var_log_a, 0.0))
    fitted = _model(log_x, *popt)
    rel = (y - fitted) / fitted
    ci = dict.fromkeys(PARAMETERS, (math.nan, math.nan))
    if bootstrap > 0 and dof > 0:
        rng = np.random.default_rng(seed)
        samples = []
        for _ in range(bootstrap):
            y_star = fitted * (1.0 + rng.choice(rel, size=len(rel), replace=True))
            try:
                p, _ = _fit_once(log_x, y_star, tuple(popt))
            except (RuntimeError, ValueError):
                continue  # a resample the optimiser cannot fit is left out of the interval
            samples.append((p[0], math.exp(p[1] + p[2] * log_x0), p[2]))
        if len(samples) >= bootstrap // 2:
            arr = np.array(samples)
            for i, name in enumerate(PARAMETERS):
                lo, hi = np.percentile(arr[:, i], [2.5, 97.5])
                ci[name] = (float(lo), float(hi))
    return PowerLawFit(E=e, A=a, alpha=alpha, stderr=stderr, ci95=ci, n_points=len(x),
                       rms_rel_residual=float(np.sqrt(np.mean(rel ** 2))))


def compute_frontier(points: list[dict]) -> list[dict]:
    """The lower envelope of (flops, loss) points: each kept point beats every cheaper one."""
    best = math.inf
    out = []
    for p in sorted(points, key=lambda p: (p["flops"], p["loss"])):
        if p["loss"] < best:
            best = p["loss"]
            out.append(p)
    return out


def fit_optimal_size(frontier: list[dict], samples: int = 50) -> Optional[dict]:
    """``N_opt = k * C^a``: the frontier's model size read at log-uniform compute, fitted in log space.

    The frontier is a staircase (each size leads over a range of compute); reading it on a uniform
    log-C grid weighs every decade alike, however densely each run happened to be logged.
    """
    if len({p["params"] for p in frontier}) < 2:
        return None
    flops = np.array([p["flops"] for p in frontier], dtype=float)
    params = np.array([p["params"] for p in frontier], dtype=float)
    grid = np.geomspace(flops.min(), flops.max(), samples)
    leader = params[np.searchsorted(flops, grid, side="right") - 1]  # the last frontier point at or below C
    a, log_k = np.polyfit(np.log(grid), np.log(leader), 1)
    return {"a": float(a), "k": float(math.exp(log_k)), "n_points": len(frontier)}


def _read_table(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `python -m biomedgpt.tools.scaling.collect sweep_dir={path.parent}` first")
    return pq.read_table(path).to_pylist()


@dataclass
class Analysis:
    runs: list[dict]
    curves: list[dict]
    metric: str
    fits: dict[str, PowerLawFit] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)  # fit name -> why it was not made
    frontier: list[dict] = field(default_factory=list)
    optimal_size: Optional[dict] = None

    @property
    def finished(self) -> list[dict]:
        return [r for r in self.runs if r["status"] == "finished" and _finite(r.get(self.metric))]

    def final_points(self) -> list[dict]:
        """The most-trained finished run of each model size."""
        best: dict[int, dict] = {}
        for r in self.finished:
            if r["params"] not in best or (r["tokens"] or 0) > (best[r["params"]]["tokens"] or 0):
                best[r["params"]] = r
        return sorted(best.values(), key=lambda r: r["params"])

    def curve(self, run: str, x: str) -> list[dict]:
        """A run's logged training points that have a loss and the x quantity ("tokens" or "flops")."""
        return [c for c in self.curves if c["run"] == run and _finite(c.get("loss")) and c.get(x)]

    def largest_curve(self) -> tuple[Optional[str], list[dict]]:
        points = self.final_points()
        if not points:
            return None, []
        run = points[-1]["run"]
        return run, self.curve(run, "tokens")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def analyse(runs: list[dict], curves: list[dict], metric: str = "loss", bootstrap: int = 200,
            seed: int = 0) -> Analysis:
    result = Analysis(runs=runs, curves=curves, metric=metric)

    def attempt(name: str, x, y) -> None:
        try:
            result.fits[name] = fit_power_law(x, y, bootstrap, seed)
        except (FitError, RuntimeError, ValueError) as exc:  # RuntimeError: curve_fit did not converge
            result.failures[name] = str(exc)

    finals = result.final_points()
    attempt("params", [r["params"] for r in finals], [r[metric] for r in finals])
    _, curve = result.largest_curve()
    attempt("tokens", [c["tokens"] for c in curve], [c["loss"] for c in curve])
    pool = [{**c, "params": r["params"]} for r in result.finished for c in result.curve(r["run"], "flops")]
    result.frontier = compute_frontier(pool)
    attempt("compute", [p["flops"] for p in result.frontier], [p["loss"] for p in result.frontier])
    result.optimal_size = fit_optimal_size(result.frontier) if result.frontier else None
    return result


def plot(analysis: Analysis, out_base: Path) -> list[Path]:
    """One figure, three log-log panels (loss vs parameters, tokens, compute), as PNG and SVG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    colors = plt.get_cmap("viridis")
    finals = analysis.final_points()
    sizes = sorted({r["params"] for r in analysis.finished})
    color_of = {p: colors(i / max(len(sizes) - 1, 1)) for i, p in enumerate(sizes)}

    def fitted_line(ax, name: str, xs: np.ndarray, label: str) -> None:
        fit = analysis.fits.get(name)
        if fit is None:
            ax.text(0.02, 0.02, f"no fit: {analysis.failures.get(name, '')}"[:90], transform=ax.transAxes,
                    fontsize=7, color="gray")
            return
        grid = np.geomspace(xs.min() / 1.5, xs.max() * 1.5, 200)
        ax.plot(grid, fit.predict(grid), "k--", lw=1.5,
                label=f"fit: {label} = {fit.E:.3g} + {fit.A:.3g}·x^-{fit.alpha:.3f}")

    ax = axes[0]
    for r in finals:
        ax.scatter(r["params"], r[analysis.metric], color=color_of[r["params"]], s=50, zorder=3,
                   label=f"{r['run']} ({r['params'] / 1e6:.2f}M)")
    unfinished = [r for r in analysis.runs if r["status"] != "finished" and _finite(r.get("loss"))
                  and r.get("params")]
    if unfinished:
        ax.scatter([r["params"] for r in unfinished], [r["loss"] for r in unfinished], marker="x", color="red",
                   label=f"not finished ({len(unfinished)})", zorder=3)
    if finals:
        fitted_line(ax, "params", np.array([r["params"] for r in finals], dtype=float), "L(N)")
    ax.set_xlabel("parameters N")
    ax.set_ylabel(f"final {analysis.metric.replace('_', ' ')}")
    ax.set_title("loss vs model size")

    for ax, x, style in ((axes[1], "tokens", dict(marker="o", ms=3)), (axes[2], "flops", dict(alpha=0.6))):
        for run in analysis.finished:
            pts = analysis.curve(run["run"], x)
            if pts:
                ax.plot([c[x] for c in pts], [c["loss"] for c in pts], lw=1, color=color_of[run["params"]],
                        label=run["run"] if x == "tokens" else None, **style)
    ax = axes[1]
    largest, curve = analysis.largest_curve()
    if curve:
        fitted_line(ax, "tokens", np.array([c["tokens"] for c in curve], dtype=float), f"L(D), {largest}")
    ax.set_xlabel("training tokens D")
    ax.set_ylabel("training loss")
    ax.set_title("loss vs data")

    ax = axes[2]
    if analysis.frontier:
        ax.scatter([p["flops"] for p in analysis.frontier], [p["loss"] for p in analysis.frontier], color="crimson",
                   s=25, zorder=3, label="compute-optimal frontier")
        fitted_line(ax, "compute", np.array([p["flops"] for p in analysis.frontier], dtype=float), "L(C)")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("training loss")
    ax.set_title("loss vs compute (curves coloured by size)")

    plain = FuncFormatter(lambda v, _: f"{v:.3g}")  # a loss range of a few % needs plain tick labels
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    paths = []
    for ext in ("png", "svg"):
        path = out_base.with_suffix(f".{ext}")
        tmp = path.with_name(f".{path.name}.tmp")
        fig.savefig(tmp, format=ext, dpi=120)
        os.replace(tmp, path)
        paths.append(path)
    plt.close(fig)
    return paths


REPORT_COLUMNS = ("run", "status", "params", "steps_done", "max_steps", "tokens", "flops", "loss", "eval_loss",
                  "wall_s", "step_time_s", "memory_gb")


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and abs(value) >= 10 ** 5:
        return f"{value:.3g}"
    return str(value).replace("|", "\\|")


def report_markdown(analysis: Analysis, sweep_name: str, figure: str) -> str:
    axis_columns = sorted({k for r in analysis.runs for k in r if k.startswith("axis.")})
    columns = list(REPORT_COLUMNS[:2]) + axis_columns + list(REPORT_COLUMNS[2:])
    counts: dict[str, int] = {}
    for r in analysis.runs:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines = [f"# Scaling sweep `{sweep_name}`", "",
             f"{len(analysis.runs)} runs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ". "
             f"Final points use `{analysis.metric}`; runs that are not finished are listed and left out of fits.",
             "", "## Runs", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in analysis.runs:
        lines.append("| " + " | ".join(_cell(r.get(c)) for c in columns) + " |")
    problems = [r for r in analysis.runs if r["status"] != "finished"]
    if problems:
        lines += ["", "Not finished:", ""]
        lines += [f"- `{r['run']}`: {r['status']}" + (f" — {r['error']}" if r.get("error") else "") for r in problems]
    lines += ["", "## Fits: L = E + A·x^-alpha", "",
              "Standard errors from the fit covariance; 95 % intervals from a residual bootstrap.", ""]
    titles = {"params": "loss vs parameters N", "tokens": "loss vs training tokens D (largest model's curve)",
              "compute": "loss vs compute C (compute-optimal frontier)"}
    for name, title in titles.items():
        fit = analysis.fits.get(name)
        if fit is not None:
            lines.append(f"- **{title}** ({fit.n_points} points, rms relative residual "
                         f"{fit.rms_rel_residual:.2%}): {fit.describe()}")
        else:
            lines.append(f"- **{title}**: not fitted — {analysis.failures.get(name, 'no points')}")
    if analysis.optimal_size:
        o = analysis.optimal_size
        lines.append(f"- **compute-optimal size**: N_opt = {o['k']:.3g} · C^{o['a']:.3f} ({o['n_points']} frontier points)")
    else:
        lines.append("- **compute-optimal size**: not fitted — fewer than two model sizes on the frontier")
    if analysis.frontier:
        lines += ["", "Frontier (lowest loss reached at each compute):", "", "| run | step | FLOPs | loss |",
                  "|---|---|---|---|"]
        lines += [f"| {p['run']} | {p['step']} | {p['flops']:.3g} | {p['loss']:.4g} |" for p in analysis.frontier]
    lines += ["", "## Figure", "", f"![scaling]({figure})", ""]
    return "\n".join(lines)


def run(cfg: FitConfig) -> Analysis:
    sweep_dir = Path(cfg.sweep_dir)
    analysis = analyse(_read_table(sweep_dir / "results.parquet"), _read_table(sweep_dir / "curves.parquet"),
                       cfg.metric, cfg.bootstrap, cfg.seed)
    paths = plot(analysis, sweep_dir / "scaling")
    fits = {name: asdict(fit) for name, fit in analysis.fits.items()}
    atomic_write_text(sweep_dir / "fits.json", json.dumps(
        {"metric": cfg.metric, "fits": fits, "not_fitted": analysis.failures, "frontier": analysis.frontier,
         "optimal_size": analysis.optimal_size}, indent=2, default=str))
    atomic_write_text(sweep_dir / "report.md", report_markdown(analysis, sweep_dir.name, paths[0].name))
    return analysis


def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(FitConfig, argv, description=__doc__)
    analysis = run(cfg)
    for name, fit in analysis.fits.items():
        print(f"L vs {name}: {fit.describe()}")
    for name, why in analysis.failures.items():
        print(f"L vs {name}: not fitted ({why})")
    print(f"report: {Path(cfg.sweep_dir) / 'report.md'}")


if __name__ == "__main__":
    main()
