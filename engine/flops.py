"""The arithmetic of a training step: image tokens, model FLOPs (for MFU), memory of model states and
activations, ZeRO communication, and the peak FLOP/s of the device.

For a batch of B samples with L_img image tokens (after patch sampling), S source tokens, L = L_img + S
encoder tokens, T decoder tokens, images of H x W pixels, width d, FFN width f, vocabulary V:

  forward = B * [ encoder:  n_enc * (2L(4d² + 2df) + 4L²d + 2L²d)        projections, QKᵀ + AV, absolute bias
                            + 2L·2d² + 2·L_img·1024·d                     position q/k linears, image_proj
                  decoder:  n_dec * (2T(4d² + 2df) + 2T·2d² + 2L·2d²      self + FFN, cross q/out, cross k/v
                                     + 4T²d + 2T²d + 4TLd + 2TLd)          self/cross attention and biases
                            + 2T·3d² + 2L·d² + 2TdV                       position linears, output projection
                  resnet:   Σ_conv 2·C_in·C_out·k²·H_out·W_out ]
  train step = 3 * forward   (the backward pass costs twice the forward)

The matmul terms are the "6·N·tokens" rule written out per token type (encoder-only, decoder-only and
cross weights see different token counts); elementwise ops, norms and softmax are not counted, which
is the usual MFU convention (and what torch.utils.flop_counter counts).
MFU = train-step FLOPs / (step seconds * ranks * peak FLOP/s per device). The trainer's MFU and token
counts and the planner (``biomedgpt estimate``, the scaling tools) all use the functions here.

Memory. Model states (parameters, gradients, optimizer) follow DeepSpeed's own accounting, so the numbers agree
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

import math
from dataclasses import dataclass

import torch

from biomedgpt.engine.distributed.zero import ZeroPlan
from biomedgpt.models.config import ModelConfig
from biomedgpt.models.precision import torch_dtype

IMAGE_FEATURES = 1024  # channels out of ResNet layer3
PATCH_PIXELS = 16  # the ResNet's output stride: one image token per 16 x 16 pixels


def image_tokens(height: int, width: int | None = None, *, sample_patch_num: int | None = None) -> int:
    """Image tokens of one image: one per 16 x 16 patch of the ResNet's output grid, at most
    ``sample_patch_num`` (patch sampling)."""
    width = height if width is None else width
    if height <= 0 or width <= 0:
        return 0
    grid = ((height + PATCH_PIXELS - 1) // PATCH_PIXELS) * ((width + PATCH_PIXELS - 1) // PATCH_PIXELS)
    return grid if sample_patch_num is None else min(grid, sample_patch_num)


def resnet_flops(layers: list[int], height: int, width: int) -> float:
    """Forward FLOPs of the stem + layer1..3 (bottleneck, expansion 4) on one image."""
    def conv(c_in: int, c_out: int, k: int, h: int, w: int) -> float:
        return 2.0 * c_in * c_out * k * k * h * w

    h, w = (height + 1) // 2, (width + 1) // 2  # 7x7 stride-2 stem
    total = conv(3, 64, 7, h, w)
    h, w = (h + 1) // 2, (w + 1) // 2  # 3x3 stride-2 max pool
    inplanes = 64
    for index, (planes, blocks) in enumerate(zip((64, 128, 256), layers)):
        for j in range(blocks):
            stride = 2 if index > 0 and j == 0 else 1
            h_out, w_out = (h + stride - 1) // stride, (w + stride - 1) // stride
            total += conv(inplanes, planes, 1, h, w)  # conv1 at the input resolution
            total += conv(planes, planes, 3, h_out, w_out)  # conv2 carries the stride
            total += conv(planes, planes * 4, 1, h_out, w_out)
            if j == 0:
                total += conv(inplanes, planes * 4, 1, h_out, w_out)  # downsample
            inplanes, h, w = planes * 4, h_out, w_out
    return total


def forward_flops(cfg: ModelConfig, batch: int, src_len: int, tgt_len: int, image_tokens: int = 0,
                  image_hw: tuple[int, int] | None = None) -> float:
    """Forward FLOPs of one batch (see the module docstring for the formula)."""
    d, f, V = cfg.d_model, cfg.ffn_dim, cfg.vocab_size
    L, T = image_tokens + src_len, tgt_len
    enc_layer = 2 * L * (4 * d * d + 2 * d * f) + 6 * L * L * d
    encoder = cfg.encoder_layers * enc_layer + 2 * L * 2 * d * d + 2 * image_tokens * IMAGE_FEATURES * d
    dec_layer = (2 * T * (4 * d * d + 2 * d * f) + 2 * T * 2 * d * d + 2 * L * 2 * d * d
                 + 6 * T * T * d + 6 * T * L * d)
    decoder = cfg.decoder_layers * dec_layer + 2 * T * 3 * d * d + 2 * L * d * d + 2 * T * d * V
    images = resnet_flops(cfg.resnet_layers, *image_hw) if image_hw is not None else 0.0
    return float(batch) * (encoder + decoder + images)


def train_step_flops(cfg: ModelConfig, batch: int, src_len: int, tgt_len: int, image_tokens: int = 0,
                     image_hw: tuple[int, int] | None = None) -> float:
    return 3.0 * forward_flops(cfg, batch, src_len, tgt_len, image_tokens, image_hw)


def batch_train_flops(cfg: ModelConfig, batch: dict, sample_patch_num: int | None) -> float:
    """Training FLOPs of one micro-batch in the DESIGN.md batch format. Only samples with an image
    (``patch_masks``) count the ResNet and image tokens: a text-only sample's zero image is never run."""
    b, s = batch["src_tokens"].shape
    t = batch["prev_output_tokens"].shape[1]
    images = batch.get("patch_images")
    if images is None:
        return train_step_flops(cfg, b, s, t)
    masks = batch.get("patch_masks")
    with_image = b if masks is None else int(masks.sum())
    hw = (images.shape[-2], images.shape[-1])
    n_img = image_tokens(*hw, sample_patch_num=sample_patch_num)
    return train_step_flops(cfg, with_image, s, t, n_img, hw) + train_step_flops(cfg, b - with_image, s, t)


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
    plan = ZeroPlan(stage, world, precision)
    # ranks sharing each state: the optimizer state from ZeRO-1, the gradients from ZeRO-2, the weights at ZeRO-3
    optim_part, grad_part = world if plan.partitions_optimizer_state else 1, world if plan.partitions_gradients else 1
    weight_part = world if plan.partitions_params else 1

    weight_b = 2 if mixed else 4
    if mixed:  # 16-bit gradients partitioned from ZeRO-2 (only bucket-sized at ZeRO-3), fp32 copies from ZeRO-1
        grad_b = (0 if plan.partitions_params else 2 / grad_part) + 4 / optim_part
    else:
        grad_b = 4 / grad_part
    optim_b = (4 + 8 if mixed else 8) / optim_part  # fp32 master weights (mixed only) + exp_avg, exp_avg_sq
    gather = 4 * largest_layer if plan.partitions_params else 0
    on_gpu_weights = 0.0 if offload_param else params * weight_b / weight_part
    grads, optimizer = (0.0, 0.0) if offload_optimizer else (params * grad_b, params * optim_b)
    if plan.partitions_params:
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


