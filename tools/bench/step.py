"""Training step on this CPU: the eager reference-equivalent path against the default path, side by side.

    biomedgpt bench step                                   # tiny and base at 256 px (batch 8) and 480 px (batch 2)
    biomedgpt bench step cases='[base:256:8]' repeats=5 paths='[eager, default, attention_backend=chunked]'

One fp32 training step = forward + cross-entropy + backward, every dropout 0, the same weights and batch
for every path. Each path runs in its own worker process (built once, warmed up once: that first step
includes any ``torch.compile`` time, reported as ``compile s``); the workers then run their steps in turn,
alternating, so machine noise hits every path alike. ``CPU s`` is the worker's CPU time per step (median),
the figure to compare on a shared, overloaded machine with ``threads=1`` (wall time then mostly measures
the wait for a core). ``peak MiB`` is the worker's peak resident memory
over the timed steps (``VmHWM`` reset after warm-up, so the compiler's own memory is not counted);
``base MiB`` its resident memory before them (weights, gradients, allocator caches).

A path is ``eager`` (attention_backend eager, channels-first, not compiled: numerically the reference),
``default`` (the ModelConfig defaults: what a run on this CPU gets: ``auto`` attention (chunked on CPU),
channels-first stem, ``compile: auto``, which is off on CPU), ``compiled`` (the default with inductor layers: ``first s`` is then
mostly compile time), or ``key=value,key=value`` ModelConfig overrides.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

#: named paths -> ModelConfig overrides
PATHS: dict[str, dict] = {
    "eager": {"attention_backend": "eager", "channels_last": False, "compile": False},
    "default": {},
    "compiled": {"compile": True},
}


@dataclass
class BenchStepConfig:
    """Seconds per training step and peak memory of the eager and the default path, alternating."""

    cases: list[str] = field(default_factory=lambda: ["tiny:256:8", "tiny:480:2", "base:256:8", "base:480:2"])
    paths: list[str] = field(default_factory=lambda: ["eager", "default"])
    src_len: int = 40
    tgt_len: int = 20
    repeats: int = 3  # timed steps per path (alternating)
    threads: int = 0  # 0: torch's default


def path_overrides(path: str) -> dict:
    if path in PATHS:
        return dict(PATHS[path])
    out = {}
    for item in path.split(","):
        key, _, value = item.partition("=")
        out[key.strip()] = json.loads(value) if value.strip() in ("true", "false") or value.strip()[:1].isdigit() \
            else value.strip()
    return out


def _rss(field_name: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS (VmHWM) to the current RSS
        f.write("5")


def _worker(spec: dict) -> None:
    """One path: build, warm up (compile), then one timed step per ``step`` line on stdin."""
    import torch

    from biomedgpt.engine.distributed.parallelize import apply_compile, compile_enabled
    from biomedgpt.models.config import model_config
    from biomedgpt.models.ofa import BiomedGPT

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    size, px, batch = spec["case"].split(":")
    px, batch = int(px), int(batch)
    torch.manual_seed(0)
    cfg = model_config(size, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, **spec["overrides"])
    model = BiomedGPT(cfg).init_weights().train()
    if compile_enabled(cfg, torch.device("cpu")):
        apply_compile(model)
    v = cfg.vocab_size
    gen = torch.Generator().manual_seed(1)
    src = torch.randint(4, v, (batch, spec["src_len"]), generator=gen)
    prev = torch.randint(4, v, (batch, spec["tgt_len"]), generator=gen)
    images = torch.randn(batch, 3, px, px, generator=gen)
    masks = torch.ones(batch, dtype=torch.bool)

    def step() -> float:
        logits = model(src, prev, images, masks)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, v), prev.view(-1))
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    start = time.perf_counter()
    loss = step()
    warm = time.perf_counter() - start
    print(json.dumps({"ready": True, "first_step_s": warm, "loss": loss}), flush=True)
    _reset_peak()
    base = _rss("VmRSS")
    for line in sys.stdin:
        if line.strip() != "step":
            break
        start, cpu0 = time.perf_counter(), time.process_time()
        loss = step()
        print(json.dumps({"step_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu0, "loss": loss}),
              flush=True)
    print(json.dumps({"peak_MiB": _rss("VmHWM"), "base_MiB": base}), flush=True)


class _Worker:
    def __init__(self, spec: dict):
        env = dict(os.environ)
        self.proc = subprocess.Popen([sys.executable, "-m", "biomedgpt.tools.bench.step", "--worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"worker exited with status {self.proc.wait()}")
            if line.startswith("{"):
                return json.loads(line)

    def send(self, text: str) -> dict:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> dict:
        out = self.send("done")
        self.proc.wait()
        return out


def run_case(cfg: BenchStepConfig, case: str) -> list[dict]:
    rows = []
    workers = []
    for path in cfg.paths:  # warm up one at a time: compiling paths do not slow another's warm-up
        spec = {"case": case, "overrides": path_overrides(path), "src_len": cfg.src_len, "tgt_len": cfg.tgt_len,
                "threads": cfg.threads}
        worker = _Worker(spec)
        ready = worker.read()
        workers.append(worker)
        rows.append({"case": case, "path": path, "first_step_s": ready["first_step_s"], "times": [], "cpu_times": [],
                     "loss": ready["loss"]})
    for _ in range(cfg.repeats):
        for worker, row in zip(workers, rows):
            out = worker.send("step")
            row["times"].append(out["step_s"])
            row["cpu_times"].append(out["cpu_s"])
            row["loss"] = out["loss"]
    for worker, row in zip(workers, rows):
        row.update(worker.close())
        row["min_s"], row["median_s"] = min(row["times"]), statistics.median(row["times"])
        row["cpu_s"] = statistics.median(row["cpu_times"])
    return rows


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--worker":
        _worker(json.loads(sys.argv[2]))
        return 0
    from biomedgpt.core.config import parse_cli

    cfg = parse_cli(BenchStepConfig, argv)
    print(f"fp32 training step (forward + cross-entropy + backward), dropout 0, {cfg.src_len} source / "
          f"{cfg.tgt_len} target tokens, {cfg.repeats} alternating steps per path; ratio = median / eager median",
          flush=True)
    header = (f"{'case':<13}{'path':<34}{'min s':>8}{'median s':>10}{'ratio':>8}{'CPU s':>8}{'CPU ratio':>10}"
              f"{'first s':>9}{'peak MiB':>10}{'base MiB':>10}{'loss':>10}")
    print(header)
    results, ok = [], True
    for case in cfg.cases:
        rows = run_case(cfg, case)
        ref = next((r for r in rows if r["path"] == "eager"), rows[0])
        for r in rows:
            r["ratio"] = r["median_s"] / ref["median_s"]
            r["ratio_min"] = r["min_s"] / ref["min_s"]
            r["cpu_ratio"] = r["cpu_s"] / ref["cpu_s"]
            print(f"{case:<13}{r['path'][:33]:<34}{r['min_s']:>8.2f}{r['median_s']:>10.2f}{r['ratio']:>8.2f}"
                  f"{r['cpu_s']:>8.2f}{r['cpu_ratio']:>10.2f}{r['first_step_s']:>9.1f}{r['peak_MiB']:>10.0f}"
                  f"{r['base_MiB']:>10.0f}{r['loss']:>10.4f}", flush=True)
        results += rows
    print("json " + json.dumps(results))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
