"""The attention kernels behind ``biomedgpt.models.attention.attention``: one function per backend.

Backends, all ``(q, k, v, bias, key_padding_mask, causal, dropout_p) -> out`` on ``[B, H, L, Dh]``:
- ``eager``: the explicit reference computation (the parity oracle);
- ``sdpa``: ``scaled_dot_product_attention``; the absolute bias and the key padding are folded into the
  head dimension (``q' = [q, pos_q, 1]``, ``k' = [k, pos_k, pad·-big]``), so only relative biases (and
  causal masks with an offset) remain for a float mask, which is batch-shared where the positions are;
- ``flex``: FlexAttention with the same folding and a ``score_mod`` that looks the relative biases up in
  the small tables inside the kernel: no L×L tensor at all. Forward and backward on GPU; forward only on
  CPU (PyTorch has no CPU backward for it);
- ``flash``: the flash-attn package for calls without relative bias (rotary positions, and OFA's
  cross-attention once folded); calls with relative biases, or inputs flash-attn cannot take, use ``sdpa``;
- ``chunked``: plain PyTorch over query chunks with the same folding, relative biases looked up per chunk,
  and a backward that recomputes each chunk's probabilities and scatters their gradient into the tables:
  memory-efficient training with OFA biases where no fused kernel has a backward for them (CPU).
``auto`` resolves per machine (``resolve_backend``).

They take the factored ``AttentionBias`` of ``biomedgpt.models.attention`` and know nothing of the model.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # the types live beside the model-facing code, which imports this module
    from biomedgpt.models.attention import AttentionBias, RelativeBias, RelativePositions

HEAD_DIM_MULTIPLE = 8  # fused GPU kernels want head dims aligned to 8 elements


# ----------------------------------------------------------------------------------------------
# Folding the low-rank absolute bias and the key padding into the head dimension
# ----------------------------------------------------------------------------------------------


def _padding_value(dtype: torch.dtype) -> float:
    """A finite score that makes a key's softmax weight exactly 0 (finite, so no 0·inf NaN in gradients)."""
    return torch.finfo(dtype).min / 4


