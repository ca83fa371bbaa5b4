"""Plan a run before launching it: memory per GPU, FLOPs and time per step, ZeRO communication per step.

    python -m biomedgpt.tools.estimate model.size=xlarge zero_stage=3 gpus_per_node=8 nodes=2 micro_batch=16 \
        image_size=384 precision=bf16 mfu=0.4 gpu=H100 interconnect_gbps=50
    python -m biomedgpt.tools.estimate model.size=base precision=fp32 zero_stage=0 gpus_per_node=1 measure=true

Model states (parameters, gradients, optimizer) follow DeepSpeed's own accounting, so the numbers agree
with ``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs`` for the same
settings. Mixed precision (bf16/fp16) keeps per parameter 2 bytes of 16-bit weights, 2 of 16-bit
gradients, 4 of fp32 gradients, 4 of fp32 master weights and 8 of Adam moments (DeepSpeed's "2 + 18");
fp32 keeps 4 + 4 + 8. ZeRO-1 partitions the optimizer states and fp32 gradients over the ranks, ZeRO-2 the 16-bit
gradients too (DeepSpeed's estimator has the stage-2 formula for both stages, so at stage 1 it counts
2 bytes per parameter less than are really held), ZeRO-3 partitions the weights too, reduces gradients through bucket-sized 16-bit buffers straight into the
fp32 partition (no full 16-bit gradient copy) and gathers the largest layer (4 bytes per parameter).
CPU memory per node uses DeepSpeed's cold-start formula with its ``additional_buffer_factor``.

Activation memory is an analytic estimate (Korthikanti et al. 2022, "Reducing Activation Recomputation",
generalised to the element size and to OFA's encoder, decoder cross-attention, output logits and ResNet
stem); it ignores allocator fragmentation and temporary buffers, so treat it as a lower bound.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

import torch

from biomedgpt.engine.config import from_dict, parse_cli
from biomedgpt.engine.flops import GPU_PEAKS, train_step_flops
from biomedgpt.engine.run_config import Precision
from biomedgpt.models.config import ModelConfig, ModelSpec

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


def parameter_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(total parameters, parameters of the largest single module) without allocating any weights.

    The largest module is counted the way DeepSpeed's ``model_to_params`` does (own parameters only);
    it is what ZeRO-3 gathers at once.
    """
    from biomedgpt.models.ofa import BiomedGPT, count_parameters

    with torch.device("meta"):
        model = BiomedGPT(cfg)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return count_parameters(model), largest


@dataclass
class ModelStates:
    """Bytes of model states per GPU and per node's CPU."""

    params: float  # weights on the GPU (16-bit in mixed precision) incl. ZeRO-3's gathered layer
    grads: float  # gradients on the GPU (16-bit and, in mixed precision, fp32 copies)
    optimizer: float  # Adam moments (+ fp32 master weights in mixed precision) on the GPU
    cpu_per_node: float

    @property
    def gpu_total(self) -> float:
        return self.params + self.grads + self.optimizer


def model_state_memory(params: int, largest_layer: int, stage: int, precision: str, gpus_per_node: int = 1,
                       nodes: int = 1, offload_optimizer: bool = False, offload_param: bool = False,
                       zero_init: bool = True, buffer_factor: float = 1.5) -> ModelStates:
    world = gpus_per_node * nodes
    mixed = precision != "fp32"

    def part(from_stage: int) -> int:  # ranks sharing a state that ZeRO partitions from this stage on
        return world if stage >= from_stage else 1

    weight_b = 2 if mixed else 4
    if mixed:  # 16-bit gradients partitioned from ZeRO-2 (only bucket-sized at ZeRO-3), fp32 copies from ZeRO-1
        grad_b = (2 / part(2) if stage < 3 else 0) + 4 / part(1)
    else:
        grad_b = 4 / part(2)
    optim_b = (4 + 8 if mixed else 8) / part(1)  # fp32 master weights (mixed only) + exp_avg, exp_avg_sq
    gather = 4 * largest_layer if stage == 3 else 0
    on_gpu_weights = 0.0 if offload_param else params * weight_b / part(3)
    grads, optimizer = (0.0, 0.0) if offload_optimizer else (params * grad_b, params * optim_b)
    if stage == 3:
        if offload_optimizer:
            states = 18 if offload_param else 16
            per_node = params * (states / nodes if zero_init else max(4 * gpus_per_node, states / nodes))
        else:
            per_node = (largest_layer if zero_init else params) * 4 * gpus_per_node
    elif offload_optimizer:
        per_node = params * max(4 * world, 16)
    else:
        per_node = params * 4 * gpus_per_node
    return ModelStates(params=math.floor(on_gpu_weights) + gather, grads=grads, optimizer=optimizer,
                       cpu_per_node=per_node * buffer_factor)


