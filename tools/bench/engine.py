"""Engine benchmark: step time / tokens/s per ZeRO stage, checkpoint save/load cost, the MFU formula's check.

    python -m biomedgpt.tools.bench.engine                      # everything, on the demo shards (built if missing)
    python -m biomedgpt.tools.bench.engine parts=[flops]        # one part: zero | checkpoint | flops

- zero: the ``tiny`` model (real size) trained for a few steps at each ZeRO stage through
  launchers/local.sh (2 CPU ranks, or every GPU); the median step time and tokens/s after warm-up.
- checkpoint: one training step of a model (``base`` by default) on one rank, then the time to save its
  checkpoint (weights + AdamW state + loader/RNG state), its size on disk, and the time to resume from it.
- flops: biomedgpt.engine.flops' formula against torch.utils.flop_counter on one forward+backward of the model.
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

from biomedgpt.engine.distributed.process_group import configure_environment
from biomedgpt.core.config import parse_cli
from biomedgpt.engine.run_config import DEMO_CONFIG

REPO = Path(__file__).resolve().parents[2]  # the package root (launchers/ beside tools/)


@dataclass
class BenchConfig:
    """What to measure, and where to write the scratch runs."""

    parts: list[str] = field(default_factory=lambda: ["flops", "zero", "checkpoint"])
    work_dir: str = "runs/bench-engine"
    ranks: int = 0  # 0: every GPU, or 2 CPU processes
    zero_stages: list[int] = field(default_factory=lambda: [0, 2, 3])
    zero_model: str = "tiny"
    zero_steps: int = 6
    batch_size: int = 4
    image_size: int = 256
    checkpoint_model: str = "base"
    flops_model: str = "tiny"


def _demo_overrides(cfg: BenchConfig, model: str, out: Path, steps: int) -> list[str]:
    return [f"model.size={model}", f"optim.max_steps={steps}", "optim.warmup_steps=1",
            f"data.batch_size={cfg.batch_size}", f"data.patch_image_size={cfg.image_size}", "data.num_workers=1",
            "eval.at_end=false", "checkpoint.at_end=false", "log.interval=1", "log.progress_bar=false",
            "log.wandb_mode=disabled", "checkpoint.resume=never", f"output_dir={out}"]


def bench_zero(cfg: BenchConfig) -> list[dict]:
    rows = []
    for stage in cfg.zero_stages:
        out = Path(cfg.work_dir) / f"zero{stage}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [str(REPO / "launchers/local.sh"), *(["-n", str(cfg.ranks)] if cfg.ranks else []), "--",
               "--config", str(DEMO_CONFIG), *_demo_overrides(cfg, cfg.zero_model, out, cfg.zero_steps),
               f"deepspeed.zero_stage={stage}"]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"ZeRO-{stage} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steady = [m for m in logged if "step_time_s" in m][2:]  # skip the warm-up steps
        rows.append({"zero_stage": stage, "model": cfg.zero_model,
                     "step_time_s": statistics.median(m["step_time_s"] for m in steady),
                     "tokens_per_s": statistics.median(m["tokens_per_s"] for m in steady),
                     "samples_per_s": statistics.median(m["samples_per_s"] for m in steady),
                     "mfu": statistics.median(m["mfu"] for m in steady),
                     "memory_gb": max(m["memory_gb"] for m in steady)})
    return rows


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench_checkpoint(cfg: BenchConfig) -> dict:
    from biomedgpt.tools.train import ensure_demo_data, parse
    from biomedgpt.engine.train.trainer import Trainer

    out = Path(cfg.work_dir) / "checkpoint"
    shutil.rmtree(out, ignore_errors=True)
    run = parse(_demo_overrides(cfg, cfg.checkpoint_model, out, 1) + ["data.batch_size=2"])
    ensure_demo_data(run.demo_data_dir)
    trainer = Trainer(run)
    trainer.train()  # one step, so that the optimizer state exists
    start = time.perf_counter()
    tag = trainer.save()
    save_s = time.perf_counter() - start
    size = _dir_bytes(trainer.ckpt.root / tag)
    run.checkpoint.resume = "auto"
    start = time.perf_counter()
    resumed = Trainer(run)
    load_s = time.perf_counter() - start
    assert resumed.step == 1
    params = sum(p.numel() for p in trainer.engine.module.parameters())
    return {"model": cfg.checkpoint_model, "params_m": params / 1e6, "save_s": save_s,
            "size_gb": size / 2**30, "resume_s (engine build + load)": load_s}


def bench_flops(cfg: BenchConfig) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from biomedgpt.engine.flops import train_step_flops
    from biomedgpt.models.config import model_config
    from biomedgpt.models.ofa import BiomedGPT

    model_cfg = model_config(cfg.flops_model, dropout=0.0)
    model = BiomedGPT(model_cfg).init_weights()
    b, s, t, h = 2, 40, 20, cfg.image_size
    src = torch.randint(4, 50000, (b, s))
    prev = torch.randint(4, 50000, (b, t))
    images = torch.randn(b, 3, h, h)
    with FlopCounterMode(display=False) as counter:
        model(src, prev, images, torch.ones(b, dtype=torch.bool)).sum().backward()
    formula = train_step_flops(model_cfg, b, s, t, (h // 16) ** 2, (h, h))
    counted = counter.get_total_flops()
    stem_input_grad = 2.0 * 3 * 64 * 49 * (h // 2) ** 2 * b  # skipped by the counter: images need no gradient
    return {"model": cfg.flops_model, "batch": f"{b} x ({h}px image + {s} src + {t} tgt tokens)",
            "formula_tflop": formula / 1e12, "flop_counter_tflop": counted / 1e12,
            "ratio": formula / counted, "ratio_without_stem_input_grad": (formula - stem_input_grad) / counted}


def main(argv: list[str] | None = None) -> None:
    configure_environment()  # before deepspeed is imported
    cfg = parse_cli(BenchConfig, argv)
    unknown = set(cfg.parts) - {"zero", "checkpoint", "flops"}
    if unknown:
        sys.exit(f"bench_engine: unknown parts {sorted(unknown)}")
    Path(cfg.work_dir).mkdir(parents=True, exist_ok=True)
    if "zero" in cfg.parts or "checkpoint" in cfg.parts:
        from biomedgpt.tools.train import ensure_demo_data, parse

        ensure_demo_data(parse([]).demo_data_dir)
    results = {}
    if "flops" in cfg.parts:
        results["flops"] = bench_flops(cfg)
        print("MFU formula check:", json.dumps(results["flops"]), flush=True)
    if "zero" in cfg.parts:
        results["zero"] = bench_zero(cfg)
        for row in results["zero"]:
            print("ZeRO step:", json.dumps(row), flush=True)
    if "checkpoint" in cfg.parts:
        os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
        results["checkpoint"] = bench_checkpoint(cfg)
        print("checkpoint:", json.dumps(results["checkpoint"]), flush=True)
    (Path(cfg.work_dir) / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
