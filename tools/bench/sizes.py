"""Every size trains: 2 ZeRO-3 steps of each model size on 2 CPU ranks of this machine (a benchmark, not a test).

    biomedgpt bench sizes                                   # tiny, medium, base, large, xlarge
    biomedgpt bench sizes sizes='[large, xlarge]' offload_from=xlarge memory_guard=false

Each size is a real run of ``biomedgpt train -n 2`` (ZeRO-3 with ``ds_configs/zero3_low_memory.json``; fp32,
bf16 mixed precision from ``bf16_from`` up; built under zero.Init from ``zero_init_from`` up; optimizer states
offloaded to DeepSpeed's CPU Adam from ``offload_from`` up, none by default; no checkpoint) on small synthetic
caption shards. Printed per size: the mean step time and the loss of the last step (from metrics.jsonl),
each rank's peak RSS (``VmHWM`` of the rank processes, polled), and the estimator's prediction
(``biomedgpt estimate``: model states + activations per rank, plus the offloaded states' CPU share).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

SIZES = ["tiny", "medium", "base", "large", "xlarge"]
WORDS = ("chest lung heart normal opacity effusion left right lower upper lobe mild severe no acute finding "
         "consolidation pneumothorax cardiomegaly stable").split()


@dataclass
class BenchSizesConfig:
    """Two ZeRO-3 training steps per model size on 2 CPU ranks: step time, peak RSS per rank, loss, estimate."""

    sizes: list[str] = field(default_factory=lambda: list(SIZES))
    ranks: int = 2
    batch: int = 1  # samples per rank per step
    image_size: int = 256
    steps: int = 2
    # first size whose optimizer states go to DeepSpeed's CPU Adam; "" (default): none, since on a CPU-only
    # machine the offloaded states are host memory too and add a second fp32 partition (+2.6 GiB/rank, large)
    offload_from: str = ""
    zero_init_from: str = "large"
    # first size trained in bf16 mixed precision (bf16 weights, gradients and gathers; fp32 master weights and
    # AdamW states): xlarge's five fp32 copies of its parameters alone are 17.3 GiB on 2 ranks, bf16's 13.9
    bf16_from: str = "xlarge"
    # ZeRO-3 tuned for host memory: layers released as soon as used, 10M-element buckets, 20M-element
    # optimizer sub-groups (bounds the foreach AdamW temporaries); "" runs the default ds_configs/zero3.json
    template: str = "ds_configs/zero3_low_memory.json"
    timeout_s: float = 1800.0  # per size
    memory_guard: bool = True  # skip a size whose expected RSS exceeds MemAvailable (no OOM kill of neighbours)
    work_dir: str = ""  # default: a temporary folder


def make_shards(root: Path, rows: int = 16, px: int = 256) -> None:
    import numpy as np

    from biomedgpt.data.images import encode_png
    from biomedgpt.data.mds import ShardWriter
    from biomedgpt.data.records import make_record

    rng = np.random.default_rng(0)
    writer = ShardWriter(str(root / "caption"))
    for i in range(rows):
        image = (rng.random((px, px, 3)) * 255).astype(np.uint8)
        writer.write(make_record(f"cap-{i}", "caption", {"captions": [" ".join(rng.choice(WORDS, 8))]},
                                 encode_png(image)))
    writer.commit()


#: measured rank RSS ~ base + per_estimate x estimate, by precision, with the low-memory template: fp32 fitted to
#: base 3.95 / 1.91 and large 8.07 / 4.41 GiB, bf16 to xlarge 10.64 / 8.59 (the process itself, ~0.8 GiB, and
#: ZeRO-3's gathered layers and gradient buckets, which the estimator counts for GPUs, not for a CPU rank)
RSS_FIT = {"fp32": (0.8, 1.65), "bf16": (0.8, 1.15)}


def _template(path: str) -> str | None:
    """A relative template path is the repository's (``ds_configs/...``), wherever the bench runs from."""
    if not path:
        return None
    if Path(path).exists():
        return str(Path(path).resolve())
    from biomedgpt.engine.distributed.ds_config import DS_CONFIG_DIR

    return str(DS_CONFIG_DIR.parent / path)


def _precision(cfg: BenchSizesConfig, size: str) -> str:
    return "bf16" if _from(size, cfg.bf16_from) else "fp32"


def _from(size: str, first: str) -> bool:
    return bool(first) and SIZES.index(size) >= SIZES.index(first)


def expected_rss_gib(predicted: float, precision: str) -> float:
    base, per_estimate = RSS_FIT[precision]
    return base + per_estimate * predicted


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def run_config(cfg: BenchSizesConfig, size: str, shards: Path, out: Path) -> dict:
    big = _from(size, cfg.offload_from)
    return {
        "model": {"size": size, "dropout": 0.0},
        "data": {"streams": [{"name": "caption", "task": "caption", "remote": str(shards / "caption")}],
                 "batch_size": cfg.batch, "patch_image_size": cfg.image_size, "num_workers": 0, "train_transform": "resize",
                 "group_weights": [1.0], "cache_dir": str(out.parent / "cache")},
        "optim": {"lr": 1e-5, "max_steps": cfg.steps, "warmup_steps": 1},
        "deepspeed": {"zero_stage": 3, "offload_optimizer": "cpu" if big else "none",
                      "precision": _precision(cfg, size),
                      "zero_init": _from(size, cfg.zero_init_from), "template": _template(cfg.template)},
        "log": {"interval": 1, "wandb_mode": "disabled", "progress_bar": False},
        "checkpoint": {"interval": 0, "at_end": False},  # training's memory, not a checkpoint snapshot's
        "eval": {"interval": 0, "at_end": False, "export_best": False},
        "output_dir": str(out),
    }


