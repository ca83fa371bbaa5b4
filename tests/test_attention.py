"""Attention backends: parity of sdpa / chunked / flex with the eager reference, the rotary scheme, activation
checkpointing with every backend, the flash fallback, and attention memory at base width (CPU)."""
from __future__ import annotations

import functools
import logging

import pytest
import torch
import torch.nn.functional as F

from biomedgpt.engine.distributed.parallelize import apply_activation_checkpointing
from biomedgpt.models import attention, kernels
from biomedgpt.models.config import model_config
from biomedgpt.models.ofa import BiomedGPT, MultiheadAttention, image_bucket_positions, image_position_ids, token_bucket_positions
from biomedgpt.tools.bench import attention as bench_attention
from parity_cases import CASES, assert_holds, compare, valid_positions
from small_models import build

TOL = dict(rtol=0.0, atol=1e-5)
MINI = "fairseq_mini"
pytestmark = pytest.mark.usefixtures("one_thread")


def set_backend(model: BiomedGPT, backend: str) -> BiomedGPT:
    """The same weights run by another backend."""
    for module in model.modules():
        if isinstance(module, MultiheadAttention):
            module.backend = backend
    return model


def mixed_batch(codes: bool) -> dict:
    """Image+text and text-only samples, padded sources and targets; optionally image-code targets."""
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, 300, (4, 12), generator=g)
    src[1, 8:] = 1
    src[3, 5:] = 1
    prev = torch.randint(4, 300, (4, 9), generator=g)
    prev[2, 6:] = 1
    return dict(src_tokens=src, prev_output_tokens=prev, patch_images=torch.randn(4, 3, 48, 48, generator=g),
                patch_masks=torch.tensor([True, False, True, True]),
                code_masks=torch.tensor([False, True, False, True]) if codes else None)


def forward_backward(model: BiomedGPT, batch: dict) -> tuple[torch.Tensor, dict]:
    out = model(**batch)
    out.square().mean().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@functools.lru_cache(maxsize=None)
def eager_reference(scheme: str, codes: bool) -> tuple[torch.Tensor, dict]:
    return forward_backward(build("eager", scheme).train(), mixed_batch(codes))


@pytest.mark.parametrize("codes", [False, True])
@pytest.mark.parametrize("scheme,backend", [("ofa", "sdpa"), ("ofa", "chunked"), ("rope", "sdpa")])
def test_backend_matches_eager_forward_and_gradients(scheme, backend, codes, monkeypatch):
    monkeypatch.setattr(kernels, "CHUNK_SCORES", 4 * 4 * 21 * 2)  # chunks of 2 (encoder) and 4 rows (decoder)
    ref_out, ref_grads = eager_reference(scheme, codes)
    out, grads = forward_backward(build(backend, scheme).train(), mixed_batch(codes))
    torch.testing.assert_close(out, ref_out, **TOL)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **TOL, msg=name)


def bias_inputs(lq: int, per_sample_patches: bool, code_samples: bool) -> tuple[list[torch.Tensor], dict]:
    """Leaf tensors (q, k, v, pos_q, pos_k, text table, image table) and the call's other arguments for
    9 image + 7 text keys with key padding; the last ``lq`` positions are the queries (a cache offset)."""
    g = torch.Generator().manual_seed(0)
    b, h, dh, n_img, s = 3, 4, 8, 9, 7
    length = n_img + s
    leaves = [torch.randn(b, h, lq, dh, generator=g) * 0.3, torch.randn(b, h, length, dh, generator=g),
              torch.randn(b, h, length, dh, generator=g), torch.randn(1, h, lq, dh, generator=g) * 0.3,
              torch.randn(1, h, length, dh, generator=g) * 0.3, torch.randn(31, h, generator=g),
              torch.randn(15 ** 2 + 3, h, generator=g)]
    leaves = [t.requires_grad_() for t in leaves]
    if per_sample_patches:  # random patch subsets per sample (sample_patch_num)
        image_ids = torch.stack([torch.randperm(64, generator=g)[:n_img] + 1 for _ in range(b)])
    else:
        image_ids = image_position_ids(3, 3, 8)[None]
    first = length - lq  # position of the first query
    text_ids = torch.arange(s)[None]
    text = attention.RelativePositions(token_bucket_positions(16, 64), text_ids[:, max(0, first - n_img):], text_ids,
                                       max(0, n_img - first), n_img)
    image = attention.RelativePositions(image_bucket_positions(8), image_ids[:, min(first, n_img):], image_ids)
    codes = torch.tensor([False, True, True]) if code_samples else None
    bias = attention.AttentionBias(leaves[3], leaves[4], [
        attention.RelativeBias(leaves[5], text, None if codes is None else ~codes),
        attention.RelativeBias(leaves[6], image, codes)])
    padding = torch.zeros(b, length, dtype=torch.bool)
    padding[1, -3:] = True
    padding[2, -1:] = True
    return leaves, dict(bias=bias, key_padding_mask=padding)