def fold_into_heads(q: Tensor, k: Tensor, v: Tensor, bias: AttentionBias | None,
                    key_padding_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """``q' k'ᵀ = q kᵀ + pos_q pos_kᵀ + padding``; v zero-padded to the same width (kernels want equal dims).

    Widths are rounded up to ``HEAD_DIM_MULTIPLE`` with zeros. Returns (q', k', v'); the caller keeps the
    first ``v.shape[-1]`` output channels.
    """
    q_parts, k_parts = [q], [k]
    if bias is not None:
        b = max(q.shape[0], bias.pos_q.shape[0])
        q_parts.append(bias.pos_q.to(q.dtype).expand(b, -1, -1, -1))
        k_parts.append(bias.pos_k.to(k.dtype).expand(max(k.shape[0], bias.pos_k.shape[0]), -1, -1, -1))
    if key_padding_mask is not None:
        q_parts.append(q.new_ones(q.shape[:-1] + (1,)))
        pad = key_padding_mask.to(k.dtype) * _padding_value(k.dtype)
        k_parts.append(pad[:, None, :, None].expand(-1, k.shape[1], -1, -1))
    width = sum(part.shape[-1] for part in q_parts)
    width = -(-width // HEAD_DIM_MULTIPLE) * HEAD_DIM_MULTIPLE
    q2, k2 = _cat_padded(q_parts, width), _cat_padded(k_parts, width)
    return q2, k2, F.pad(v, (0, width - v.shape[-1]))


def _cat_padded(parts: list[Tensor], width: int) -> Tensor:
    used = sum(part.shape[-1] for part in parts)
    if used < width:
        parts = parts + [parts[0].new_zeros(parts[0].shape[:-1] + (width - used,))]
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


def _causal_offset(q: Tensor, k: Tensor) -> int:
    """Queries are the last ``lq`` of ``lk`` positions: query i sees keys ``j <= i + offset``."""
    return k.shape[-2] - q.shape[-2]


def _causal_mask(lq: int, lk: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    future = torch.ones(lq, lk, dtype=torch.bool, device=device).triu(lk - lq + 1)
    return torch.zeros(lq, lk, dtype=dtype, device=device).masked_fill(future, float("-inf"))


def _dense_mask(bias: AttentionBias | None, q: Tensor, k: Tensor, key_padding_mask: Tensor | None,
                causal: bool) -> Tensor | None:
    """The explicit additive mask: dense bias, -inf on future keys (causal) and on padded keys."""
    out = bias.dense() if bias is not None else None
    if causal:
        causal_mask = _causal_mask(q.shape[-2], k.shape[-2], q.dtype, q.device)
        out = causal_mask if out is None else out + causal_mask
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, :]
        out = torch.zeros(pad.shape, dtype=q.dtype, device=q.device) if out is None else out
        out = out.masked_fill(pad, float("-inf"))
    return out


# ----------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------


def eager_attention(q: Tensor, k: Tensor, v: Tensor, bias: AttentionBias | None,
                    key_padding_mask: Tensor | None, causal: bool, dropout_p: float) -> Tensor:
    """Reference: weights = q kᵀ + bias, masked, softmax in fp32, dropout, times v."""
    weights = torch.matmul(q, k.transpose(-1, -2))
    mask = _dense_mask(bias, q, k, key_padding_mask, causal)
    if mask is not None:
        weights = weights + mask
    probs = torch.softmax(weights.float(), dim=-1).type_as(weights)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, bias: AttentionBias | None,
                   key_padding_mask: Tensor | None, causal: bool, dropout_p: float) -> Tensor:
    """PyTorch's fused kernels; relative biases go in as a float mask (q is pre-scaled, so scale=1).

    PyTorch's CPU kernels cannot return the gradient of a mask, so CPU training with trainable relative
    tables runs the math kernel whatever the inputs: it gets the plain dense mask (folding would only
    widen its matmuls).
    """
    if q.device.type == "cpu" and bias is not None and torch.is_grad_enabled() and any(
            rel.table.requires_grad for rel in bias.relative):
        mask = _dense_mask(bias, q, k, key_padding_mask, causal)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=1.0)
    dv = v.shape[-1]
    if bias is not None or key_padding_mask is not None:
        q, k, v = fold_into_heads(q, k, v, bias, key_padding_mask)
    mask = bias.dense_relative(q.dtype) if bias is not None else None
    is_causal = False
    if causal and (mask is not None or q.shape[-2] != k.shape[-2]):
        if q.shape[-2] > 1:  # a single new query may see every cached key
            causal_mask = _causal_mask(q.shape[-2], k.shape[-2], q.dtype, q.device)
            mask = causal_mask if mask is None else mask + causal_mask
    else:
        is_causal = causal
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                         scale=1.0)
    return out[..., :dv]


@functools.lru_cache(maxsize=None)
def _flex_kernel(device_type: str):
    """``flex_attention`` compiled once per process and device type (uncompiled it runs an L×L reference).

    On CPU with static shapes: inductor's CPU flex template miscompiles symbolic (dynamic) sequence lengths.
    """
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False if device_type == "cpu" else None)


#: Compiled flex graphs kept per process before dynamo falls back to the unfused L×L reference. Static
#: CPU shapes compile once per (batch, lengths, bias layout): dynamo's default of 8 is spent by one model
#: (encoder, decoder self and cross) at two batch sizes.
FLEX_RECOMPILE_LIMIT = 64


