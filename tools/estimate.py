"""Plan a run before launching it: memory per device, FLOPs and time per step, ZeRO communication per step.

    biomedgpt estimate --config demo                          # any run config or recipe, on 8 H100s (the default)
    biomedgpt estimate --config pretrain_xlarge gpu=A100 gpus_per_node=8 nodes=2 interconnect_gbps=50
    biomedgpt estimate model.size=xlarge deepspeed.zero_stage=3 deepspeed.precision=bf16 data.batch_size=16 \\
        data.patch_image_size=384 gpus_per_node=8 nodes=2
    biomedgpt estimate --config demo gpu=cpu gpus_per_node=2 measure=true   # and time real steps here

The settings are a run config's (``--config FILE|RECIPE`` and ``key=value`` overrides, exactly as for
``biomedgpt train``) plus the hardware of the plan below. Read from the run config: ``model.*``,
``data.batch_size`` (the micro-batch per rank), ``data.patch_image_size``, ``data.max_src_tokens`` /
``max_tgt_tokens``, ``optim.grad_accum``, ``deepspeed.zero_stage`` / ``offload_*`` / ``zero_init`` /
``precision`` / ``activation_checkpointing`` and ``data.sample_patch_num``; the rest of it is not used. Every sample
is counted with an image and full-length text (an upper bound).

``gpu`` names the device the plan assumes (printed with its peak): a GPU of the peak table
(``biomedgpt.engine.flops.GPU_PEAKS``) or ``cpu``, this machine's CPU with its matmul peak measured; any
other name needs ``peak_tflops``. ``measure=true`` also trains ``measure_steps`` real steps on this
machine's device, one rank: the trainer with the config's model, ZeRO stage and precision on synthetic
batches of the config's shape, and prints the measured time per step, its MFU against this device's peak
and the peak memory beside the estimate for one rank; on a CPU also the fp32 AdamW model states.

The arithmetic (and how model states and activations are counted): ``biomedgpt.engine.flops``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Literal, Optional

from biomedgpt.core.config import parse_cli, to_dict
from biomedgpt.engine.flops import (GPU_PEAKS, activation_memory, communication_bytes, image_tokens,
                                    model_state_memory, parameter_counts, train_step_flops)
from biomedgpt.engine.run_config import RunConfig
from biomedgpt.models.config import ModelSpec

GIB = 2 ** 30


@dataclass
class EstimateConfig(RunConfig):
    """A run config (any recipe) on the hardware of the plan."""

    # the device of the plan: a GPU of the peak table (H100, A100, ...) or cpu (this machine's, peak measured)
    gpu: str = "H100"
    peak_tflops: Optional[float] = None  # dense peak per device; overrides the table (any gpu name then)
    gpus_per_node: int = 8  # ranks (devices) per node
    nodes: int = 1  # nodes of the plan
    mfu: float = 0.4  # the model FLOPs utilisation assumed for the time per step
    interconnect_gbps: float = 100.0  # GB/s of collective bus bandwidth per device
    buffer_factor: float = 1.5  # DeepSpeed's additional_buffer_factor for CPU memory
    measure: bool = False  # also time real training steps of this config on this machine (one rank)
    measure_steps: int = 3  # timed optimizer steps with measure=true (after one untimed)
    output: Literal["text", "json"] = "text"  # a table, or one JSON object

    def __post_init__(self) -> None:
        super().__post_init__()  # the run config's own checks, as ``biomedgpt train`` makes them
        known = {name.lower(): name for name in GPU_PEAKS}
        if self.gpu.lower() == "cpu":
            self.gpu = "cpu"
        elif self.gpu.lower() in known:
            self.gpu = known[self.gpu.lower()]
            if self.peak_tflops is None and not GPU_PEAKS[self.gpu].get(self.deepspeed.precision):
                raise ValueError(f"the table has no {self.deepspeed.precision} peak for {self.gpu}; choose another "
                                 f"deepspeed.precision or set peak_tflops")
        elif self.peak_tflops is None:
            raise ValueError(f"unknown gpu {self.gpu!r}: valid are {', '.join(GPU_PEAKS)} and cpu (this machine's CPU, "
                             f"its peak measured); for another device also set peak_tflops")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ValueError(f"peak_tflops must be positive, got {self.peak_tflops}")
        if not 0.0 < self.mfu <= 1.0:
            raise ValueError(f"mfu must be in (0, 1], got {self.mfu}")
        for name in ("gpus_per_node", "nodes", "measure_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes


def plan_peak(cfg: EstimateConfig) -> tuple[float, str]:
    """(dense peak TFLOP/s per device, where it comes from) of the plan's device."""
    precision = cfg.deepspeed.precision
    if cfg.peak_tflops is not None:
        return cfg.peak_tflops, "peak_tflops"
    if cfg.gpu == "cpu":
        from biomedgpt.engine.flops import CPU_PEAK_BUDGET_S, measure_matmul_tflops
        from biomedgpt.models.precision import torch_dtype

        dtype = torch_dtype("fp32" if precision == "fp16" else precision)  # no fast fp16 matmul on CPUs
        return measure_matmul_tflops(dtype, device="cpu", budget_s=CPU_PEAK_BUDGET_S), "measured on this CPU"
    return GPU_PEAKS[cfg.gpu][precision], "table"


