"""Checkpoint benchmark: seconds the training loop is blocked per checkpoint, synchronous vs background writes.

    biomedgpt bench checkpoint                         # base + AdamW, 1 rank (ZeRO-0) and 2 ranks (ZeRO-2)
    biomedgpt bench checkpoint model=tiny ranks=[1]

Each configuration starts its ranks through launchers/local.sh (CPU processes with gloo, or every GPU),
builds the real trainer on the demo shards, takes one optimizer step (so the AdamW state exists), then
saves ``saves`` checkpoints with ``checkpoint.background`` off and ``saves`` with it on. Between two
background saves it trains until the previous write has committed ``latest``, timing those steps
(what the writer thread costs the step). Blocked = the time inside ``Trainer.save`` on the slowest rank;
committed = until ``latest`` names the new checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from biomedgpt.engine import distributed  # noqa: F401  (sets DS_ACCELERATOR before deepspeed is imported)
from biomedgpt.engine.config import parse_cli

REPO = Path(__file__).resolve().parents[1]


@dataclass
class BenchConfig:
    model: str = "base"
    ranks: list[int] = field(default_factory=lambda: [1, 2])
    zero_stage_multi_rank: int = 2  # stage of the runs on more than one rank (1 rank: stage 0)
    saves: int = 2  # checkpoints per mode
    train_between: bool = True  # a step before each save, and steps while a background write goes on
    batch_size: int = 1
    image_size: int = 128
    work_dir: str = "runs/bench-checkpoint"
    worker: bool = False  # internal: this process is one rank of a configuration
    output: str = ""  # internal: the worker's result file


def _overrides(cfg: BenchConfig, out: Path, stage: int) -> list[str]:
    return [f"model.size={cfg.model}", "optim.max_steps=1000000", "optim.warmup_steps=1",
            f"data.batch_size={cfg.batch_size}", f"data.patch_image_size={cfg.image_size}", "data.num_workers=0",
            "eval.at_end=false", "checkpoint.at_end=false", "checkpoint.interval=0", "checkpoint.keep_last_n=2",
            "checkpoint.background=true",
            "log.interval=1000000", "log.progress_bar=false", "log.wandb_mode=disabled", "checkpoint.resume=never",
            f"deepspeed.zero_stage={stage}", f"output_dir={out}"]


def _step(trainer, batches) -> float:
    from biomedgpt.engine.trainer import _move

    start = time.perf_counter()
    batch = _move(next(batches), trainer.dist.device, trainer.float_dtype)
    out = trainer._forward_loss(batch, train=True)
    trainer.engine.backward(out.loss)
    trainer.engine.step()
    trainer.step += 1
    return time.perf_counter() - start


def worker(cfg: BenchConfig) -> None:
    import torch

    from biomedgpt.engine.distributed import all_reduce, barrier
    from biomedgpt.engine.train import parse
    from biomedgpt.engine.trainer import Trainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    stage = 0 if world == 1 else cfg.zero_stage_multi_rank
    out = Path(cfg.work_dir) / f"ranks{world}"
    run = parse(_overrides(cfg, out, stage))
    trainer = Trainer(run)
    trainer.engine.train()
    batches = trainer._batches()
    plain = [_step(trainer, batches) for _ in range(3 if cfg.train_between else 1)][-2:]
    slowest = lambda x: float(all_reduce(torch.tensor([x], dtype=torch.float64), "max")[0])  # noqa: E731
    rows = {}
    for mode in ("sync", "background"):
        trainer.ckpt.writer.background = mode == "background"
        blocked, committed, during = [], [], []
        for _ in range(cfg.saves):
            if cfg.train_between:
                _step(trainer, batches)
            else:
                trainer.step += 1  # a new tag (not a rewrite of the last one)
            start = time.perf_counter()
            tag = trainer.save()
            blocked.append(slowest(time.perf_counter() - start))
            flag = torch.tensor([float(trainer.ckpt.writer.busy)])
            while cfg.train_between and all_reduce(flag.clone(), "max")[0] > 0:  # every rank steps as long as any writer is busy
                during.append(_step(trainer, batches))
                flag = torch.tensor([float(trainer.ckpt.writer.busy)])
            trainer.ckpt.wait()
            barrier()
            committed.append(slowest(time.perf_counter() - start))
            assert (trainer.ckpt.root / "latest").read_text().strip() == tag
        rows[mode] = {"blocked_s": blocked, "committed_s": committed,
                      "step_s_during_write": statistics.median(during) if during else None,
                      "snapshot_gib": trainer.ckpt.writer.snapshot.bytes / 2**30 if mode == "background" else None}
    size = sum(p.stat().st_size for p in (trainer.ckpt.root / tag).rglob("*") if p.is_file())
    trainer.ckpt.close()
    if trainer.is_main:
        result = {"model": cfg.model, "ranks": world, "zero_stage": stage, "checkpoint_gib": size / 2**30,
                  "step_s": statistics.median(plain), **rows}
        Path(cfg.output).write_text(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(BenchConfig, argv)
    if cfg.worker:
        worker(cfg)
        return
    from biomedgpt.engine.train import ensure_demo_data, parse

    ensure_demo_data(parse([]).demo_data_dir)
    work = Path(cfg.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results = []
    for ranks in cfg.ranks:
        output = work / f"result_{ranks}.json"
        cmd = ["bash", str(REPO / "launchers/local.sh"), "-n", str(ranks), "-m", "biomedgpt.tools.bench_checkpoint",
               "--", "worker=true", f"output={output.resolve()}", f"work_dir={work.resolve()}", f"model={cfg.model}",
               f"saves={cfg.saves}", f"batch_size={cfg.batch_size}", f"image_size={cfg.image_size}",
               f"zero_stage_multi_rank={cfg.zero_stage_multi_rank}", f"train_between={str(cfg.train_between).lower()}"]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{ranks}-rank run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        results.append(json.loads(output.read_text()))
        print(json.dumps(results[-1]), flush=True)
    print("\n| ranks | ZeRO | checkpoint GiB | step s | sync blocked s | background blocked s | ratio | "
          "background committed s | step s during write |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        sync, bg = statistics.median(r["sync"]["blocked_s"]), statistics.median(r["background"]["blocked_s"])
        during = r["background"]["step_s_during_write"]
        print(f"| {r['ranks']} | {r['zero_stage']} | {r['checkpoint_gib']:.2f} | {r['step_s']:.2f} | {sync:.2f} | "
              f"{bg:.2f} | {bg / sync:.3f} | {statistics.median(r['background']['committed_s']):.2f} | "
              f"{'-' if during is None else f'{during:.2f}'} |")
    (work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
