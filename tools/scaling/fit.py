"""Scaling laws of a collected sweep: power-law fits with bootstrap intervals, the compute-optimal frontier,
a figure and a report.

    biomedgpt fit-scaling sweep_dir=runs/sweeps/demo_sizes
    biomedgpt fit-scaling sweep_dir=runs/sweeps/demo_sizes metric=loss    # no evaluation: last training window

Reads ``results.parquet`` (one row per run) and ``curves.parquet`` (one row per logged step) written by
``biomedgpt collect`` and writes ``fits.json``, ``scaling.png`` / ``scaling.svg`` and ``report.md`` there.

Every fit is ``L(x) = E + A * x^-alpha`` (an irreducible loss E plus a power law) on one point per finished
run: its loss at the end of the run (``metric``: the evaluation at the last step by default; the last
training window is a few noisy steps). Least squares on relative residuals (``scipy.optimize.curve_fit``).
Three free parameters: a fit needs at least four distinct x values; with fewer it is not made and the
report says "under-determined". Standard errors come from the fit's covariance, 95 % intervals and the
figure's bands from a residual bootstrap; an interval wider than its estimate is reported as too wide to use.
- loss vs parameters N: the most-trained finished run of each model size (the best of its runs);
- loss vs tokens D: the finished runs of one model size at different token budgets (an ``optim.max_steps``
  axis; the size with the most budgets);
- loss vs compute C: the compute-optimal frontier, the lower envelope of the runs' end points, and the model
  size on it as ``N_opt ∝ C^a`` where at least two sizes lie on it.
Training-loss curves are drawn for context and never fitted: a point in the middle of a run with a decaying
learning rate is not a run trained to that budget. When no finished run has the metric, the command says
so in one line and exits 1 without drawing anything.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np

from biomedgpt.core.config import parse_cli
from biomedgpt.core.durable import atomic_file, atomic_write_text
from biomedgpt.tools.cli import one_line_errors
from biomedgpt.tools.scaling.collect import SweepDataError, require_metrics, status_counts

PARAMETERS = ("E", "A", "alpha")
MIN_POINTS = len(PARAMETERS) + 1  # distinct x values a fit needs to leave one degree of freedom


@dataclass
class FitConfig:
    """Fit, plot and report a collected sweep."""

    sweep_dir: str = "runs/sweeps/default"
    # eval_loss: the evaluation at the end of each run (eval.at_end); loss: the run's last training window
    metric: Literal["eval_loss", "loss"] = "eval_loss"
    bootstrap: int = 200  # residual-bootstrap resamples for the 95 % intervals and bands (0: covariance only)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.bootstrap < 0:
            raise ValueError(f"bootstrap must be >= 0, got {self.bootstrap}")


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
    samples: Optional[np.ndarray] = field(default=None, repr=False)  # bootstrap (E, A, alpha) rows, for bands

    def predict(self, x) -> np.ndarray:
        return self.E + self.A * np.asarray(x, dtype=float) ** -self.alpha

    def band(self, x) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """The 95 % band of the bootstrap fits' predictions at ``x`` (None without a bootstrap)."""
        if self.samples is None or not len(self.samples):
            return None
        x = np.asarray(x, dtype=float)
        s = self.samples
        with np.errstate(over="ignore", invalid="ignore"):
            predictions = s[:, :1] + s[:, 1:2] * x[None, :] ** -s[:, 2:3]
        lo, hi = np.nanpercentile(predictions, [2.5, 97.5], axis=0)
        return lo, hi

    def interval(self, name: str) -> tuple[float, float]:
        """The 95 % interval: the bootstrap's, else ±1.96 standard errors, else (nan, nan)."""
        lo, hi = self.ci95[name]
        if math.isfinite(lo) and math.isfinite(hi):
            return lo, hi
        value, err = getattr(self, name), self.stderr[name]
        return (value - 1.96 * err, value + 1.96 * err) if math.isfinite(err) else (math.nan, math.nan)

    @property
    def too_wide(self) -> list[str]:
        """Parameters whose 95 % interval is unknown or wider than the estimate itself: not usable numbers."""
        out = []
        for name in PARAMETERS:
            lo, hi = self.interval(name)
            if not (math.isfinite(lo) and math.isfinite(hi)) or hi - lo > abs(getattr(self, name)):
                out.append(name)
        return out

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

    def warning(self) -> Optional[str]:
        wide = self.too_wide
        if not wide:
            return None
        return (f"intervals too wide to use for {', '.join(wide)} (95 % interval wider than the estimate): the "
                f"points do not pin {'it' if len(wide) == 1 else 'them'} down; runs spanning more of x, or more "
                f"of them, do")

    def to_json(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "samples"}
        out["too_wide"] = self.too_wide
        return out