@pytest.mark.parametrize("chunk_scores", [1, 4 * 4 * 16 * 5, 1 << 22], ids=["rows1", "rows5", "one-chunk"])
@pytest.mark.parametrize("layout", ["encoder", "sampled-patches", "decoder-codes", "decoder-cache"])
def test_chunked_attention_gradients_match_eager(layout, chunk_scores, monkeypatch):
    """q, k, v, the absolute positions and both relative tables, for every block layout the model makes."""
    monkeypatch.setattr(kernels, "CHUNK_SCORES", chunk_scores)
    lq, causal = {"encoder": (16, False), "sampled-patches": (16, False), "decoder-codes": (16, True),
                  "decoder-cache": (5, True)}[layout]
    results = []
    for backend in ("eager", "chunked"):
        leaves, kwargs = bias_inputs(lq, layout == "sampled-patches", layout.startswith("decoder"))
        out = attention.attention(leaves[0], leaves[1], leaves[2], causal=causal, dropout_p=0.0, backend=backend,
                                  **kwargs)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out.detach()] + [leaf.grad for leaf in leaves])
    names = ["out", "q", "k", "v", "pos_q", "pos_k", "text table", "image table"]
    for name, got, ref in zip(names, results[1], results[0]):
        torch.testing.assert_close(got, ref, **TOL, msg=name)


def test_chunked_attention_in_bf16_stays_close_to_fp32_eager():
    """Mixed precision (DeepSpeed bf16 on CPU): bf16 inputs, fp32 softmax and table-gradient accumulation."""
    results = []
    for backend, dtype in (("eager", torch.float32), ("chunked", torch.bfloat16)):
        leaves, kwargs = bias_inputs(16, False, True)
        leaves = [leaf.detach().to(dtype).requires_grad_() for leaf in leaves]
        bias = kwargs["bias"]
        relative = [attention.RelativeBias(table, rel.positions, rel.samples)
                    for table, rel in zip(leaves[5:], bias.relative)]
        kwargs["bias"] = attention.AttentionBias(leaves[3], leaves[4], relative)
        out = attention.attention(*leaves[:3], **kwargs, causal=True, dropout_p=0.0, backend=backend)
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out] + [leaf.grad for leaf in leaves])
    for got, ref in zip(results[1], results[0]):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), ref, rtol=0.0, atol=0.03 * ref.abs().max().item())


def test_chunked_backend_choice_and_dropout():
    """``auto`` trains OFA biases with ``chunked`` on CPU unless attention dropout is on (it has none)."""
    if not torch.cuda.is_available():
        assert attention.resolve_backend("auto", "ofa") == "chunked"
        assert attention.resolve_backend("auto", "ofa", attention_dropout=0.1) == "sdpa"
        assert attention.resolve_backend("auto", "rope") == "sdpa"
    with pytest.raises(ValueError, match="chunked has no attention dropout"):
        model_config("tiny", attention_backend="chunked", attention_dropout=0.1)
    leaves, kwargs = bias_inputs(16, False, False)
    with pytest.raises(ValueError, match="chunked backend has no attention dropout"):
        attention.attention(*leaves[:3], **kwargs, causal=False, dropout_p=0.1, backend="chunked")


@pytest.fixture(scope="module", params=sorted(CASES))
def fixture_model(request, parity):
    """Per compact case one shared model (imported through the tool in the case's own naming), the case, its
    inputs and eager logits: every flex test of a case shares its shapes (one compile each)."""
    case = request.param
    model = set_backend(parity.model(case), "eager")
    ref = parity.forward(case, model, key=(parity.own_naming(case), "eager"))
    yield case, model, parity.case(case), parity.inputs(case), ref
    set_backend(model, "eager")


