"""CPU benchmark of the attention backends: model step time, and attention memory at long sequences.

    python -m biomedgpt.tools.bench.attention                        # time: tiny and base, 256 and 480 px
    python -m biomedgpt.tools.bench.attention mode=memory            # memory: 900 image + 80 text tokens, batch 8, base

``time``: forward and forward+backward seconds of a whole model step per backend (``flex`` has no CPU
backward in PyTorch, so it gets a forward time only). ``memory``: one encoder layer's self-attention with
the full OFA bias (absolute + text and image relative tables, padded text), in a fresh process: peak
resident memory (and seconds) of a forward (no grad) and of a forward+backward, the bytes autograd keeps
for the backward, and how many of those tensors are L×L-sized.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from biomedgpt.core.config import from_dict, parse_cli
from biomedgpt.models.attention import AttentionBias, RelativeBias, RelativePositions, attention
from biomedgpt.models.config import model_config
from biomedgpt.models.ofa import BiomedGPT, image_bucket_positions, image_position_ids, token_bucket_positions


CPU_BACKENDS = ("eager", "sdpa", "chunked", "flex")


@dataclass
class MemoryConfig:
    """One encoder self-attention call at a model size's width."""

    size: str = "base"
    batch: int = 8
    image_grid: int = 30  # 30 x 30 = 900 image tokens (480 px images)
    text_tokens: int = 80
    backends: list[str] = field(default_factory=lambda: list(CPU_BACKENDS))


@dataclass
class BenchAttentionConfig:
    mode: str = "time"  # time | memory
    sizes: list[str] = field(default_factory=lambda: ["tiny", "base"])
    image_sizes: list[int] = field(default_factory=lambda: [256, 480])
    backends: list[str] = field(default_factory=lambda: list(CPU_BACKENDS))
    batch: int = 2
    src_len: int = 40
    tgt_len: int = 20
    steps: int = 2
    memory: MemoryConfig = field(default_factory=MemoryConfig)


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------