class FitError(ValueError):
    """Too few or unusable points for a fit."""


def _model(log_x: np.ndarray, e: float, log_a: float, alpha: float) -> np.ndarray:
    return e + np.exp(log_a - alpha * log_x)


def _fit_once(log_x: np.ndarray, y: np.ndarray, p0: tuple[float, float, float]):
    from scipy.optimize import OptimizeWarning, curve_fit

    bounds = ([0.0, -np.inf, 1e-4], [float(y.min()), np.inf, 10.0])
    with warnings.catch_warnings():  # an undetermined covariance is reported as NaN errors instead
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
    distinct = len(np.unique(x))
    if distinct < MIN_POINTS:
        raise FitError(f"under-determined: {distinct} distinct x value(s) for {len(PARAMETERS)} free parameters "
                       f"(E, A, alpha); a fit needs at least {MIN_POINTS}")
    log_x0 = float(np.mean(np.log(x)))
    log_x = np.log(x) - log_x0
    p0 = _initial_guess(log_x, y)
    popt, pcov = _fit_once(log_x, y, p0)
    e, log_a, alpha = (float(v) for v in popt)
    a = math.exp(log_a + alpha * log_x0)  # back to uncentred x: A x^-alpha = exp(log_a) (x / x0)^-alpha
    stderr = dict.fromkeys(PARAMETERS, math.nan)
    if np.all(np.isfinite(pcov)):
        stderr["E"], stderr["alpha"] = math.sqrt(pcov[0, 0]), math.sqrt(pcov[2, 2])
        var_log_a = pcov[1, 1] + log_x0 ** 2 * pcov[2, 2] + 2 * log_x0 * pcov[1, 2]
        stderr["A"] = a * math.sqrt(max(var_log_a, 0.0))
    fitted = _model(log_x, *popt)
    rel = (y - fitted) / fitted
    ci = dict.fromkeys(PARAMETERS, (math.nan, math.nan))
    samples = None
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        rows = []
        for _ in range(bootstrap):
            y_star = fitted * (1.0 + rng.choice(rel, size=len(rel), replace=True))
            try:
                p, _ = _fit_once(log_x, y_star, tuple(popt))
            except (RuntimeError, ValueError):
                continue  # a resample the optimiser cannot fit is left out of the interval
            rows.append((p[0], math.exp(p[1] + p[2] * log_x0), p[2]))
        if len(rows) >= bootstrap // 2:
            samples = np.array(rows)
            for i, name in enumerate(PARAMETERS):
                lo, hi = np.percentile(samples[:, i], [2.5, 97.5])
                ci[name] = (float(lo), float(hi))
    return PowerLawFit(E=e, A=a, alpha=alpha, stderr=stderr, ci95=ci, n_points=len(x),
                       rms_rel_residual=float(np.sqrt(np.mean(rel ** 2))), samples=samples)


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
    log-C grid weighs every decade alike, however densely the runs happen to lie.
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
        raise SweepDataError(f"{path} not found: run `biomedgpt collect sweep_dir={path.parent}` first")
    return pq.read_table(path).to_pylist()


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


METRIC_TEXT = {"eval_loss": "evaluation loss at the end of the run", "loss": "last training-window loss"}
TOKEN_HINT = "runs of one model size at several token budgets (an optim.max_steps axis) give this fit"


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
        """Finished runs with the metric, as end points: run, params, tokens, flops, step and loss (the metric)."""
        return [{"run": r["run"], "params": r["params"], "tokens": r["tokens"], "flops": r["flops"],
                 "step": r["steps_done"], "loss": r[self.metric]}
                for r in self.runs if r["status"] == "finished" and _finite(r.get(self.metric))]

    def final_points(self) -> list[dict]:
        """Per model size, its most-trained finished run (the lowest loss among equally trained ones)."""
        best: dict[int, dict] = {}
        for p in self.finished:
            key = (p["tokens"] or p["flops"], -p["loss"])
            held = best.get(p["params"])
            if held is None or key > (held["tokens"] or held["flops"], -held["loss"]):
                best[p["params"]] = p
        return sorted(best.values(), key=lambda p: p["params"])

    def token_points(self) -> list[dict]:
        """The finished runs of the model size with the most distinct token budgets (ties: the largest size)."""
        by_size: dict[int, list[dict]] = {}
        for p in self.finished:
            if _finite(p["tokens"]) and p["tokens"] > 0:
                by_size.setdefault(p["params"], []).append(p)
        if not by_size:
            return []
        size = max(by_size, key=lambda n: (len({p["tokens"] for p in by_size[n]}), n))
        return sorted(by_size[size], key=lambda p: p["tokens"])

    def training_curve(self, run: str) -> list[dict]:
        """A run's logged training windows that have a loss and a token count (drawn, never fitted)."""
        return [c for c in self.curves if c["run"] == run and _finite(c.get("loss")) and c.get("tokens")]