def estimate(cfg: EstimateConfig) -> dict:
    """Every figure of the plan, in bytes / FLOPs / seconds (GiB and TFLOP in the printed table)."""
    from biomedgpt.engine.distributed.zero import ZeroPlan

    model_cfg = cfg.model.build()
    ds, data = cfg.deepspeed, cfg.data
    params, largest = parameter_counts(model_cfg)
    offload_optimizer, offload_param = ds.offload_optimizer != "none", ds.offload_param != "none"
    plan = ZeroPlan.from_config(ds, cfg.world)
    zero_init = plan.builds_partitioned(model_cfg) if plan.partitions_params else True  # as the states formula reads it
    states = model_state_memory(params, largest, ds.zero_stage, ds.precision, cfg.gpus_per_node, cfg.nodes,
                                offload_optimizer, offload_param, zero_init, cfg.buffer_factor)
    activations = activation_memory(model_cfg, data.batch_size, data.max_src_tokens, data.max_tgt_tokens,
                                    data.patch_image_size, data.sample_patch_num, ds.precision,
                                    ds.activation_checkpointing)
    n_img = image_tokens(data.patch_image_size, sample_patch_num=data.sample_patch_num)
    hw = (data.patch_image_size, data.patch_image_size)
    flops_gpu = train_step_flops(model_cfg, data.batch_size, data.max_src_tokens, data.max_tgt_tokens, n_img,
                                 hw) * cfg.optim.grad_accum
    if ds.activation_checkpointing:
        flops_gpu *= 4 / 3  # one more forward in backward (hardware FLOPs; MFU counts 3 forwards)
    peak, peak_source = plan_peak(cfg)
    compute_s = flops_gpu / (cfg.mfu * peak * 1e12)
    comm = communication_bytes(params, ds.zero_stage, cfg.world, ds.precision, cfg.optim.grad_accum)
    comm_s = comm / (cfg.interconnect_gbps * 1e9)
    return {
        "gpu": cfg.gpu, "peak_tflops": peak, "peak_source": peak_source,
        "params": params, "largest_layer_params": largest, "world": cfg.world, "zero_init": zero_init,
        "param_bytes_per_gpu": states.params, "grad_bytes_per_gpu": states.grads,
        "optimizer_bytes_per_gpu": states.optimizer, "model_state_bytes_per_gpu": states.gpu_total,
        "activation_bytes_per_gpu": activations, "total_bytes_per_gpu": states.gpu_total + activations,
        "cpu_bytes_per_node": states.cpu_per_node,
        "flops_per_step_per_gpu": flops_gpu, "flops_per_step": flops_gpu * cfg.world,
        "samples_per_step": data.batch_size * cfg.optim.grad_accum * cfg.world,
        "compute_s_per_step": compute_s,
        "comm_bytes_per_step_per_gpu": comm, "comm_s_per_step": comm_s,
        "step_s": compute_s + comm_s,  # no overlap: an upper bound; full overlap gives max(compute, comm)
        "step_s_overlapped": max(compute_s, comm_s),
    }


