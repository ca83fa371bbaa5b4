"""GPU checks (``pytest -m gpu``; ``scripts/gpu_check.sh`` runs them): FlexAttention forward and backward
against eager in bf16 and fp32, bf16 training steps with ZeRO-3, the fused kernels' memory at 900 + 80
tokens. Every test skips with its reason where there is no CUDA device."""
from __future__ import annotations

import os
import socket

import pytest
import torch

from biomedgpt.models.config import model_config
from biomedgpt.models.ofa import BiomedGPT

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (GPU check)")]

SMALL = dict(encoder_layers=2, decoder_layers=2, vocab_size=1000, dropout=0.0)


def _batch(device, b=4, px=64, s=12, t=9):
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, 1000, (b, s), generator=g)
    src[1, 8:] = 1
    prev = torch.randint(4, 1000, (b, t), generator=g)
    prev[2, 6:] = 1
    return {k: v.to(device) for k, v in dict(
        src_tokens=src, prev_output_tokens=prev, patch_images=torch.randn(b, 3, px, px, generator=g),
        patch_masks=torch.tensor([True, False, True, True][:b])).items()}


def _grads(backend: str, dtype: torch.dtype, **overrides) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(0)
    model = BiomedGPT(model_config("tiny", attention_backend=backend, **{**SMALL, **overrides})).init_weights().cuda().train()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "rel_pos_table" in name:
                param.normal_(0.0, 0.5)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = model(**_batch("cuda"))
    out.float().square().mean().backward()
    return out.float().detach(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-3)])
def test_flex_forward_backward_matches_eager(dtype, tol):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ref_out, ref_grads = _grads("eager", dtype)
    out, grads = _grads("flex", dtype)
    scale = ref_out.abs().max().item()
    assert (out - ref_out).abs().max().item() <= tol * max(1.0, scale)
    for name, ref in ref_grads.items():
        err = (grads[name] - ref).norm().item()
        assert err <= tol * ref.norm().item() + tol * 1e-2, (name, err, ref.norm().item())


def test_bf16_zero3_training_steps():
    deepspeed = pytest.importorskip("deepspeed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.manual_seed(0)
    model = BiomedGPT(model_config("tiny", **SMALL)).init_weights()
    ds_config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
                 "zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    batch = _batch(engine.device)
    losses = []
    for _ in range(4):
        logits = engine(**batch)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch["prev_output_tokens"].flatten())
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses


@pytest.mark.parametrize("backend", ["flex", "sdpa"])
def test_fused_kernel_memory_at_900_plus_80_tokens(backend):
    """Attention of 900 image + 80 text tokens (480 px): the fused backends keep no [B, H, L, L] score tensor
    for the backward, so a training step's peak stays well under eager's."""
    def peak(name: str) -> float:
        torch.manual_seed(0)
        model = BiomedGPT(model_config("tiny", attention_backend=name, **SMALL)).init_weights().cuda().train()
        batch = _batch("cuda", b=4, px=480, s=80, t=20)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(**batch)
        out.float().square().mean().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20

    eager, fused = peak("eager"), peak(backend)
    lxl = 4 * model_config("tiny").heads * 980 ** 2 * 4 / 2**20  # one fp32 [B, H, L, L] per layer
    assert fused <= eager - lxl, (backend, fused, eager, lxl)