def _element_size(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def image_tokens(image_size: int, sample_patch_num: int | None) -> int:
    if image_size <= 0:
        return 0
    grid = ((image_size + 15) // 16) ** 2
    return grid if sample_patch_num is None else min(grid, sample_patch_num)


def resnet_activation_elements(layers: list[int], size: int) -> float:
    """Elements saved for backward by the stem + bottleneck stages on one image (conv, BN and ReLU outputs)."""
    h = (size + 1) // 2
    total = 3.0 * 64 * h * h + 64 * h * h  # stem conv/BN/ReLU, max-pool input
    h = (h + 1) // 2
    inplanes = 64
    for index, (planes, blocks) in enumerate(zip((64, 128, 256), layers)):
        for j in range(blocks):
            h_out = (h + 1) // 2 if index > 0 and j == 0 else h
            block = inplanes * h * h + 3 * planes * h * h + 3 * planes * h_out * h_out + 3 * 4 * planes * h_out ** 2
            if j == 0:
                block += 2 * 4 * planes * h_out * h_out  # downsample conv + BN
            total += block
            inplanes, h = planes * 4, h_out
    return total


def activation_memory(cfg: ModelConfig, micro_batch: int, src_len: int, tgt_len: int, image_size: int,
                      sample_patch_num: int | None, precision: str, checkpointing: bool) -> float:
    """Bytes of activations kept for the backward pass of one micro-batch (see the module docstring)."""
    e = _element_size(precision)
    d, f, heads, vocab = cfg.d_model, cfg.ffn_dim, cfg.heads, cfg.vocab_size
    n_img = image_tokens(image_size, sample_patch_num)
    enc_len, dec_len = src_len + n_img, tgt_len
    stores_probs = cfg.attention_backend == "eager"  # fused kernels recompute the probabilities

    def attention(q: int, kv: int) -> float:
        # LN input, Q, K, V and output-projection input, residual dropout mask; probabilities (eager)
        return e * (4 * q * d + 2 * kv * d) + q * d + (e * heads * q * kv if stores_probs else 0)

    def ffn(n: int) -> float:
        return e * (2 * n * d + 2 * n * f) + n * d

    enc_layer = attention(enc_len, enc_len) + ffn(enc_len)
    dec_layer = attention(dec_len, dec_len) + attention(dec_len, enc_len) + ffn(dec_len)
    layer_inputs = e * d * (enc_len * cfg.encoder_layers + dec_len * cfg.decoder_layers)
    if checkpointing:  # keep each layer's input, recompute one layer at a time in backward
        layers = layer_inputs + max(enc_layer, dec_layer)
    else:
        layers = cfg.encoder_layers * enc_layer + cfg.decoder_layers * dec_layer
    logits = 2 * e * dec_len * vocab  # logits and the log-probabilities of the loss
    embeddings = 2 * e * d * (enc_len + dec_len)
    images = e * resnet_activation_elements(cfg.resnet_layers, image_size) if image_size > 0 else 0.0
    return float(micro_batch) * (layers + logits + embeddings + images)


def communication_bytes(params: int, stage: int, world: int, precision: str, grad_accum: int) -> float:
    """Bytes each GPU sends per optimizer step in ring collectives (all-reduce = 2x a reduce-scatter).

    ZeRO-0: one gradient all-reduce. ZeRO-1: reduce-scatter of gradients + all-gather of updated weights.
    ZeRO-2: gradients reduce-scattered every micro-batch + one weight all-gather. ZeRO-3: every
    micro-batch all-gathers the weights twice (forward and backward) and reduce-scatters the gradients.
    """
    if world == 1:
        return 0.0
    one = params * _element_size(precision) * (world - 1) / world  # one reduce-scatter or all-gather
    return {0: 2 * one, 1: 2 * one, 2: one * (grad_accum + 1), 3: 3 * one * grad_accum}[stage]


def peak_tflops(cfg: EstimateConfig) -> float:
    if cfg.peak_tflops is not None:
        return cfg.peak_tflops
    if cfg.gpu not in GPU_PEAKS:
        raise ValueError(f"unknown gpu {cfg.gpu!r}; known: {sorted(GPU_PEAKS)} (or set peak_tflops)")
    return GPU_PEAKS[cfg.gpu][cfg.precision]


def estimate(cfg: EstimateConfig) -> dict:
    """Every figure of the plan, in bytes / FLOPs / seconds (GiB and TFLOP in the printed table)."""
    model_cfg = cfg.model.build()
    params, largest = parameter_counts(model_cfg)
    states = model_state_memory(params, largest, cfg.zero_stage, cfg.precision, cfg.gpus_per_node, cfg.nodes,
                                cfg.offload_optimizer, cfg.offload_param, cfg.zero_init, cfg.buffer_factor)
    activations = activation_memory(model_cfg, cfg.micro_batch, cfg.src_len, cfg.tgt_len, cfg.image_size,
                                    cfg.sample_patch_num, cfg.precision, cfg.activation_checkpointing)
    n_img = image_tokens(cfg.image_size, cfg.sample_patch_num)
    hw = (cfg.image_size, cfg.image_size) if cfg.image_size > 0 else None
    flops_gpu = train_step_flops(model_cfg, cfg.micro_batch, cfg.src_len, cfg.tgt_len, n_img, hw) * cfg.grad_accum
    if cfg.activation_checkpointing:
        flops_gpu *= 4 / 3  # one more forward in backward (hardware FLOPs; MFU counts 3 forwards)
    peak = peak_tflops(cfg)
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
