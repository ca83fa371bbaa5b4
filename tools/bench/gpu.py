"""GPU benchmark of the attention backends: one training step per model size, backend and image size.

    python -m biomedgpt.tools.bench.gpu                                   # everything (tiny..xlarge, 256/480 px)
    python -m biomedgpt.tools.bench.gpu sizes='[tiny, base]' variants='[ofa:sdpa, ofa:flex]' time_budget_s=400

Self-contained on a bare GPU machine: packages it lacks (PyYAML for the config parser, flash-attn) are
installed first from wheels carried in ``.whl/`` (``pip install --no-index --find-links .whl``); a
package without a wheel there is reported and its rows say so. Each row is one training step (forward,
backward, fused AdamW) under bf16 autocast with fp32 weights: step time, tokens/s (image + source +
target tokens), MFU against the bf16 matmul peak measured on this GPU (model FLOPs from
``biomedgpt.engine.flops``), and peak allocated memory. A variant is ``position_scheme:attention_backend``.
"""
from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

WHEEL_DIR = Path(__file__).resolve().parents[2] / ".whl"
#: import name -> distribution name, installed from WHEEL_DIR when missing
PACKAGES = {"yaml": "PyYAML", "flash_attn": "flash-attn"}


def ensure_packages(wheel_dir: Path = WHEEL_DIR) -> None:
    """Install each missing package of ``PACKAGES`` from the carried wheels (no network)."""
    for module, dist in PACKAGES.items():
        if importlib.util.find_spec(module) is not None:
            continue
        prefix = dist.lower().replace("-", "_")
        wheels = [w for w in wheel_dir.glob("*.whl") if w.name.lower().replace("-", "_").startswith(prefix)]
        if not wheels:
            print(f"[setup] {dist} is not installed and {wheel_dir} has no wheel for it", flush=True)
            continue
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheel_dir),
                               dist], capture_output=True, text=True)
        status = "installed" if proc.returncode == 0 else f"install failed: {proc.stderr.strip()[-500:]}"
        print(f"[setup] {dist} from {wheel_dir}: {status}", flush=True)
    importlib.invalidate_caches()


@dataclass
class BenchGpuConfig:
    sizes: list[str] = field(default_factory=lambda: ["tiny", "medium", "base", "large", "xlarge"])
    image_sizes: list[int] = field(default_factory=lambda: [256, 480])
    variants: list[str] = field(default_factory=lambda: ["ofa:eager", "ofa:sdpa", "ofa:flex", "rope:sdpa",
                                                         "rope:flash"])
    batch: int = 8
    src_len: int = 80
    tgt_len: int = 40
    warmup: int = 2  # steps before timing (flex compiles in the first)
    steps: int = 3
    device: str = "cuda"
    time_budget_s: float = 540.0  # no new row starts after this (device time is scarce); 0: no limit


def measured_bf16_peak(device: str) -> float:
    """TFLOP/s of a large bf16 matmul on this device: the practical peak MFU is measured against."""
    import torch

    from biomedgpt.engine.flops import measure_matmul_tflops

    size = 8192 if device == "cuda" else 1024
    return measure_matmul_tflops(torch.bfloat16, size=size, repeats=20 if device == "cuda" else 3, device=device)


def run_row(cfg: BenchGpuConfig, size: str, px: int, variant: str, peak_tflops: float) -> dict:
    import torch

    from biomedgpt.models.attention import resolve_backend
    from biomedgpt.models.config import model_config

    scheme, backend = variant.split(":")
    row = {"size": size, "px": px, "variant": variant}
    if backend == "flash" and importlib.util.find_spec("flash_attn") is None:
        return {**row, "error": "flash-attn not installed"}
    torch._dynamo.reset()  # every row has new shapes: start flex's compile cache afresh
    device = torch.device(cfg.device)
    mcfg = model_config(size, attention_backend=backend, position_scheme=scheme, dropout=0.0)
    row["runs"] = resolve_backend(backend, scheme)
    try:
        row.update(_measure(cfg, mcfg, px, device, peak_tflops))
    except torch.cuda.OutOfMemoryError:
        row["error"] = "OOM"
    except Exception as exc:  # noqa: BLE001  one failing row (a kernel's limits) must not end the table
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the row's model and optimizer are gone with _measure's frame
    return row


def _measure(cfg: BenchGpuConfig, mcfg, px: int, device, peak_tflops: float) -> dict:
    """One row's timed steps: step time, tokens/s, MFU, peak memory (its model is freed on return)."""
    import torch

    from biomedgpt.engine.flops import train_step_flops
    from biomedgpt.models.ofa import BiomedGPT

    with device:
        model = BiomedGPT(mcfg).init_weights().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    v = mcfg.vocab_size
    src = torch.randint(4, v, (cfg.batch, cfg.src_len), generator=g)
    src[: cfg.batch // 2, cfg.src_len * 3 // 4:] = 1  # padded sources, as real batches have
    prev = torch.randint(4, v, (cfg.batch, cfg.tgt_len), generator=g)
    batch = dict(src_tokens=src.to(device), prev_output_tokens=prev.to(device),
                 patch_images=torch.randn(cfg.batch, 3, px, px, generator=g).to(device),
                 patch_masks=torch.ones(cfg.batch, dtype=torch.bool, device=device))
    target = prev.to(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(**batch)
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, v), target.view(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(cfg.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(cfg.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / cfg.steps
    image_tokens = (px // 16) ** 2
    flops = train_step_flops(mcfg, cfg.batch, cfg.src_len, cfg.tgt_len, image_tokens, (px, px))
    return dict(step_s=seconds, tokens_s=cfg.batch * (image_tokens + cfg.src_len + cfg.tgt_len) / seconds,
                mfu=flops / seconds / (peak_tflops * 1e12),
                peak_GiB=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"))


def format_row(r: dict) -> str:
    head = f"{r['size']:<7}{r['px']:>5}  {r['variant']:<11}{r.get('runs', ''):<7}"
    if "error" in r:
        return head + f"  {r['error']}"
    return head + f"{r['step_s'] * 1e3:>10.1f}{r['tokens_s']:>12.0f}{r['mfu'] * 100:>8.1f}{r['peak_GiB']:>10.2f}"


def main(argv: list[str] | None = None) -> None:
    ensure_packages()
    import torch

    from biomedgpt.core.config import parse_cli

    cfg = parse_cli(BenchGpuConfig, argv)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device here (device=cpu runs a smoke test)")
    name = torch.cuda.get_device_name() if cfg.device == "cuda" else "cpu"
    peak = measured_bf16_peak(cfg.device)
    print(f"{name}: measured bf16 matmul peak {peak:.1f} TFLOP/s; batch {cfg.batch}, {cfg.src_len} source / "
          f"{cfg.tgt_len} target tokens, bf16 autocast, AdamW; torch {torch.__version__}", flush=True)
    print(f"{'size':<7}{'px':>5}  {'variant':<11}{'runs':<7}{'step ms':>10}{'tokens/s':>12}{'MFU %':>8}"
          f"{'peak GiB':>10}", flush=True)
    start = time.perf_counter()
    for size in cfg.sizes:
        for px in cfg.image_sizes:
            for variant in cfg.variants:
                if cfg.time_budget_s and time.perf_counter() - start > cfg.time_budget_s:
                    print(format_row({"size": size, "px": px, "variant": variant, "error": "skipped: time budget"}),
                          flush=True)
                    continue
                print(format_row(run_row(cfg, size, px, variant, peak)), flush=True)


if __name__ == "__main__":
    main()
