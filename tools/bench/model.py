"""Forward + backward time and peak memory of one training step on this machine's CPU (fp32).

    python -m biomedgpt.tools.bench.model sizes='[tiny, base]' batch=8 image_size=256 src_len=40 tgt_len=20

Each size runs in a fresh process so its peak resident memory is its own.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from biomedgpt.core.config import from_dict, parse_cli
from biomedgpt.models.config import AttentionBackend, model_config
from biomedgpt.models.ofa import BiomedGPT, count_parameters


@dataclass
class BenchConfig:
    """Time one fp32 training step (forward + backward) per model size."""

    sizes: list[str] = field(default_factory=lambda: ["tiny", "base"])
    batch: int = 8  # samples, each with one image
    image_size: int = 256  # pixels per side
    src_len: int = 40  # source tokens per sample
    tgt_len: int = 20  # decoder tokens per sample
    steps: int = 3  # timed steps (their mean and minimum are reported)
    warmup: int = 1  # untimed steps first
    attention_backend: AttentionBackend = "auto"
    threads: int = 0  # 0: torch's default


def measure(cfg: BenchConfig, size: str) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    model = BiomedGPT(model_config(size, attention_backend=cfg.attention_backend)).init_weights().train()
    v = model.cfg.vocab_size
    src = torch.randint(4, v, (cfg.batch, cfg.src_len))
    prev = torch.randint(4, v, (cfg.batch, cfg.tgt_len))
    images = torch.randn(cfg.batch, 3, cfg.image_size, cfg.image_size)
    masks = torch.ones(cfg.batch, dtype=torch.bool)
    times = []
    for step in range(cfg.warmup + cfg.steps):
        start = time.perf_counter()
        logits = model(src, prev, images, masks)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, v), prev.view(-1))
        loss.backward()
        model.zero_grad(set_to_none=True)
        if step >= cfg.warmup:
            times.append(time.perf_counter() - start)
    return {"size": size, "params_M": round(count_parameters(model) / 1e6, 2),
            "step_s": round(sum(times) / len(times), 3), "min_step_s": round(min(times), 3),
            "peak_rss_GiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--one":
        cfg = from_dict(BenchConfig, json.loads(sys.argv[2]))
        print(json.dumps(measure(cfg, sys.argv[3])))
        return
    cfg = parse_cli(BenchConfig, argv)
    print(f"batch {cfg.batch}, {cfg.image_size} px, {cfg.src_len} source / {cfg.tgt_len} target tokens, fp32, "
          f"backend {cfg.attention_backend}")
    print(f"{'size':<8}{'params':>10}{'fwd+bwd s':>12}{'min s':>9}{'peak RSS GiB':>14}{'threads':>9}")
    for size in cfg.sizes:
        out = subprocess.run([sys.executable, "-m", "biomedgpt.tools.bench.model", "--one", json.dumps(asdict(cfg)), size],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['size']:<8}{r['params_M']:>9}M{r['step_s']:>12}{r['min_step_s']:>9}{r['peak_rss_GiB']:>14}"
              f"{r['threads']:>9}")


if __name__ == "__main__":
    main()
