"""Model FLOPs of a training step (for MFU) and the peak FLOP/s of the device.

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
MFU = train-step FLOPs / (step seconds * ranks * peak FLOP/s per device).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from biomedgpt.models.config import ModelConfig

IMAGE_FEATURES = 1024  # channels out of ResNet layer3


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
    """Training FLOPs of one micro-batch in the DESIGN.md batch format."""
    b, s = batch["src_tokens"].shape
    t = batch["prev_output_tokens"].shape[1]
    images = batch.get("patch_images")
    image_tokens, hw = 0, None
    if images is not None:
        h, w = images.shape[-2:]
        hw = (h, w)
        image_tokens = ((h + 15) // 16) * ((w + 15) // 16)
        if sample_patch_num is not None:
            image_tokens = min(image_tokens, sample_patch_num)
    return train_step_flops(cfg, b, s, t, image_tokens, hw)


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


def measure_matmul_tflops(dtype: torch.dtype = torch.float32, size: int = 1024, repeats: int = 5,
                          device: str = "cpu") -> float:
    """A quick matmul throughput measurement: the practical peak where no table entry fits (CPUs)."""
    import time

    generator = torch.Generator(device=device).manual_seed(0)  # leaves the training RNG streams alone
    a = torch.randn(size, size, dtype=dtype, device=device, generator=generator)
    b = torch.randn(size, size, dtype=dtype, device=device, generator=generator)
    torch.matmul(a, b)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(a, b)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / repeats
    return 2.0 * size ** 3 / seconds / 1e12


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
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and dtype == torch.float16:
        dtype = torch.float32
    return DevicePeak(name, measure_matmul_tflops(dtype, device=device), "measured")
