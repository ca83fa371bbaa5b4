"""Run logging on rank 0: a console progress bar and lines, ``metrics.jsonl``, and wandb.

wandb is offline unless the user asks otherwise (``WANDB_MODE``, an API key, or ``log.wandb_mode``);
an online start that fails (no network: it waits WANDB_INIT_TIMEOUT seconds, 60 by default) falls back
to offline; any other wandb failure turns wandb off with one warning and never fails the run.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

from biomedgpt.engine.distributed import process_group as dist_utils
from biomedgpt.engine.run_config import LogConfig

_SUMMED = ("loss", "nll", "tokens", "correct", "samples", "all_tokens", "flops")


@dataclass
class MetricWindow:
    """This rank's sums over the micro-batches since the last logged step; ``reduced`` totals them over
    the ranks (memory: the largest rank's) in one all_reduce."""

    num_tasks: int
    loss: float = 0.0  # label-smoothed loss summed over target tokens
    nll: float = 0.0
    tokens: float = 0.0  # target tokens (the loss's denominator)
    correct: float = 0.0  # target tokens predicted right
    samples: float = 0.0
    all_tokens: float = 0.0  # every token the model read: source text, image tokens, targets
    flops: float = 0.0  # model FLOPs of forward + backward (engine/flops.py)
    memory_gb: float = 0.0  # peak device memory (CPU: resident set); set when reduced
    steps: int = 0  # optimizer steps
    grad_norm: Optional[float] = None  # set where DeepSpeed records none (ZeroPlan.own_grad_norm)
    start: float = field(default_factory=time.perf_counter)
    per_task: torch.Tensor = field(init=False)  # [tasks, 2]: summed loss, target tokens

    def __post_init__(self) -> None:
        self.per_task = torch.zeros(self.num_tasks, 2, dtype=torch.float64)

    def add(self, task_ids: Optional[torch.Tensor], sample_loss: torch.Tensor, sample_tokens: torch.Tensor,
            **sums: float) -> None:
        for name, value in sums.items():
            setattr(self, name, getattr(self, name) + value)
        if task_ids is not None:
            ids = task_ids.cpu()
            self.per_task[:, 0].index_add_(0, ids, sample_loss.double().cpu())
            self.per_task[:, 1].index_add_(0, ids, sample_tokens.double().cpu())

    def reduced(self, memory_gb: float, rank: int, world: int) -> "MetricWindow":
        """Collective: the window summed over the ranks; each rank's memory travels in its own slot."""
        memory = torch.zeros(world, dtype=torch.float64)
        memory[rank] = memory_gb
        flat = torch.cat([torch.tensor([getattr(self, name) for name in _SUMMED], dtype=torch.float64),
                          self.per_task.reshape(-1), memory])
        dist_utils.all_reduce(flat)
        total = dataclasses.replace(self, **dict(zip(_SUMMED, flat[:len(_SUMMED)].tolist())),
                                    memory_gb=float(flat[-world:].max()))
        total.per_task = flat[len(_SUMMED):len(_SUMMED) + self.per_task.numel()].reshape(self.per_task.shape)
        return total


def resolve_wandb_mode(requested: str) -> str:
    """auto -> WANDB_MODE if set, online when an API key is configured, else offline."""
    if requested != "auto":
        return requested
    env = os.environ.get("WANDB_MODE")
    if env:
        return {"dryrun": "offline", "run": "online"}.get(env, env)
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so the file stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    def __init__(self, cfg: LogConfig, output_dir: str | Path, run_config: dict, total_steps: int,
                 start_step: int, enabled: bool):
        self.enabled = enabled
        self.wandb_run = None
        self.bar = None
        if not enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out / "metrics.jsonl", "a", buffering=1)
        if cfg.progress_bar and sys.stderr.isatty():  # redirected to a file, a bar's \r would make one huge line
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=2.0)
        mode = resolve_wandb_mode(cfg.wandb_mode)
        if mode != "disabled":
            self.wandb_run = self._start_wandb(cfg, out, run_config, mode)
            if self.wandb_run is None and mode == "online":
                self.wandb_run = self._start_wandb(cfg, out, run_config, "offline")  # sync it later

    @staticmethod
    def _start_wandb(cfg: LogConfig, out: Path, run_config: dict, mode: str):
        try:
            import wandb

            timeout = float(os.environ.get("WANDB_INIT_TIMEOUT", 60))
            settings = wandb.Settings(init_timeout=timeout, silent=True, console="off", finish_timeout=timeout)
            return wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, dir=str(out), mode=mode,
                              config=run_config, resume="allow", id=_run_id(out), settings=settings)
        except Exception as exc:  # wandb must never stop a training run
            warnings.warn(f"wandb: could not start it in {mode} mode ({exc})")
            try:
                wandb.teardown()  # forget the failed run, so an offline start can take its id
            except Exception:
                pass
            return None

    def log(self, step: int, metrics: dict[str, Any], console: bool = True) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        if console:
            shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
                             if "/" not in k or k.startswith(("eval/loss", "eval/acc")))
            self.write(f"step {step}: {shown}")
        if self.wandb_run is not None:
            try:
                self.wandb_run.log(metrics, step=step)
            except Exception as exc:
                warnings.warn(f"wandb disabled after a logging error: {exc}")
                self.wandb_run = None

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def advance(self, steps: int = 1, postfix: dict | None = None) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish()
            except Exception as exc:
                warnings.warn(f"wandb finish failed: {exc}")
            self.wandb_run = None


def _run_id(out: Path) -> str:
    """One wandb run per output directory, so a resumed training continues the same run."""
    path = out / "wandb_run_id"
    if path.exists():
        return path.read_text().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id)
    return run_id