def analyse(runs: list[dict], curves: list[dict], metric: str = "eval_loss", bootstrap: int = 200,
            seed: int = 0) -> Analysis:
    result = Analysis(runs=runs, curves=curves, metric=metric)

    def attempt(name: str, points: list[dict], x: str, hint: str = "") -> None:
        try:
            result.fits[name] = fit_power_law([p[x] for p in points], [p["loss"] for p in points], bootstrap, seed)
        except FitError as exc:
            result.failures[name] = f"{exc}{'; ' + hint if hint else ''}"
        except (RuntimeError, ValueError) as exc:  # RuntimeError: curve_fit did not converge
            result.failures[name] = f"the fit did not converge ({exc})"

    attempt("params", result.final_points(), "params")
    attempt("tokens", result.token_points(), "tokens", TOKEN_HINT)
    result.frontier = compute_frontier(result.finished)
    attempt("compute", result.frontier, "flops")
    result.optimal_size = fit_optimal_size(result.frontier) if result.frontier else None
    return result


def _si(value: float, _=None) -> str:
    """Tick label in SI steps: 2M, 500k."""
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= div:
            return f"{value / div:.3g}{suffix}"
    return f"{value:.3g}"


def _power_of_ten(value: float, _=None) -> str:
    """Tick label as m×10^e (FLOPs)."""
    mantissa, exponent = f"{value:.1e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    power = f"10^{{{int(exponent)}}}"
    return f"${power}$" if mantissa == "1" else f"${mantissa}\\times{power}$"