def element_size(precision: str) -> int:
    return 4 if precision == "fp32" else 2


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
    """Bytes of activations kept for the backward pass of one micro-batch (see "Memory" in the module docstring)."""
    e = element_size(precision)
    d, f, heads, vocab = cfg.d_model, cfg.ffn_dim, cfg.heads, cfg.vocab_size
    n_img = image_tokens(image_size, sample_patch_num=sample_patch_num)
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
    one = params * element_size(precision) * (world - 1) / world  # one reduce-scatter or all-gather
    plan = ZeroPlan(stage, world, precision)
    if plan.partitions_params:
        return 3 * one * grad_accum
    if plan.partitions_gradients:
        return one * (grad_accum + 1)
    return 2 * one


@dataclass
class DevicePeak:
    name: str
    tflops: float  # dense peak per device at the run's precision
    source: str  # "table", "config" or "measured"


#: Dense peak TFLOP/s per GPU (bf16/fp16 tensor cores, fp32 = TF32 tensor cores where they exist).
GPU_PEAKS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "A6000": {"bf16": 154.8, "fp16": 154.8, "fp32": 38.7},
    "A5000": {"bf16": 111.1, "fp16": 111.1, "fp32": 27.8},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6},
    "V100": {"bf16": 0.0, "fp16": 125.0, "fp32": 15.7},
}


#: seconds a CPU's peak measurement may take at start-up (measure_matmul_tflops)
CPU_PEAK_BUDGET_S = 0.5


def measure_matmul_tflops(dtype: torch.dtype = torch.float32, size: int = 1024, repeats: int = 5,
                          device: str = "cpu", budget_s: float | None = None) -> float:
    """A quick matmul throughput measurement: the practical peak where no table entry fits (CPUs).

    With a ``budget_s`` a small product is timed first, and the side halves from ``size`` until ``repeats``
    products fit in ``budget_s`` at that rate: a dtype the device emulates slowly (bf16 on a CPU without bf16
    instructions, ~1 GFLOP/s) then costs about ``budget_s`` at start-up, not the ~20 s per rank of ``size``
    1024, and a fast device is measured at the full ``size``. (Not for GPUs: a small product there times the
    kernel launch, not the arithmetic.)"""
    import time

    def timed_product(side: int, count: int) -> float:
        """Seconds per ``side``-square product, the mean of ``count`` after a warm-up one."""
        a = torch.randn(side, side, dtype=dtype, device=device, generator=generator)
        b = torch.randn(side, side, dtype=dtype, device=device, generator=generator)
        torch.matmul(a, b)  # warm-up: kernel selection, first-touch of the output
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(count):
            torch.matmul(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / count

    generator = torch.Generator(device=device).manual_seed(0)  # leaves the training RNG streams alone
    if budget_s is not None:
        probe = min(size, 128)
        rate = 2.0 * probe ** 3 / max(timed_product(probe, 1), 1e-9)  # FLOP/s
        while size > probe and repeats * 2.0 * size ** 3 / rate > budget_s:
            size //= 2
    return 2.0 * size ** 3 / timed_product(size, repeats) / 1e12


def device_peak(precision: str, override_tflops: float | None = None) -> DevicePeak:
    """Peak FLOP/s of this rank's device: the config's value, the GPU table, or a CPU matmul measurement."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
    else:
        name = "cpu"
    if override_tflops is not None:
        return DevicePeak(name, override_tflops, "config")
    for key, peaks in GPU_PEAKS.items():
        if key in name and peaks.get(precision):
            return DevicePeak(name, peaks[precision], "table")
    dtype = torch_dtype(precision)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and dtype == torch.float16:
        dtype = torch.float32
    budget_s = CPU_PEAK_BUDGET_S if device == "cpu" else None
    return DevicePeak(name, measure_matmul_tflops(dtype, device=device, budget_s=budget_s), "measured")
