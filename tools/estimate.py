"""Plan a run before launching it: memory per GPU, FLOPs and time per step, ZeRO communication per step.

    python -m biomedgpt.tools.estimate model.size=xlarge zero_stage=3 gpus_per_node=8 nodes=2 micro_batch=16 \
        image_size=384 precision=bf16 mfu=0.4 gpu=H100 interconnect_gbps=50
    python -m biomedgpt.tools.estimate model.size=base precision=fp32 zero_stage=0 gpus_per_node=1 measure=true

The arithmetic (and how model states and activations are counted): ``biomedgpt.engine.flops``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional


from biomedgpt.engine.config import from_dict, parse_cli
from biomedgpt.engine.flops import (activation_memory, communication_bytes, image_tokens, model_state_memory,
                                    parameter_counts, table_peak_tflops, train_step_flops)
from biomedgpt.engine.run_config import Precision
from biomedgpt.models.config import ModelSpec

GIB = 2 ** 30


@dataclass
class EstimateConfig:
    """One hypothetical run: model, ZeRO layout, batch shape, hardware."""

    model: ModelSpec = field(default_factory=ModelSpec)
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_param: bool = False  # ZeRO-3 only
    zero_init: bool = True  # ZeRO-3: build under zero.Init (no full model per process in CPU memory)
    precision: Precision = "bf16"
    gpus_per_node: int = 8
    nodes: int = 1
    micro_batch: int = 8  # samples per GPU per forward
    grad_accum: int = 1
    image_size: int = 256  # 0: text-only batches
    src_len: int = 80
    tgt_len: int = 30
    sample_patch_num: Optional[int] = None
    activation_checkpointing: bool = False
    gpu: str = "H100"  # a key of biomedgpt.engine.flops.GPU_PEAKS
    peak_tflops: Optional[float] = None  # per GPU; overrides the table
    mfu: float = 0.4
    interconnect_gbps: float = 100.0  # GB/s of collective bus bandwidth per GPU
    buffer_factor: float = 1.5  # DeepSpeed's additional_buffer_factor for CPU memory
    measure: bool = False  # also measure fp32 AdamW model states of this model on this CPU
    output: Literal["text", "json"] = "text"

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.offload_param and self.zero_stage != 3:
            raise ValueError("offload_param needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1")
        if not 0.0 < self.mfu <= 1.0:
            raise ValueError(f"mfu must be in (0, 1], got {self.mfu}")
        for name in ("gpus_per_node", "nodes", "micro_batch", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes


def estimate(cfg: EstimateConfig) -> dict:
    """Every figure of the plan, in bytes / FLOPs / seconds (GiB and TFLOP in the printed table)."""
    model_cfg = cfg.model.build()
    params, largest = parameter_counts(model_cfg)
    states = model_state_memory(params, largest, cfg.zero_stage, cfg.precision, cfg.gpus_per_node, cfg.nodes,
                                cfg.offload_optimizer, cfg.offload_param, cfg.zero_init, cfg.buffer_factor)
    activations = activation_memory(model_cfg, cfg.micro_batch, cfg.src_len, cfg.tgt_len, cfg.image_size,
                                    cfg.sample_patch_num, cfg.precision, cfg.activation_checkpointing)
    n_img = image_tokens(cfg.image_size, sample_patch_num=cfg.sample_patch_num)
    hw = (cfg.image_size, cfg.image_size) if cfg.image_size > 0 else None
    flops_gpu = train_step_flops(model_cfg, cfg.micro_batch, cfg.src_len, cfg.tgt_len, n_img, hw) * cfg.grad_accum
    if cfg.activation_checkpointing:
        flops_gpu *= 4 / 3  # one more forward in backward (hardware FLOPs; MFU counts 3 forwards)
    peak = table_peak_tflops(cfg.gpu, cfg.precision, cfg.peak_tflops)
    compute_s = flops_gpu / (cfg.mfu * peak * 1e12)
    comm = communication_bytes(params, cfg.zero_stage, cfg.world, cfg.precision, cfg.grad_accum)
    comm_s = comm / (cfg.interconnect_gbps * 1e9)
    return {
        "params": params, "largest_layer_params": largest, "world": cfg.world,
        "param_bytes_per_gpu": states.params, "grad_bytes_per_gpu": states.grads,
        "optimizer_bytes_per_gpu": states.optimizer, "model_state_bytes_per_gpu": states.gpu_total,
        "activation_bytes_per_gpu": activations, "total_bytes_per_gpu": states.gpu_total + activations,
        "cpu_bytes_per_node": states.cpu_per_node,
        "flops_per_step_per_gpu": flops_gpu, "flops_per_step": flops_gpu * cfg.world,
        "samples_per_step": cfg.micro_batch * cfg.grad_accum * cfg.world,
        "peak_tflops": peak, "compute_s_per_step": compute_s,
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


def format_table(cfg: EstimateConfig, est: dict) -> str:
    def gib(key: str) -> str:
        return f"{est[key] / GIB:9.2f} GiB"

    spec = cfg.model
    lines = [
        f"model {spec.size} {spec.set_fields() or ''}: {est['params'] / 1e6:.2f}M parameters "
        f"(largest module {est['largest_layer_params'] / 1e6:.2f}M)",
        f"ZeRO-{cfg.zero_stage}, {cfg.precision}, offload optimizer={cfg.offload_optimizer} param={cfg.offload_param}, "
        f"{cfg.nodes} node(s) x {cfg.gpus_per_node} GPU(s) {cfg.gpu}, micro-batch {cfg.micro_batch} x accum "
        f"{cfg.grad_accum}, image {cfg.image_size}px, src {cfg.src_len} / tgt {cfg.tgt_len} tokens",
        f"  parameters     {gib('param_bytes_per_gpu')} per GPU",
        f"  gradients      {gib('grad_bytes_per_gpu')} per GPU",
        f"  optimizer      {gib('optimizer_bytes_per_gpu')} per GPU",
        f"  activations    {gib('activation_bytes_per_gpu')} per GPU"
        + (" (checkpointed)" if cfg.activation_checkpointing else ""),
        f"  total          {gib('total_bytes_per_gpu')} per GPU",
        f"  CPU            {gib('cpu_bytes_per_node')} per node (DeepSpeed cold-start estimate)",
        f"  FLOPs per step {est['flops_per_step'] / 1e12:9.2f} TFLOP ({est['samples_per_step']} samples)",
        f"  compute        {est['compute_s_per_step']:9.3f} s per step at MFU {cfg.mfu} of {est['peak_tflops']} TFLOP/s",
        f"  communication  {est['comm_bytes_per_step_per_gpu'] / GIB:9.2f} GiB per GPU per step = "
        f"{est['comm_s_per_step']:.3f} s at {cfg.interconnect_gbps} GB/s",
        f"  step time      {est['step_s_overlapped']:9.3f} s (overlapped) .. {est['step_s']:.3f} s (serial)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_cli(EstimateConfig, argv, description=__doc__)
    est = estimate(cfg)
    if cfg.measure:
        fp32 = from_dict(EstimateConfig, {**asdict(cfg), "precision": "fp32", "zero_stage": 0, "nodes": 1,
                                          "gpus_per_node": 1, "offload_optimizer": False, "offload_param": False,
                                          "measure": False})
        expected = estimate(fp32)["model_state_bytes_per_gpu"]
        measured = measure_model_states(cfg.model)
        est["measured_fp32_model_states"] = {**measured, "estimated": expected,
                                             "steady_error": measured["steady"] / expected - 1,
                                             "peak_error": measured["peak"] / expected - 1}
    if cfg.output == "json":
        print(json.dumps(est, indent=2))
    else:
        print(format_table(cfg, est))
        if cfg.measure:
            m = est["measured_fp32_model_states"]
            print(f"  measured fp32 AdamW model states on this CPU: steady {m['steady'] / GIB:.3f} GiB "
                  f"({m['steady_error']:+.1%}), peak {m['peak'] / GIB:.3f} GiB ({m['peak_error']:+.1%}) vs "
                  f"estimated {m['estimated'] / GIB:.3f} GiB")
    return est


if __name__ == "__main__":
    main()