_MEASURE_SCRIPT = """
import json, sys, torch
from biomedgpt.models.config import ModelSpec
from biomedgpt.models.ofa import BiomedGPT

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

warm = torch.nn.Parameter(torch.ones(8)); warm.grad = torch.ones(8); torch.optim.AdamW([warm]).step()
base = status("VmRSS")
model = BiomedGPT(ModelSpec(**json.loads(sys.argv[1])).build())
buffers = sum(b.numel() * b.element_size() for b in model.buffers())
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM): construction temporaries are not model states
for p in model.parameters():
    p.grad = torch.full_like(p, 1e-3)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
optimizer.step()
print(json.dumps({"steady": status("VmRSS") - base - buffers, "peak": status("VmHWM") - base - buffers,
                  "largest_tensor": max(p.numel() * p.element_size() for p in model.parameters())}))
"""


def measure_model_states(spec: ModelSpec) -> dict:
    """Resident bytes of fp32 AdamW model states (weights, gradients, two moments) of one model on this CPU.

    A fresh process with glibc's mmap threshold lowered, so every tensor is its own mapping and freed
    memory leaves the RSS at once; the model's non-persistent index buffers are subtracted. ``steady`` is
    the RSS after the first optimizer step, ``peak`` the high-water mark during gradients + that step
    (it adds AdamW's per-parameter temporaries, a few times the largest tensor).
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", _MEASURE_SCRIPT, json.dumps(asdict(spec))], capture_output=True,
                         text=True, timeout=900, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory measurement of {spec} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def synthetic_batch(cfg: RunConfig, vocab_size: int, seed: int = 0) -> dict:
    """One micro-batch in the DESIGN.md batch format at the config's nominal shape: ``data.batch_size``
    samples, each with a ``patch_image_size`` image, ``max_src_tokens`` source and ``max_tgt_tokens`` target
    tokens (random text ids between ``<s>`` = 0 and ``</s>`` = 2, no padding); with ``data.sample_patch_num``
    every sample's image keeps that many patches, as the pretraining image-text rows."""
    import torch

    d = cfg.data
    g = torch.Generator().manual_seed(seed)
    b, s, t, px = d.batch_size, d.max_src_tokens, d.max_tgt_tokens, d.patch_image_size
    src = torch.randint(4, vocab_size, (b, s), generator=g)
    src[:, 0], src[:, -1] = 0, 2
    target = torch.randint(4, vocab_size, (b, t), generator=g)
    target[:, -1] = 2
    prev = torch.cat([torch.zeros(b, 1, dtype=torch.long), target[:, :-1]], dim=1)
    images = torch.randint(0, 256, (b, 3, px, px), dtype=torch.uint8, generator=g)
    batch = {"src_tokens": src, "src_lengths": torch.full((b,), s), "prev_output_tokens": prev, "target": target,
             "patch_images": images.contiguous(memory_format=torch.channels_last),
             "patch_masks": torch.ones(b, dtype=torch.bool), "code_masks": torch.zeros(b, dtype=torch.bool),
             "conf": torch.ones(b), "task_ids": torch.zeros(b, dtype=torch.long),
             "ids": [f"synthetic-{i}" for i in range(b)]}
    if d.sample_patch_num is not None:
        batch["sample_patch_num"] = d.sample_patch_num
    return batch


