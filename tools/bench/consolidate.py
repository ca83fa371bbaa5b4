"""Peak memory and time: this project's streaming consolidation vs DeepSpeed's ``zero_to_fp32``.

    python -m biomedgpt.tools.bench.consolidate [size=base] [workdir=runs/bench-consolidate]

Makes (once) a ZeRO-3 checkpoint of a ``size`` model trained ``steps`` steps by ``world_size`` gloo CPU
ranks, then consolidates it with each tool in its own subprocess and reports the subprocess's peak
resident memory (``wait4`` rusage), wall and CPU time. Both write fp32 (ours safetensors; DeepSpeed's
``--safe_serialization`` refuses the tied embedding, so it writes ``pytorch_model.bin``). The checkpoint
is saved by the engine's ``CheckpointManager``, so it carries a consolidation index and ours copies the
stored bytes without importing torch; a ``workdir`` holding a checkpoint from before the index measures
the torch path (use a fresh one).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from biomedgpt.engine.checkpoint.layout import LATEST_FILE
from biomedgpt.core.config import parse_cli


@dataclass
class BenchConfig:
    size: str = "base"
    world_size: int = 2
    steps: int = 1
    workdir: str = "runs/bench-consolidate"
    role: Literal["bench", "rank"] = "bench"  # rank: one training process (started by the benchmark)


def _train_rank(cfg: BenchConfig) -> None:
    """One rank: a few ZeRO-3 steps on random data, then an engine checkpoint."""
    import torch

    from biomedgpt.engine.checkpoint.manager import CheckpointManager
    from biomedgpt.engine.distributed.process_group import configure_environment, init_distributed

    configure_environment()  # before deepspeed is imported
    import deepspeed
    from biomedgpt.models.config import ModelSpec
    from biomedgpt.models.ofa import BiomedGPT

    info = init_distributed("gloo")
    spec = ModelSpec.of(cfg.size, dropout=0.0)
    torch.manual_seed(0)
    model = BiomedGPT(spec.build()).init_weights()
    for param in model.parameters():  # see tests/test_checkpoint_tools.py: ZeRO-3 and OFA's dataclass outputs
        deepspeed.zero.register_external_parameter(model, param)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4),
        config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
                "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9})
    vocab = model.cfg.vocab_size
    for step in range(cfg.steps):
        g = torch.Generator().manual_seed(step * 100 + info.rank)
        logits = engine(torch.randint(4, vocab, (1, 16), generator=g), torch.randint(4, vocab, (1, 8), generator=g),
                        patch_images=torch.randn(1, 3, 64, 64, generator=g), patch_masks=torch.ones(1, dtype=torch.bool))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.randint(4, vocab, (8,), generator=g))
        engine.backward(loss)
        engine.step()
    CheckpointManager(Path(cfg.workdir) / "run", info.rank, info.world_size, keep_last_n=1).save(
        engine, cfg.steps, {"step": cfg.steps, "config": {"model": {"size": cfg.size, "dropout": 0.0}}},
        {}, 3)


def _make_checkpoint(cfg: BenchConfig) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", "biomedgpt.tools.bench.consolidate", f"size={cfg.size}",
                               f"steps={cfg.steps}", f"workdir={cfg.workdir}", "role=rank"],
                              env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(cfg.world_size),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"})
             for r in range(cfg.world_size)]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit("making the benchmark checkpoint failed")


def measure(command: list[str]) -> dict:
    """Run ``command``; its peak RSS (MB, from wait4), wall time and CPU time (user + system, s: the
    steadier figure on a shared machine)."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    err = proc.stderr.read().decode()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{command[:4]} failed ({code}):\n{err[-3000:]}")
    return {"peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "seconds": round(elapsed, 1),
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1)}


def main(argv: list[str] | None = None) -> int:
    cfg = parse_cli(BenchConfig, argv, description=__doc__)
    if cfg.role == "rank":
        _train_rank(cfg)
        return 0
    root = Path(cfg.workdir) / "run" / "checkpoints"
    if not (root / LATEST_FILE).exists():
        _make_checkpoint(cfg)
    tag = (root / LATEST_FILE).read_text().strip()
    ckpt_bytes = sum(p.stat().st_size for p in (root / tag).iterdir() if p.is_file())
    ours_out, ds_out = Path(cfg.workdir) / "out-streaming", Path(cfg.workdir) / "out-zero_to_fp32"
    for out in (ours_out, ds_out):
        shutil.rmtree(out, ignore_errors=True)
    results = {
        "checkpoint": str(root / tag), "checkpoint_mb": round(ckpt_bytes / 1e6, 1), "size": cfg.size,
        "world_size": cfg.world_size,
        "python_baseline": measure([sys.executable, "-c", "import torch, deepspeed, safetensors"]),
        "streaming (biomedgpt.tools.consolidate)": measure([sys.executable, "-m", "biomedgpt.tools.consolidate",
                                                   f"checkpoint={root}", f"output={ours_out}", "progress=false"]),
        # --safe_serialization fails on the tied embedding (shared tensors): pytorch_model.bin instead
        "deepspeed zero_to_fp32": measure([sys.executable, "-m", "deepspeed.utils.zero_to_fp32", str(root),
                                           str(ds_out), "--tag", tag]),
    }
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