def _flex_score_mod(relative: list[RelativeBias], causal_offset: int | None):
    """Adds each relative block's ``table[index[q_id, k_id], head]`` inside the kernel; causal as -inf."""

    def score_mod(score, b, h, q_idx, kv_idx):
        for rel in relative:
            pos = rel.positions
            lq, lk = pos.q_ids.shape[1], pos.k_ids.shape[1]
            qi, ki = q_idx - pos.q_start, kv_idx - pos.k_start
            inside = (qi >= 0) & (qi < lq) & (ki >= 0) & (ki < lk)
            q_id = pos.q_ids[b if pos.q_ids.shape[0] > 1 else 0, qi.clamp(0, lq - 1)]
            k_id = pos.k_ids[b if pos.k_ids.shape[0] > 1 else 0, ki.clamp(0, lk - 1)]
            value = rel.table[pos.index[q_id, k_id], h]
            if rel.samples is not None:
                value = torch.where(rel.samples[b], value, torch.zeros_like(value))
            score = score + torch.where(inside, value, torch.zeros_like(value))
        if causal_offset is not None:
            score = torch.where(kv_idx > q_idx + causal_offset, float("-inf"), score)
        return score

    return score_mod


def flex_attention(q: Tensor, k: Tensor, v: Tensor, bias: AttentionBias | None,
                   key_padding_mask: Tensor | None, causal: bool, dropout_p: float) -> Tensor:
    """FlexAttention: absolute bias and padding folded into q/k, relative biases looked up in-kernel."""
    if dropout_p > 0.0:
        raise ValueError("the flex backend has no attention dropout; use sdpa or set attention_dropout=0")
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(
            t.requires_grad for t in _flex_inputs(q, k, v, bias)):
        raise RuntimeError("FlexAttention has no CPU backward in PyTorch: train on CPU with attention_backend "
                           "sdpa (flex runs CPU inference, and training on GPUs)")
    dv = v.shape[-1]
    if bias is not None or key_padding_mask is not None:
        q, k, v = fold_into_heads(q, k, v, bias, key_padding_mask)
    relative = [rel if rel.samples is None else dataclasses.replace(rel, samples=rel.samples.bool())
                for rel in (bias.relative if bias is not None else [])]
    offset = _causal_offset(q, k) if causal else None
    score_mod = _flex_score_mod(relative, offset) if relative or causal else None
    b = max(q.shape[0], k.shape[0])
    q, k, v = (t.expand(b, -1, -1, -1) for t in (q, k, v))
    with torch._dynamo.config.patch(recompile_limit=FLEX_RECOMPILE_LIMIT):
        return _flex_kernel(q.device.type)(q, k, v, score_mod=score_mod, scale=1.0)[..., :dv]


def _flex_inputs(q: Tensor, k: Tensor, v: Tensor, bias: AttentionBias | None) -> list[Tensor]:
    tensors = [q, k, v]
    if bias is not None:
        tensors += [bias.pos_q, bias.pos_k] + [rel.table for rel in bias.relative]
    return tensors


#: Scores per query chunk of the ``chunked`` backend (fp32 elements, batch × heads × rows × keys): 16 MiB.
CHUNK_SCORES = 1 << 22