def encoder_attention_inputs(cfg: MemoryConfig) -> tuple:
    """q, k, v, bias, key padding of one encoder layer: positions, tables and padding as the model has them."""
    mc = model_config(cfg.size)
    g = torch.Generator().manual_seed(0)
    b, h, dh = cfg.batch, mc.heads, mc.head_dim
    n_img, s = cfg.image_grid ** 2, cfg.text_tokens
    length = n_img + s

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).requires_grad_()

    q, k, v = rand(b, h, length, dh, scale=dh ** -0.5), rand(b, h, length, dh), rand(b, h, length, dh)
    text_ids = torch.arange(s)[None]
    image_ids = image_position_ids(cfg.image_grid, cfg.image_grid, mc.image_bucket_size)[None]
    text = RelativePositions(token_bucket_positions(mc.token_bucket_size, mc.max_source_positions), text_ids,
                             text_ids, n_img, n_img)
    image = RelativePositions(image_bucket_positions(mc.image_bucket_size), image_ids, image_ids)
    bias = AttentionBias(rand(1, h, length, dh, scale=0.1), rand(1, h, length, dh, scale=0.1),
                         [RelativeBias(rand(2 * mc.token_bucket_size - 1, h), text),
                          RelativeBias(rand((2 * mc.image_bucket_size - 1) ** 2 + 3, h), image)])
    padding = torch.zeros(b, length, dtype=torch.bool)
    for i in range(b):
        padding[i, length - (i * s) // (2 * b):] = True  # up to half of the text padded
    return q, k, v, bias, padding


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def peak_rss_mib(fn) -> tuple[float, float]:
    """(peak resident MiB above the current level while ``fn`` runs, its seconds); Linux: VmHWM reset by
    clear_refs."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss_kib("VmRSS")
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    return (_rss_kib("VmHWM") - base) / 1024, seconds


def saved_for_backward(fn, lxl_numel: int) -> tuple[float, int]:
    """(MiB of distinct storages autograd saves during ``fn``, how many distinct saved storages hold ≥ B·H·L·L values)."""
    storages: dict[int, int] = {}
    big: set[int] = set()

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        storages[ptr] = t.untyped_storage().nbytes()
        if t.is_floating_point() and t.numel() >= lxl_numel:
            big.add(ptr)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values()) / 2**20, len(big)


def measure_memory(cfg: MemoryConfig, backend: str) -> dict:
    q, k, v, bias, padding = encoder_attention_inputs(cfg)
    lxl = q.shape[0] * q.shape[1] * q.shape[2] ** 2

    def forward():
        with torch.no_grad():
            attention(q, k, v, bias, padding, False, 0.0, backend)

    def train():
        attention(q, k, v, bias, padding, False, 0.0, backend).sum().backward()

    forward()  # warm-up (flex compiles here)
    fwd_mib, fwd_s = peak_rss_mib(forward)
    row = {"backend": backend, "fwd_peak_MiB": round(fwd_mib, 1), "train_peak_MiB": None, "saved_MiB": None,
           "saved_lxl": None, "lxl_MiB": round(lxl * 4 / 2**20, 1), "fwd_s": round(fwd_s, 3), "fwd_bwd_s": None}
    if backend != "flex":  # no CPU backward for FlexAttention in PyTorch
        train()
        train_mib, train_s = peak_rss_mib(train)
        row["train_peak_MiB"], row["fwd_bwd_s"] = round(train_mib, 1), round(train_s, 3)
        saved, big = saved_for_backward(lambda: attention(q, k, v, bias, padding, False, 0.0, backend), lxl)
        row["saved_MiB"], row["saved_lxl"] = round(saved, 1), big
    return row


def memory_table(cfg: MemoryConfig) -> list[dict]:
    """Every backend measured in one fresh process whose large frees go back to the OS at once, so the
    peak (reset before each measurement) is each backend's own."""
    env = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run([sys.executable, "-m", "biomedgpt.tools.bench.attention", "--memory-rows", json.dumps(asdict(cfg))],
                         capture_output=True, text=True, env={**os.environ, **env})
    if out.returncode != 0:
        raise RuntimeError(f"memory measurement failed:\n{out.stderr[-3000:]}")
    return [json.loads(line) for line in out.stdout.strip().splitlines()]


def format_memory(rows: list[dict]) -> str:
    head = (f"{'backend':<8}{'fwd peak MiB':>14}{'fwd+bwd peak MiB':>18}{'saved for bwd MiB':>19}"
            f"{'saved L×L tensors':>19}{'fwd s':>8}{'fwd+bwd s':>11}   (one fp32 [B,H,L,L] = {rows[0]['lxl_MiB']} MiB)")
    lines = [head]
    for r in rows:
        cells = [r["fwd_peak_MiB"], r["train_peak_MiB"], r["saved_MiB"], r["saved_lxl"], r["fwd_s"], r["fwd_bwd_s"]]
        cells = [("n/a (no CPU bwd)" if i == 1 else "n/a") if c is None else c for i, c in enumerate(cells)]
        lines.append(f"{r['backend']:<8}{cells[0]:>14}{cells[1]:>18}{cells[2]:>19}{cells[3]:>19}{cells[4]:>8}"
                     f"{cells[5]:>11}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Time
# ----------------------------------------------------------------------------------------------


def time_model(cfg: BenchAttentionConfig, size: str, image_size: int, backend: str) -> dict:
    torch.manual_seed(0)
    model = BiomedGPT(model_config(size, attention_backend=backend, dropout=0.0)).init_weights().train()
    v = model.cfg.vocab_size
    src = torch.randint(4, v, (cfg.batch, cfg.src_len))
    src[0, cfg.src_len // 2:] = 1  # padding, as real batches have
    prev = torch.randint(4, v, (cfg.batch, cfg.tgt_len))
    images = torch.randn(cfg.batch, 3, image_size, image_size)
    masks = torch.ones(cfg.batch, dtype=torch.bool)

    def step(train: bool) -> float:
        start = time.perf_counter()
        with torch.set_grad_enabled(train):
            logits = model(src, prev, images, masks)
            if train:
                torch.nn.functional.cross_entropy(logits.view(-1, v), prev.view(-1)).backward()
                model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step(False)  # warm-up (flex compiles here)
    fwd = min(step(False) for _ in range(cfg.steps))
    train = None
    if backend != "flex":
        step(True)
        train = min(step(True) for _ in range(cfg.steps))
    tokens = (image_size // 16) ** 2 + cfg.src_len
    return {"size": size, "px": image_size, "tokens": tokens, "backend": backend, "fwd_s": round(fwd, 3),
            "fwd_bwd_s": None if train is None else round(train, 3)}


def main(argv: list[str] | None = None) -> None:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--memory-rows":
        memory_cfg = from_dict(MemoryConfig, json.loads(sys.argv[2]))
        for backend in memory_cfg.backends:
            print(json.dumps(measure_memory(memory_cfg, backend)), flush=True)
        return
    cfg = parse_cli(BenchAttentionConfig, argv)
    if cfg.mode == "memory":
        m = cfg.memory
        print(f"one {m.size} encoder self-attention: {m.image_grid ** 2} image + {m.text_tokens} text tokens, "
              f"batch {m.batch}, fp32, CPU, {torch.get_num_threads()} threads")
        print(format_memory(memory_table(m)))
        return
    if cfg.mode != "time":
        raise ValueError(f"mode must be time or memory, got {cfg.mode!r}")
    print(f"batch {cfg.batch}, {cfg.src_len} source / {cfg.tgt_len} target tokens, fp32, CPU, "
          f"{torch.get_num_threads()} threads; best of {cfg.steps} steps")
    print(f"{'size':<6}{'px':>5}{'enc tokens':>11}{'backend':>9}{'fwd s':>9}{'fwd+bwd s':>11}")
    for size in cfg.sizes:
        for px in cfg.image_sizes:
            for backend in cfg.backends:
                r = time_model(cfg, size, px, backend)
                bwd = "n/a" if r["fwd_bwd_s"] is None else r["fwd_bwd_s"]
                print(f"{size:<6}{px:>5}{r['tokens']:>11}{backend:>9}{r['fwd_s']:>9}{bwd:>11}", flush=True)


if __name__ == "__main__":
    main()