def predicted_gib(cfg: BenchSizesConfig, size: str, offload: bool, zero_init: bool) -> float:
    from biomedgpt.core.config import from_dict
    from biomedgpt.tools.estimate import EstimateConfig, estimate

    est = estimate(from_dict(EstimateConfig, {
        "model": {"size": size}, "gpu": "cpu", "peak_tflops": 1.0, "gpus_per_node": cfg.ranks,  # memory only
        "deepspeed": {"zero_stage": 3, "offload_optimizer": "cpu" if offload else "none", "zero_init": zero_init,
                      "precision": _precision(cfg, size)},
        "data": {"batch_size": cfg.batch, "patch_image_size": cfg.image_size, "max_src_tokens": 40,
                 "max_tgt_tokens": 20}}))
    per_rank = est["total_bytes_per_gpu"] + (est["cpu_bytes_per_node"] / cfg.ranks if offload else 0)
    return per_rank / 2**30


def _children(pid: int) -> list[int]:
    try:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    except OSError:
        return []
    kids = [int(p) for p in out.split()]
    return kids + [g for k in kids for g in _children(k)]


def _hwm_gib(pid: int) -> tuple[str, float] | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return None
    if "biomedgpt" not in cmd or "python" not in cmd:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return cmd, int(line.split()[1]) / 2**20
    return None


def run_size(cfg: BenchSizesConfig, size: str, work: Path, shards: Path) -> dict:
    out = work / size
    config = work / f"{size}.yaml"
    run = run_config(cfg, size, shards, out)
    config.write_text(yaml.safe_dump(run))
    log = open(work / f"{size}.log", "w")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "biomedgpt.tools.cli", "train", "-n", str(cfg.ranks), "--config",
                             str(config)], stdout=log, stderr=subprocess.STDOUT)
    peaks: dict[int, float] = {}
    while proc.poll() is None and time.perf_counter() - start < cfg.timeout_s:
        for pid in _children(proc.pid):
            hwm = _hwm_gib(pid)
            if hwm is not None:
                peaks[pid] = max(peaks.get(pid, 0.0), hwm[1])
        time.sleep(0.5)
    if proc.poll() is None:
        proc.kill()
    row = {"size": size, "rc": proc.wait(), "wall_s": time.perf_counter() - start,
           "offload": run["deepspeed"]["offload_optimizer"] == "cpu", "zero_init": run["deepspeed"]["zero_init"]}
    # the rank processes are the biggest biomedgpt processes of the tree (the launcher's are small)
    row["rank_peak_GiB"] = sorted(peaks.values(), reverse=True)[:cfg.ranks]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
               if line.strip()] if (out / "metrics.jsonl").exists() else []
    train = [m for m in metrics if "loss" in m and "step_time_s" in m]
    row["loss"] = train[-1]["loss"] if train else float("nan")
    row["step_s"] = sum(m["step_time_s"] for m in train) / len(train) if train else float("nan")
    row["steps"] = len(train)
    row["predicted_GiB"] = predicted_gib(cfg, size, row["offload"], row["zero_init"])
    return row


def main(argv: list[str] | None = None) -> int:
    from biomedgpt.core.config import parse_cli

    cfg = parse_cli(BenchSizesConfig, argv)
    for key, names in (("sizes", cfg.sizes), ("offload_from", [cfg.offload_from]), ("bf16_from", [cfg.bf16_from]),
                       ("zero_init_from", [cfg.zero_init_from])):
        bad = [n for n in names if n and n not in SIZES]
        if bad:
            raise SystemExit(f"bench sizes: {key} {bad} is not a size; use one of {SIZES} (or '' for none)")
    work = Path(cfg.work_dir or tempfile.mkdtemp(prefix="bench_sizes_"))
    work.mkdir(parents=True, exist_ok=True)
    shards = work / "shards"
    if not (shards / "caption").exists():
        make_shards(shards, px=cfg.image_size)
    print(f"{cfg.steps} ZeRO-3 steps per size on {cfg.ranks} CPU ranks, batch {cfg.batch} per rank, "
          f"{cfg.image_size} px; logs in {work}", flush=True)
    print(f"{'size':<8}{'precision':>10}{'offload':>8}{'rc':>4}{'steps':>6}{'step s':>9}{'loss':>9}"
          f"{'peak RSS GiB / rank':>24}{'estimate GiB':>14}", flush=True)
    ok = True
    for size in cfg.sizes:
        offload, zero_init = _from(size, cfg.offload_from), _from(size, cfg.zero_init_from)
        precision = _precision(cfg, size)
        need = cfg.ranks * expected_rss_gib(predicted_gib(cfg, size, offload, zero_init), precision)
        free = available_gib()
        if cfg.memory_guard and need > free:
            print(f"{size:<8}{precision:>10}{'cpu' if offload else '-':>8}  skipped: expects ~{need:.1f} "
                  f"GiB for {cfg.ranks} ranks, {free:.1f} GiB available (memory_guard=false runs it anyway)", flush=True)
            ok = False
            continue
        r = run_size(cfg, size, work, shards)
        ok &= r["rc"] == 0 and r["steps"] >= 1
        peaks = " / ".join(f"{p:.2f}" for p in r["rank_peak_GiB"]) or "-"
        print(f"{size:<8}{precision:>10}{'cpu' if r['offload'] else '-':>8}{r['rc']:>4}{r['steps']:>6}"
              f"{r['step_s']:>9.2f}{r['loss']:>9.3f}{peaks:>24}{r['predicted_GiB']:>14.2f}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