@pytest.mark.parametrize("backend", ["chunked", "flash"])
def test_fixture_parity_with_fused_backends(fixture_model, backend):
    """The fused backends on each compact case: within 1e-5 of eager and of the reference logits.

    flex: test_flex_forward_matches_eager, on one case's weights against eager (which matches the reference
    logits in test_model's compact parity); each CPU compile of flex costs about a minute of the suite, so it
    runs once."""
    if backend == "flash" and not attention.flash_attn_available():
        pytest.skip("flash-attn is not installed here: the flash backend resolves to sdpa (covered by test_model)")
    case, model, data, inputs, ref = fixture_model
    try:
        with torch.no_grad():
            out = set_backend(model, backend)(**inputs)
    finally:
        set_backend(model, "eager")
    valid = valid_positions(data)
    torch.testing.assert_close(out[valid], ref[valid], **TOL)
    assert_holds(compare(out, data), what=f"{case} ({backend})")


def test_flex_forward_matches_eager(parity):
    """A text-only sample (every image key padded), source/target padding and an image-code target."""
    model = parity.model(MINI)
    batch = dict(parity.inputs(MINI), patch_masks=torch.tensor([True, False]), code_masks=torch.tensor([False, True]))
    try:
        with torch.no_grad():
            ref = set_backend(model, "eager")(**batch)
            out = set_backend(model, "flex")(**batch)
    finally:
        set_backend(model, "eager")
    torch.testing.assert_close(out, ref, **TOL)


def test_flex_refuses_cpu_training_with_a_clear_error():
    model = build("flex").train()
    with pytest.raises(RuntimeError, match="no CPU backward"):
        model(**mixed_batch(codes=False))


def test_flash_without_the_package_falls_back_to_sdpa_once(monkeypatch, caplog):
    if attention.flash_attn_available():
        pytest.skip("flash-attn is installed: no fallback to test")
    monkeypatch.setattr(attention, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="biomedgpt.models.attention"):
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
    # encoder self, decoder self + cross, per layer pair: the model runs a mixed batch as one pass (the train
    # step's split by modality is engine/distributed/modality_passes.py)
    assert len(masks) == 3 * 2 and all(m is None for m in masks)


@pytest.mark.parametrize("scheme,backend", [("rope", "eager"), ("rope", "sdpa"), ("ofa", "chunked")])
def test_incremental_decoding_matches_full(scheme, backend):
    model = build(backend, scheme).eval()
    batch = mixed_batch(codes=True)
    prev = batch["prev_output_tokens"][:, :6]
    with torch.no_grad():
        encoder_out = model.encode(batch["src_tokens"], batch["patch_images"], batch["patch_masks"])
        full = model.decode(prev, encoder_out, batch["code_masks"])
        cache = model.new_cache()
        steps = [model.decode(prev[:, :t], encoder_out, batch["code_masks"], cache) for t in range(1, 7)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0.0, atol=1e-5)


@pytest.mark.parametrize("scheme,backend", [("ofa", "eager"), ("ofa", "sdpa"), ("ofa", "chunked"), ("rope", "sdpa")])
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


def test_attention_memory_of_fused_backends(monkeypatch):
    """Base width, 900 + 80 tokens at batch 2 (the batch 8 run is ``python -m biomedgpt.tools.bench.attention mode=memory``,
    which adds flex: minutes of CPU compilation): the sdpa forward holds no [B, H, L, L] tensor, eager holds
    its probabilities for the backward, chunked keeps no L×L tensor in either pass."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the measuring process: one thread, like this module
    cfg = bench_attention.MemoryConfig(batch=2, backends=["eager", "sdpa", "chunked"])
    rows = bench_attention.memory_table(cfg)
    print("\n" + bench_attention.format_memory(rows))
    by = {r["backend"]: r for r in rows}
    lxl = by["eager"]["lxl_MiB"]
    assert by["eager"]["fwd_peak_MiB"] >= lxl and by["eager"]["saved_lxl"] == 1  # its probabilities
    assert by["sdpa"]["fwd_peak_MiB"] <= by["eager"]["fwd_peak_MiB"] - lxl / 2
    assert by["chunked"]["saved_lxl"] == 0
    assert by["chunked"]["saved_MiB"] <= by["eager"]["saved_MiB"] - lxl / 2
    assert by["chunked"]["train_peak_MiB"] <= by["eager"]["train_peak_MiB"] - lxl / 2
