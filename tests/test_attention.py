"""Attention backends: parity of sdpa / flex with the eager reference, the rotary scheme, activation
checkpointing with every backend, the flash fallback, and attention memory at base size (CPU)."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from engine.model_setup import apply_activation_checkpointing
from models import attention
from models.checkpoint import import_released
from models.config import model_config
from models.ofa import BiomedGPT
from tools import bench_attention

SMALL = dict(d_model=64, ffn_dim=128, encoder_layers=2, decoder_layers=2, heads=4, resnet_layers=[1, 1, 1],
             vocab_size=300, dropout=0.0)
TOL = dict(rtol=0.0, atol=1e-5)


def build(backend: str, scheme: str = "ofa", **overrides) -> BiomedGPT:
    torch.manual_seed(0)
    model = BiomedGPT(model_config("tiny", attention_backend=backend, position_scheme=scheme, **{**SMALL, **overrides}))
    with torch.no_grad():  # OFA initialises the relative tables to zero: make them matter
        for name, param in model.named_parameters():
            if "rel_pos_table" in name:
                param.normal_(0.0, 0.5)
    return model


def mixed_batch(codes: bool) -> dict:
    """Image+text and text-only samples, padded sources and targets; optionally image-code targets."""
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, 300, (4, 12), generator=g)
    src[1, 8:] = 1
    src[3, 5:] = 1
    prev = torch.randint(4, 300, (4, 9), generator=g)
    prev[2, 6:] = 1
    return dict(src_tokens=src, prev_output_tokens=prev, patch_images=torch.randn(4, 3, 64, 64, generator=g),
                patch_masks=torch.tensor([True, False, True, True]),
                code_masks=torch.tensor([False, True, False, True]) if codes else None)


def forward_backward(model: BiomedGPT, batch: dict) -> tuple[torch.Tensor, dict]:
    out = model(**batch)
    out.square().mean().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("scheme", ["ofa", "rope"])
@pytest.mark.parametrize("codes", [False, True])
def test_sdpa_matches_eager_forward_and_gradients(scheme, codes):
    batch = mixed_batch(codes)
    ref_out, ref_grads = forward_backward(build("eager", scheme).train(), batch)
    out, grads = forward_backward(build("sdpa", scheme).train(), batch)
    torch.testing.assert_close(out, ref_out, **TOL)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **TOL, msg=name)


def test_flex_forward_matches_eager():
    batch = mixed_batch(codes=True)
    with torch.no_grad():
        ref = build("eager").eval()(**batch)
        out = build("flex").eval()(**batch)
    torch.testing.assert_close(out, ref, **TOL)


def test_flex_refuses_cpu_training_with_a_clear_error():
    model = build("flex").train()
    with pytest.raises(RuntimeError, match="no CPU backward"):
        model(**mixed_batch(codes=False))


@pytest.mark.parametrize("backend", ["flex", "flash"])
def test_fixture_parity_with_fused_backends(shared_dir, backend):
    if backend == "flash" and not attention.flash_attn_available():
        pytest.skip("flash-attn is not installed here: the flash backend resolves to sdpa (covered by test_model)")
    data = torch.load(shared_dir / "fixtures/ofa_parity_mini.pt", weights_only=True)
    inputs = data["inputs"]
    with torch.no_grad():
        ref = import_released(shared_dir / "fixtures/ofa_parity_mini.pt", attention_backend="eager").eval()(**inputs)
        out = import_released(shared_dir / "fixtures/ofa_parity_mini.pt", attention_backend=backend).eval()(**inputs)
    for i, n in enumerate(data["target_lengths"].tolist()):
        torch.testing.assert_close(out[i, :n], ref[i, :n], **TOL)
        assert (out[i, :n] - data["logits"][i, :n]).abs().max().item() <= 1e-3


def test_flash_without_the_package_falls_back_to_sdpa_once(monkeypatch, caplog):
    if attention.flash_attn_available():
        pytest.skip("flash-attn is installed: no fallback to test")
    monkeypatch.setattr(attention, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="models.attention"):
        model = build("flash", "rope")
    assert {layer.self_attn.backend for layer in model.encoder.layers} == {"sdpa"}
    assert [r.getMessage() for r in caplog.records].count(
        "attention_backend 'flash': the flash-attn package is not installed, using 'sdpa' instead") == 1


def test_rope_has_no_position_bias_so_every_call_is_mask_free(monkeypatch):
    model = build("sdpa", "rope").train()
    assert not [n for n in dict(model.named_parameters()) if "pos" in n]
    masks = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        masks.append(kwargs.get("attn_mask"))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model(**mixed_batch(codes=True)).sum().backward()
    assert len(masks) == 3 * 2 and all(m is None for m in masks)  # encoder self, decoder self + cross


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_rope_incremental_decoding_matches_full(backend):
    model = build(backend, "rope").eval()
    batch = mixed_batch(codes=True)
    prev = batch["prev_output_tokens"][:, :6]
    with torch.no_grad():
        encoder_out = model.encode(batch["src_tokens"], batch["patch_images"], batch["patch_masks"])
        full = model.decode(prev, encoder_out, batch["code_masks"])
        cache = model.new_cache()
        steps = [model.decode(prev[:, :t], encoder_out, batch["code_masks"], cache) for t in range(1, 7)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0.0, atol=1e-5)


@pytest.mark.parametrize("scheme", ["ofa", "rope"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_activation_checkpointing_gives_the_same_gradients(scheme, backend):
    overrides = dict(dropout=0.1, encoder_drop_path_rate=0.1, decoder_drop_path_rate=0.1)
    plain, recomputed = build(backend, scheme, **overrides).train(), build(backend, scheme, **overrides).train()
    assert apply_activation_checkpointing(recomputed) == 4
    results = []
    for model in (plain, recomputed):
        torch.manual_seed(3)  # dropout and drop path: the recomputation must replay the same masks
        results.append(forward_backward(model, mixed_batch(codes=True)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0.0, atol=1e-6)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_attention_memory_of_fused_backends():
    """Base width, reduced sequence (the full 900 + 80 tokens, batch 8 run is ``python -m tools.bench_attention
    mode=memory``, which adds flex: minutes of CPU compilation): the sdpa forward holds no [B, H, L, L]
    tensor, eager holds its probabilities for the backward."""
    cfg = bench_attention.MemoryConfig(batch=4, image_grid=20, text_tokens=40, backends=["eager", "sdpa"])
    rows = bench_attention.memory_table(cfg)
    print("\n" + bench_attention.format_memory(rows))
    by = {r["backend"]: r for r in rows}
    lxl = by["eager"]["lxl_MiB"]
    assert by["eager"]["fwd_peak_MiB"] >= lxl and by["eager"]["saved_lxl"] == 1  # its probabilities
    assert by["sdpa"]["fwd_peak_MiB"] <= by["eager"]["fwd_peak_MiB"] - lxl / 2
