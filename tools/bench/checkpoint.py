"""Checkpoint benchmark: seconds the training loop is blocked per checkpoint, synchronous vs background writes.

    biomedgpt bench checkpoint                         # base + AdamW: 1 rank ZeRO-0, 2 ranks ZeRO-2 and ZeRO-3
    biomedgpt bench checkpoint model=tiny runs=[1x0]

Each run (``RANKSxSTAGE``) starts its ranks through launchers/local.sh (CPU processes with gloo, or every
GPU), builds the real trainer on the demo shards, takes one optimizer step (so the AdamW state exists),
reserves the snapshot buffers as ``Trainer.train`` does after its first step (timed: ``reserve s``), then
saves ``saves`` checkpoints with ``checkpoint.background`` off and ``saves`` with it on; every save is
reported (the first one too) and the median. After each background save it trains until the write has
committed ``latest`` (steps with a write in flight), then as many steps without one: the step slowdown
while a write runs, measured alternately. Blocked = the time inside ``Trainer.save`` on the slowest rank;
committed = until ``latest`` names the new checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from biomedgpt.engine.distributed.process_group import configure_environment
from biomedgpt.engine.checkpoint.layout import LATEST_FILE
from biomedgpt.core.config import parse_cli

REPO = Path(__file__).resolve().parents[2]  # the package root (launchers/ beside tools/)


@dataclass
class BenchConfig:
    model: str = "base"
    runs: list[str] = field(default_factory=lambda: ["1x0", "2x2", "2x3"])  # RANKSxZERO_STAGE
    saves: int = 3  # checkpoints per mode
    train_between: bool = True  # a step before each save, and steps while a background write goes on
    batch_size: int = 1
    image_size: int = 128
    work_dir: str = "runs/bench-checkpoint"
    worker: bool = False  # internal: this process is one rank of a run
    zero_stage: int = 0  # internal: the worker's stage
    output: str = ""  # internal: the worker's result file


def _overrides(cfg: BenchConfig, out: Path, stage: int) -> list[str]:
    return [f"model.size={cfg.model}", "optim.max_steps=1000000", "optim.warmup_steps=1",
            f"data.batch_size={cfg.batch_size}", f"data.patch_image_size={cfg.image_size}", "data.num_workers=0",
            "eval.at_end=false", "checkpoint.at_end=false", "checkpoint.interval=0", "checkpoint.keep_last_n=2",
            "checkpoint.background=true",
            "log.interval=1000000", "log.progress_bar=false", "log.wandb_mode=disabled", "checkpoint.resume=never",
            f"deepspeed.zero_stage={stage}", f"output_dir={out}"]


def _step(trainer, batches) -> float:
    start = time.perf_counter()
    trainer.train_step(next(batches))
    trainer.step += 1
    return time.perf_counter() - start


def worker(cfg: BenchConfig) -> None:
    import torch

    from biomedgpt.engine.distributed.process_group import all_reduce, barrier
    from biomedgpt.tools.train import parse
    from biomedgpt.engine.train.trainer import Trainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    out = Path(cfg.work_dir) / f"ranks{world}_zero{cfg.zero_stage}"
    run = parse(_overrides(cfg, out, cfg.zero_stage))
    trainer = Trainer(run)
    trainer.engine.train()
    batches = trainer._batches()
    plain = [_step(trainer, batches) for _ in range(3 if cfg.train_between else 1)][-2:]
    slowest = lambda x: float(all_reduce(torch.tensor([x], dtype=torch.float64), "max")[0])  # noqa: E731
    start = time.perf_counter()
    trainer.reserve_checkpoint_memory()  # what Trainer.train does after its first step
    reserve_s = slowest(time.perf_counter() - start)
    rows = {}
    for mode in ("sync", "background"):
        trainer.ckpt.writer.background = mode == "background"
        blocked, committed, during, without = [], [], [], []
        for _ in range(cfg.saves):
            if cfg.train_between:
                _step(trainer, batches)
            else:
                trainer.step += 1  # a new tag (not a rewrite of the last one)
            start = time.perf_counter()
            tag = trainer.save()
            blocked.append(slowest(time.perf_counter() - start))
            flag = torch.tensor([float(trainer.ckpt.writer.busy)])
            n = 0
            while cfg.train_between and all_reduce(flag.clone(), "max")[0] > 0:  # every rank steps as long as any writer is busy
                during.append(_step(trainer, batches))
                n += 1
                flag = torch.tensor([float(trainer.ckpt.writer.busy)])
            trainer.ckpt.wait()
            barrier()
            committed.append(slowest(time.perf_counter() - start))
            without.extend(_step(trainer, batches) for _ in range(n))  # as many steps, no write in flight
            assert (trainer.ckpt.root / LATEST_FILE).read_text().strip() == tag
        rows[mode] = {"blocked_s": blocked, "committed_s": committed,
                      "step_s_during_write": statistics.median(during) if during else None,
                      "step_s_without_write": statistics.median(without) if without else None,
                      "steps_during_write": len(during),
                      "snapshot_gib": trainer.ckpt.writer.snapshot.bytes / 2**30 if mode == "background" else None}
    size = sum(p.stat().st_size for p in (trainer.ckpt.root / tag).rglob("*") if p.is_file())
    trainer.ckpt.close()
    if trainer.is_main:
        result = {"model": cfg.model, "ranks": world, "zero_stage": cfg.zero_stage, "checkpoint_gib": size / 2**30,
                  "step_s": statistics.median(plain), "reserve_s": reserve_s, **rows}
        Path(cfg.output).write_text(json.dumps(result))


def _seconds(values: list[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def table(results: list[dict]) -> None:
    print("\n| ranks | ZeRO | checkpoint GiB | reserve s | sync blocked s (each save) | background blocked s (each save) | "
          "median sync | median background | ratio (worst save / median sync) | background committed s | "
          "step s without / with a write in flight |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        sync, bg = r["sync"]["blocked_s"], r["background"]["blocked_s"]
        without, during = r["background"]["step_s_without_write"], r["background"]["step_s_during_write"]
        steps = "-" if during is None else f"{without:.2f} / {during:.2f} ({during / without:.2f}x)"
        print(f"| {r['ranks']} | {r['zero_stage']} | {r['checkpoint_gib']:.2f} | {r['reserve_s']:.2f} | {_seconds(sync)} | "
              f"{_seconds(bg)} | {statistics.median(sync):.2f} | {statistics.median(bg):.2f} | "
              f"{max(bg) / statistics.median(sync):.3f} | {statistics.median(r['background']['committed_s']):.2f} | "
              f"{steps} |")


def main(argv: list[str] | None = None) -> None:
    configure_environment()  # before deepspeed is imported
    cfg = parse_cli(BenchConfig, argv)
    if cfg.worker:
        worker(cfg)
        return
    from biomedgpt.tools.train import ensure_demo_data, parse

    ensure_demo_data(parse([]).demo_data_dir)
    work = Path(cfg.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results = []
    for spec in cfg.runs:
        ranks, stage = (int(x) for x in spec.split("x"))
        output = work / f"result_{spec}.json"
        cmd = ["bash", str(REPO / "launchers/local.sh"), "-n", str(ranks), "-m", "biomedgpt.tools.bench.checkpoint",
               "--", "worker=true", f"output={output.resolve()}", f"work_dir={work.resolve()}", f"model={cfg.model}",
               f"saves={cfg.saves}", f"batch_size={cfg.batch_size}", f"image_size={cfg.image_size}",
               f"zero_stage={stage}", f"train_between={str(cfg.train_between).lower()}"]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"run {spec} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        results.append(json.loads(output.read_text()))
        print(json.dumps(results[-1]), flush=True)
    table(results)
    (work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