def _query_chunks(b: int, h: int, lq: int, lk: int) -> list[tuple[int, int]]:
    rows = max(1, min(lq, CHUNK_SCORES // max(1, b * h * lk)))
    return [(start, min(start + rows, lq)) for start in range(0, lq, rows)]


def _block_in_chunk(pos: RelativePositions, c0: int, c1: int) -> tuple[Tensor, tuple[slice, slice]] | None:
    """The bucket ids (``[1 or B, rows, lk]``) of the block's queries inside query chunk ``[c0, c1)`` and
    where they sit in the chunk's ``[..., c1 - c0, Lk]`` scores; None when the chunk misses the block.
    Recomputed per chunk, so no L×L index exists either."""
    lo, hi = max(c0, pos.q_start), min(c1, pos.q_start + pos.q_ids.shape[1])
    if lo >= hi:
        return None
    bucket = pos.index[pos.q_ids[:, lo - pos.q_start:hi - pos.q_start, None], pos.k_ids[:, None, :]]
    return bucket, (slice(lo - c0, hi - c0), slice(pos.k_start, pos.k_start + pos.k_ids.shape[1]))


def _chunk_probs(q: Tensor, k: Tensor, heads: int, c0: int, c1: int, relative: list[RelativeBias],
                 causal_offset: int | None, lse: Tensor | None) -> tuple[Tensor, Tensor]:
    """Softmax probabilities (fp32, ``[B·H, c1 - c0, Lk]``) of one query chunk of ``q``/``k`` (``[B·H, L, D]``),
    and the chunk's row logsumexp. With ``lse`` given (the backward) the forward's is reused: exact recomputation.
    """
    scores = torch.bmm(q[:, c0:c1], k.transpose(1, 2)).float()
    per_head = scores.view(-1, heads, c1 - c0, k.shape[1])
    for rel in relative:
        block = _block_in_chunk(rel.positions, c0, c1)
        if block is None:
            continue
        bucket, (rows, cols) = block
        values = rel.table[bucket].permute(0, 3, 1, 2).float()  # [1|B, H, rows, lk]
        if rel.samples is not None:
            values = values * rel.samples.to(values.dtype)[:, None, None, None]
        per_head[:, :, rows, cols] += values
    if causal_offset is not None:
        q_pos = torch.arange(c0, c1, device=q.device)[:, None] + causal_offset
        scores.masked_fill_(torch.arange(k.shape[1], device=q.device)[None, :] > q_pos, float("-inf"))
    if lse is not None:
        return scores.sub_(lse[..., None]).exp_(), lse
    row_max = scores.amax(dim=-1, keepdim=True)
    total = scores.sub_(row_max).exp_().sum(dim=-1, keepdim=True)
    return scores.div_(total), (row_max + total.log()).squeeze(-1)


class _ChunkedAttention(torch.autograd.Function):
    """Attention with relative biases over query chunks; saves q, k, v, out and the row logsumexp only.

    The backward recomputes each chunk's probabilities from the small tables and scatters the chunk's
    score gradient into the tables' gradients (per head), so neither pass holds a full L×L tensor.
    ``q``/``k`` carry the absolute bias and the key padding folded in (``fold_into_heads``).
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, relative: list[RelativeBias], causal_offset: int | None,
                *tables: Tensor) -> Tensor:
        b, h, lq, lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        q3, k3, v3 = (t.reshape(b * h, t.shape[2], t.shape[3]) for t in (q, k, v))
        out = v3.new_empty(b * h, lq, v3.shape[-1])
        lse = q3.new_empty(b * h, lq, dtype=torch.float32)
        for c0, c1 in _query_chunks(b, h, lq, lk):
            probs, lse[:, c0:c1] = _chunk_probs(q3, k3, h, c0, c1, relative, causal_offset, None)
            out[:, c0:c1] = torch.bmm(probs.to(v3.dtype), v3)
        ctx.save_for_backward(q3, k3, v3, out, lse)
        ctx.relative, ctx.causal_offset, ctx.shape = relative, causal_offset, (b, h)
        return out.view(b, h, lq, -1)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        relative, causal_offset, (b, h) = ctx.relative, ctx.causal_offset, ctx.shape
        lq, lk = q.shape[1], k.shape[1]
        grad_out = grad_out.reshape(out.shape)
        grad_q, grad_k, grad_v = q.new_empty(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
        grad_tables = [torch.zeros_like(rel.table, dtype=torch.float32) if ctx.needs_input_grad[5 + i] else None
                       for i, rel in enumerate(relative)]  # accumulated in fp32 whatever the tables' dtype
        delta = (grad_out.float() * out.float()).sum(-1, keepdim=True)  # rowsum(P ∘ dP), [B·H, Lq, 1]
        for c0, c1 in _query_chunks(b, h, lq, lk):
            probs, _ = _chunk_probs(q, k, h, c0, c1, relative, causal_offset, lse[:, c0:c1])
            d_out = grad_out[:, c0:c1]
            grad_v.baddbmm_(probs.to(v.dtype).transpose(1, 2), d_out)
            d_scores = torch.bmm(d_out, v.transpose(1, 2)).float().sub_(delta[:, c0:c1]).mul_(probs)
            for rel, grad_table in zip(relative, grad_tables):
                if grad_table is not None:
                    _scatter_table_grad(grad_table, rel, d_scores.view(b, h, c1 - c0, lk), c0, c1)
            d_scores = d_scores.to(q.dtype)
            grad_q[:, c0:c1] = torch.bmm(d_scores, k)
            grad_k.baddbmm_(d_scores.transpose(1, 2), q[:, c0:c1])
        grads = (g.view(b, h, g.shape[1], g.shape[2]) for g in (grad_q, grad_k, grad_v))
        grad_tables = (None if g is None else g.to(rel.table.dtype) for g, rel in zip(grad_tables, relative))
        return *grads, None, None, *grad_tables


def _scatter_table_grad(grad_table: Tensor, rel: RelativeBias, d_scores: Tensor, c0: int, c1: int) -> None:
    """Adds the chunk's score gradient (``[B, H, c1 - c0, Lk]``) inside ``rel``'s block to
    ``grad_table[bucket, head]``."""
    block = _block_in_chunk(rel.positions, c0, c1)
    if block is None:
        return
    bucket, (rows, cols) = block
    d_block = d_scores[:, :, rows, cols]
    if rel.samples is not None:
        d_block = d_block * rel.samples.to(d_block.dtype)[:, None, None, None]
    if bucket.shape[0] == 1:
        d_block = d_block.sum(0, keepdim=True)
    grad_table.index_add_(0, bucket.expand(d_block.shape[0], -1, -1).reshape(-1),
                          d_block.permute(0, 2, 3, 1).reshape(-1, grad_table.shape[1]))


def chunked_attention(q: Tensor, k: Tensor, v: Tensor, bias: AttentionBias | None,
                      key_padding_mask: Tensor | None, causal: bool, dropout_p: float) -> Tensor:
    """Memory-efficient OFA attention without GPU kernels (CPU training): query chunks, relative biases
    looked up per chunk, a backward that recomputes the probabilities. Calls without relative biases
    (cross-attention, rotary positions) are fused ``sdpa`` calls, which already keep no L×L tensor.
    """
    if dropout_p > 0.0:
        raise ValueError("the chunked backend has no attention dropout; use sdpa or set attention_dropout=0")
    if bias is None or not bias.relative:
        return sdpa_attention(q, k, v, bias, key_padding_mask, causal, dropout_p)
    q, k, _ = fold_into_heads(q, k, v, bias, key_padding_mask)
    b = max(q.shape[0], k.shape[0], v.shape[0])
    q, k, v = (t.expand(b, -1, -1, -1) for t in (q, k, v))
    offset = _causal_offset(q, k) if causal else None
    return _ChunkedAttention.apply(q, k, v, bias.relative, offset, *(rel.table for rel in bias.relative))


@functools.lru_cache(maxsize=None)
def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def flash_attention(q: Tensor, k: Tensor, v: Tensor, bias: AttentionBias | None,
                    key_padding_mask: Tensor | None, causal: bool, dropout_p: float) -> Tensor:
    """flash-attn for calls without relative bias on CUDA half precision; ``sdpa`` for the others."""
    if (bias is not None and bias.relative) or q.device.type != "cuda" or q.dtype not in (torch.float16,
                                                                                          torch.bfloat16):
        return sdpa_attention(q, k, v, bias, key_padding_mask, causal, dropout_p)
    flash_attn_func = importlib.import_module("flash_attn").flash_attn_func  # optional: no import statement, so
    # transformers' remote-code check does not require flash-attn of an exported model's users

    dv = v.shape[-1]
    if bias is not None or key_padding_mask is not None:
        q, k, v = fold_into_heads(q, k, v, bias, key_padding_mask)
    b = max(q.shape[0], k.shape[0])
    q, k, v = (t.expand(b, -1, -1, -1).transpose(1, 2) for t in (q, k, v))  # flash-attn wants [B, L, H, D]
    # flash-attn aligns a causal mask to the bottom right, as a decoder with cached keys needs.
    out = flash_attn_func(q, k, v, dropout_p=dropout_p, softmax_scale=1.0, causal=causal)
    return out.transpose(1, 2)[..., :dv]


BACKENDS = {"eager": eager_attention, "sdpa": sdpa_attention, "flex": flex_attention, "flash": flash_attention,
            "chunked": chunked_attention}