def _measure_worker() -> None:
    """A fresh process (one rank): the trainer of the run config on synthetic batches; JSON on stdout."""
    import statistics
    import tempfile
    import time

    import psutil
    import torch

    from biomedgpt.engine.distributed.process_group import configure_environment

    configure_environment()  # before deepspeed is imported
    from biomedgpt.core.config import from_dict
    from biomedgpt.engine.flops import device_peak
    from biomedgpt.engine.train.trainer import Trainer

    request = json.loads(sys.stdin.read())
    data = request["config"]
    with tempfile.TemporaryDirectory(prefix="biomedgpt-estimate-") as out:
        data.update(output_dir=out, demo_data_dir=None)
        data["data"]["eval_streams"] = []
        data["optim"].update(max_steps=10 ** 6, max_epochs=None)
        data["eval"].update(at_end=False, interval=0)
        data["checkpoint"].update(interval=0, at_end=False, resume="never", init_from=None, background=False)
        data["log"].update(interval=10 ** 6, progress_bar=False, wandb_mode="disabled")
        data["watchdog"]["timeout_s"] = 0
        cfg = from_dict(RunConfig, data)
        before = psutil.Process().memory_info().rss
        trainer = Trainer(cfg, train_loader=[])
        batch = synthetic_batch(cfg, min(trainer.model_cfg.vocab_size, trainer.tokenizer.first_code_id))
        cuda = trainer.dist.device.type == "cuda"
        times = []
        for i in range(1 + request["steps"]):  # the first step (allocator, optimizer state) is not timed
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(cfg.optim.grad_accum):
                trainer.train_step(batch)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        if cuda:
            memory, kind = torch.cuda.max_memory_allocated(), "allocated on the GPU"
        else:
            with open("/proc/self/status") as f:
                peak_rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
            memory, kind = peak_rss - before, "resident, beyond the process before the trainer"
        peak = device_peak(cfg.deepspeed.precision, cfg.log.peak_tflops)
    print(json.dumps({"device": peak.name, "peak_tflops": peak.tflops, "peak_source": peak.source,
                      "step_s": statistics.median(times[1:]), "steps_s": times[1:], "first_step_s": times[0],
                      "peak_memory_bytes": memory, "memory_kind": kind}))


#: a launcher's settings, not passed on: the measurement is a one-rank job of its own
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def measure_step(cfg: EstimateConfig) -> dict:
    """Time real training steps of the run config on this machine's device (one rank, a fresh process)."""
    run = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(RunConfig)}
    request = {"config": to_dict(RunConfig(**run)), "steps": cfg.measure_steps}
    out = subprocess.run([sys.executable, "-c", "from biomedgpt.tools.estimate import _measure_worker; "
                          "_measure_worker()"], input=json.dumps(request), capture_output=True, text=True,
                         timeout=1800, env={k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES})
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the step measurement failed (exit status {out.returncode}): {last}")
    return json.loads(lines[-1])