def _label_log_axis(axis, values: list[float], formatter) -> None:
    """Labelled ticks on a log axis however narrow the range: decades, 1-2-5 steps, integer steps below a
    decade, evenly spaced values below half a decade."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    values = [v for v in values if v > 0]
    decades = math.log10(max(values) / min(values)) if values else 3.0
    if decades < 0.5:
        axis.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 5, 10]))
    else:
        subs = (1, 2, 3, 4, 5, 6, 8) if decades < 1 else (1, 2, 5) if decades < 3 else (1,)
        axis.set_major_locator(LogLocator(base=10, subs=subs, numticks=30))
    axis.set_major_formatter(FuncFormatter(formatter))
    axis.set_minor_locator(LogLocator(base=10, subs=tuple(range(1, 10)), numticks=30))
    axis.set_minor_formatter(NullFormatter())


def plot(analysis: Analysis, out_base: Path) -> list[Path]:
    """One figure, three log-log panels (loss vs parameters, tokens, compute), as PNG and SVG.

    Points are end-of-run losses coloured by model size (one legend, right of the panels), each fit a dashed
    line with its bootstrap 95 % band; every panel's own legend sits below it, off the data.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullLocator

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.6))
    finished = analysis.finished
    sizes = sorted({p["params"] for p in finished})
    colors = plt.get_cmap("viridis")
    color_of = {n: colors(0.9 * i / max(len(sizes) - 1, 1)) for i, n in enumerate(sizes)}
    y_name = "end-of-run eval loss" if analysis.metric == "eval_loss" else "final training loss"

    def points(ax, pts: list[dict], x: str, **style) -> None:
        ax.scatter([p[x] for p in pts], [p["loss"] for p in pts], c=[color_of[p["params"]] for p in pts],
                   s=55, edgecolors="black", linewidths=0.6, zorder=3, **style)

    def fitted(ax, name: str, xs: list[float], symbol: str, which: str = "") -> list[float]:
        """The fit's line and band over the points' range; returns the line's values (for the y range)."""
        fit = analysis.fits.get(name)
        if fit is None:
            why = analysis.failures.get(name, "no points").split(" for ")[0].split(";")[0]
            ax.set_title(f"{ax.get_title()}\nnot fitted: {why[:60]} (see report.md)", fontsize=10)
            return []
        grid = np.geomspace(min(xs) / 1.2, max(xs) * 1.2, 200)
        band = fit.band(grid)
        if band is not None:
            ax.fill_between(grid, *band, color="gray", alpha=0.25, lw=0, label="95 % bootstrap band")
        line = fit.predict(grid)
        label = f"fit {symbol}{which}: {fit.E:.3g} + {fit.A:.3g}·{symbol[2]}^-{fit.alpha:.3g}"
        if fit.too_wide:
            label += f"\n(intervals too wide: {', '.join(fit.too_wide)})"
        ax.plot(grid, line, "k--", lw=1.4, label=label)
        return list(line)

    ys: list[list[float]] = [[], [], []]
    ax = axes[0]
    ax.set_title("loss vs model size")
    finals = analysis.final_points()
    points(ax, finals, "params")
    unfinished = [r for r in analysis.runs if r["status"] != "finished" and _finite(r.get(analysis.metric))]
    if unfinished:
        ax.scatter([r["params"] for r in unfinished], [r[analysis.metric] for r in unfinished], marker="x",
                   color="red", zorder=3, label=f"not finished ({len(unfinished)}), not fitted")
        ys[0] += [r[analysis.metric] for r in unfinished]
    ys[0] += [p["loss"] for p in finals] + fitted(ax, "params", [p["params"] for p in finals], "L(N)")
    ax.set_xlabel("parameters N")

    ax = axes[1]
    ax.set_title("loss vs data")
    for i, p in enumerate(finished):
        curve = analysis.training_curve(p["run"])
        ax.plot([c["tokens"] for c in curve], [c["loss"] for c in curve], lw=1, alpha=0.4,
                color=color_of[p["params"]], label="training-loss curves (context, not fitted)" if i == 0 else None)
        ys[1] += [c["loss"] for c in curve]
    with_tokens = [p for p in finished if _finite(p["tokens"])]
    points(ax, with_tokens, "tokens")
    token_points = analysis.token_points()
    ys[1] += [p["loss"] for p in with_tokens] + fitted(ax, "tokens", [p["tokens"] for p in token_points], "L(D)",
                                                       f" on the N = {_si(token_points[0]['params'])} runs"
                                                       if token_points else "")
    ax.set_xlabel("training tokens D")

    ax = axes[2]
    ax.set_title("loss vs compute")
    points(ax, finished, "flops")
    if analysis.frontier:
        ax.scatter([p["flops"] for p in analysis.frontier], [p["loss"] for p in analysis.frontier], s=150,
                   facecolors="none", edgecolors="crimson", linewidths=1.5, zorder=4, label="compute-optimal frontier")
    ys[2] += [p["loss"] for p in finished] + fitted(ax, "compute", [p["flops"] for p in analysis.frontier], "L(C)")
    ax.set_xlabel("training compute C (FLOPs)")

    x_values = ([p["params"] for p in finished] + [r["params"] for r in unfinished],
                [p["tokens"] for p in with_tokens], [p["flops"] for p in finished])
    for ax, y, xs, formatter in zip(axes, ys, x_values, (_si, _si, _power_of_ten)):
        ax.set_xscale("log")
        ax.set_yscale("log")
        if xs:
            ax.set_xlim(min(xs) / 1.3, max(xs) * 1.3)
        _label_log_axis(ax.xaxis, xs, formatter)
        y = [v for v in y if math.isfinite(v) and v > 0]
        if y:  # the points and fitted lines set the range; a wide band is clipped, not allowed to flatten them
            span = max(y) / min(y)
            ax.set_ylim(min(y) / span ** 0.1 / 1.02, max(y) * span ** 0.1 * 1.02)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 5, 10]))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.4g}"))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.set_ylabel(y_name)
        ax.grid(True, which="major", alpha=0.35)
        ax.grid(True, which="minor", axis="x", alpha=0.12)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    handles = [Line2D([], [], marker="o", ls="", markerfacecolor=color_of[n], markeredgecolor="black",
                      markersize=8, label=f"N = {_si(n)}") for n in sizes]
    fig.legend(handles=handles, title="model size", loc="center left", bbox_to_anchor=(1.0, 0.55), fontsize=9)
    fig.tight_layout()
    paths = []
    for ext in ("png", "svg"):
        path = out_base.with_suffix(f".{ext}")
        with atomic_file(path) as f:
            fig.savefig(f, format=ext, dpi=120, bbox_inches="tight")
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


FIT_TITLES = {"params": "loss vs parameters N (each size's most-trained run)",
              "tokens": "loss vs training tokens D (runs of one size)",
              "compute": "loss vs compute C (compute-optimal frontier)"}


def report_markdown(analysis: Analysis, sweep_name: str, figure: str, bootstrap: int) -> str:
    axis_columns = sorted({k for r in analysis.runs for k in r if k.startswith("axis.")})
    columns = list(REPORT_COLUMNS[:2]) + axis_columns + list(REPORT_COLUMNS[2:])
    lines = [f"# Scaling sweep `{sweep_name}`", "",
             f"{status_counts(analysis.runs)}. Fits use `{analysis.metric}`, the {METRIC_TEXT[analysis.metric]}: "
             "one point per finished run; runs that are not finished are listed and left out.",
             "", "## Runs", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in analysis.runs:
        lines.append("| " + " | ".join(_cell(r.get(c)) for c in columns) + " |")
    problems = [r for r in analysis.runs if r["status"] != "finished"]
    if problems:
        lines += ["", "Not finished:", ""]
        lines += [f"- `{r['run']}`: {r['status']}" + (f" — {r['error']}" if r.get("error") else "") for r in problems]
    lines += ["", "## Fits: L = E + A·x^-alpha", "",
              f"Three free parameters: a fit needs at least {MIN_POINTS} distinct x values, with fewer it is "
              "under-determined and not made. Standard errors from the fit covariance; 95 % intervals (and the "
              f"figure's bands) from a residual bootstrap ({bootstrap} resamples); an interval wider than its "
              "estimate is too wide to use.", ""]
    for name, title in FIT_TITLES.items():
        fit = analysis.fits.get(name)
        if fit is not None:
            lines.append(f"- **{title}** ({fit.n_points} points, rms relative residual "
                         f"{fit.rms_rel_residual:.2%}): {fit.describe()}")
            if fit.warning():
                lines.append(f"  - **{fit.warning()}**")
        else:
            lines.append(f"- **{title}**: not fitted — {analysis.failures.get(name, 'no points')}")
    if analysis.optimal_size:
        o = analysis.optimal_size
        lines.append(f"- **compute-optimal size**: N_opt = {o['k']:.3g} · C^{o['a']:.3f} ({o['n_points']} frontier points)")
    else:
        lines.append("- **compute-optimal size**: not fitted — fewer than two model sizes on the frontier")
    if analysis.frontier:
        lines += ["", f"Frontier (lowest {analysis.metric} reached at each compute):", "",
                  "| run | step | FLOPs | loss |", "|---|---|---|---|"]
        lines += [f"| {p['run']} | {p['step']} | {p['flops']:.3g} | {p['loss']:.4g} |" for p in analysis.frontier]
    lines += ["", "## Figure", "", f"![scaling]({figure})", ""]
    return "\n".join(lines)


def run(cfg: FitConfig) -> Analysis:
    """Fit, plot and report; SweepDataError (and nothing drawn) when no finished run has the metric."""
    sweep_dir = Path(cfg.sweep_dir)
    runs = _read_table(sweep_dir / "results.parquet")
    require_metrics(runs, sweep_dir)
    analysis = analyse(runs, _read_table(sweep_dir / "curves.parquet"), cfg.metric, cfg.bootstrap, cfg.seed)
    if not analysis.finished:
        hint = ("turn on evaluation at the end of each run (eval.at_end=true with data.eval_streams; in a sweep "
                "file: overrides), or fit the last training windows with metric=loss"
                if cfg.metric == "eval_loss" else "let the runs finish (rerunning the sweep resumes them)")
        raise SweepDataError(f"no finished run of {sweep_dir} has `{cfg.metric}` ({status_counts(runs)}): nothing "
                             f"to fit or plot; {hint}")
    paths = plot(analysis, sweep_dir / "scaling")
    atomic_write_text(sweep_dir / "fits.json", json.dumps(
        {"metric": cfg.metric, "fits": {name: fit.to_json() for name, fit in analysis.fits.items()},
         "not_fitted": analysis.failures, "frontier": analysis.frontier,
         "optimal_size": analysis.optimal_size}, indent=2, default=str))
    atomic_write_text(sweep_dir / "report.md",
                      report_markdown(analysis, sweep_dir.name, paths[0].name, cfg.bootstrap))
    return analysis


def print_analysis(analysis: Analysis, sweep_dir: str | Path) -> None:
    for name, fit in analysis.fits.items():
        print(f"L vs {name}: {fit.describe()}")
        if fit.warning():
            print(f"  {fit.warning()}")
    for name, why in analysis.failures.items():
        print(f"L vs {name}: not fitted ({why})")
    print(f"report: {Path(sweep_dir) / 'report.md'}")


@one_line_errors(SweepDataError)
def main(argv: list[str] | None = None) -> int:
    cfg = parse_cli(FitConfig, argv, description=__doc__)
    print_analysis(run(cfg), cfg.sweep_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