def format_table(cfg: EstimateConfig, est: dict) -> str:
    def gib(key: str) -> str:
        return f"{est[key] / GIB:9.2f} GiB"

    spec, ds, data = cfg.model, cfg.deepspeed, cfg.data
    device = "device" if cfg.gpu == "cpu" else "GPU"
    others = ", ".join(name for name in [*GPU_PEAKS, "cpu"] if name != cfg.gpu)
    lines = [
        f"model {spec.size} {spec.custom_fields() or ''}: {est['params'] / 1e6:.2f}M parameters "
        f"(largest module {est['largest_layer_params'] / 1e6:.2f}M)",
        f"run: ZeRO-{ds.zero_stage}, {ds.precision}, offload optimizer={ds.offload_optimizer} "
        f"param={ds.offload_param}, micro-batch {data.batch_size} x accum {cfg.optim.grad_accum}, image "
        f"{data.patch_image_size}px, src {data.max_src_tokens} / tgt {data.max_tgt_tokens} tokens",
        f"assumed hardware: {cfg.nodes} node(s) x {cfg.gpus_per_node} {cfg.gpu}, peak {est['peak_tflops']:.4g} "
        f"TFLOP/s {ds.precision} per {device} ({est['peak_source']}); other devices: gpu={others}",
        f"  parameters     {gib('param_bytes_per_gpu')} per {device}",
        f"  gradients      {gib('grad_bytes_per_gpu')} per {device}",
        f"  optimizer      {gib('optimizer_bytes_per_gpu')} per {device}",
        f"  activations    {gib('activation_bytes_per_gpu')} per {device}"
        + (" (checkpointed)" if ds.activation_checkpointing else ""),
        f"  total          {gib('total_bytes_per_gpu')} per {device}",
        f"  CPU            {gib('cpu_bytes_per_node')} per node (DeepSpeed cold-start estimate)",
        f"  FLOPs per step {est['flops_per_step'] / 1e12:9.4g} TFLOP ({est['samples_per_step']} samples)",
        f"  compute        {est['compute_s_per_step']:9.4g} s per step at MFU {cfg.mfu} of {est['peak_tflops']:.4g} "
        f"TFLOP/s",
        f"  communication  {est['comm_bytes_per_step_per_gpu'] / GIB:9.2f} GiB per {device} per step = "
        f"{est['comm_s_per_step']:.4g} s at {cfg.interconnect_gbps} GB/s",
        f"  step time      {est['step_s_overlapped']:9.4g} s (overlapped) .. {est['step_s']:.4g} s (serial)",
    ]
    return "\n".join(lines)


def format_measurement(cfg: EstimateConfig, one_rank: dict, measured: dict) -> str:
    achieved = one_rank["flops_per_step_per_gpu"] / measured["step_s"] / 1e12
    return "\n".join([
        f"measured on this machine ({measured['device']}, one rank, {cfg.deepspeed.precision}, ZeRO-"
        f"{cfg.deepspeed.zero_stage}, median of {cfg.measure_steps} steps after one untimed):",
        f"  step time      {measured['step_s']:9.4g} s (first step {measured['first_step_s']:.4g} s) = "
        f"{achieved:.4g} TFLOP/s, MFU {achieved / measured['peak_tflops']:.3g} of {measured['peak_tflops']:.4g} "
        f"TFLOP/s ({measured['peak_source']})",
        f"  peak memory    {measured['peak_memory_bytes'] / GIB:9.2f} GiB {measured['memory_kind']}; estimate for one "
        f"rank {one_rank['total_bytes_per_gpu'] / GIB:.2f} GiB",
    ])


def main(argv: list[str] | None = None) -> int:
    cfg = parse_cli(EstimateConfig, argv, description=__doc__)
    est = estimate(cfg)
    lines = []
    if cfg.measure:
        try:
            est["measured_step"] = measure_step(cfg)
        except RuntimeError as exc:
            print(format_table(cfg, est) if cfg.output == "text" else json.dumps(est, indent=2))
            print(f"error: {exc}", file=sys.stderr)
            return 1
        one_rank = estimate(dataclasses.replace(cfg, gpus_per_node=1, nodes=1, peak_tflops=est["peak_tflops"]))
        lines.append(format_measurement(cfg, one_rank, est["measured_step"]))
        if est["measured_step"]["device"] == "cpu":
            expected = model_state_memory(est["params"], est["largest_layer_params"], 0, "fp32").gpu_total
            m = measure_model_states(cfg.model)
            est["measured_fp32_model_states"] = {**m, "estimated": expected, "steady_error": m["steady"] / expected - 1,
                                                 "peak_error": m["peak"] / expected - 1}
            lines.append(f"  fp32 AdamW model states on this CPU: steady {m['steady'] / GIB:.3f} GiB "
                         f"({m['steady'] / expected - 1:+.1%}), peak {m['peak'] / GIB:.3f} GiB "
                         f"({m['peak'] / expected - 1:+.1%}) vs estimated {expected / GIB:.3f} GiB")
    if cfg.output == "json":
        print(json.dumps(est, indent=2))
    else:
        print("\n".join([format_table(cfg, est), *lines]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
