"""Attention with OFA's position biases, behind one entry point with interchangeable backends.

The OFA bias of one attention call is the sum of
- an absolute part, a low-rank product ``pos_q · pos_kᵀ`` (per head) shared by all layers, and
- relative parts: per-layer tables (rows × heads) gathered by a bucket index over a block of the
  (query, key) grid, optionally only for some samples (the decoder's image-code samples).
``AttentionBias`` keeps those small factors; a backend decides how (and whether) to materialise them.

Backends: ``eager`` (the explicit reference computation, the parity oracle) and ``sdpa``
(``torch.nn.functional.scaled_dot_product_attention`` with the bias as a float mask).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class RelativeBias:
    """``table[bucket]`` added to the block ``[q_slice, k_slice]``; only for ``samples`` if given."""

    table: Tensor  # [rows, heads]
    bucket: Tensor  # [1 or B, lq, lk] long
    q_slice: slice = field(default_factory=lambda: slice(None))
    k_slice: slice = field(default_factory=lambda: slice(None))
    samples: Tensor | None = None  # [B] bool

    def values(self) -> Tensor:
        vals = F.embedding(self.bucket, self.table).permute(0, 3, 1, 2)  # [1|B, H, lq, lk]
        if self.samples is not None:
            vals = vals * self.samples.to(vals.dtype)[:, None, None, None]
        return vals


@dataclass
class AttentionBias:
    """Additive attention bias in factored form: ``pos_q @ pos_kᵀ`` plus relative blocks."""

    pos_q: Tensor  # [B, H, Lq, Dp], already scaled
    pos_k: Tensor  # [B, H, Lk, Dp]
    relative: list[RelativeBias] = field(default_factory=list)
    _absolute: Tensor | None = field(default=None, repr=False)

    def absolute(self) -> Tensor:
        """The low-rank product, computed once and shared by every layer that uses this bias."""
        if self._absolute is None:
            self._absolute = torch.matmul(self.pos_q, self.pos_k.transpose(-1, -2))
        return self._absolute

    def with_relative(self, relative: list[RelativeBias]) -> "AttentionBias":
        return AttentionBias(self.pos_q, self.pos_k, relative, self._absolute)

    def dense(self) -> Tensor:
        """The full ``[B, H, Lq, Lk]`` bias."""
        bias = self.absolute()
        if not self.relative:
            return bias
        bias = bias.clone()
        for rel in self.relative:
            bias[:, :, rel.q_slice, rel.k_slice] += rel.values()
        return bias


def _masked_bias(bias: AttentionBias | None, q: Tensor, k: Tensor, key_padding_mask: Tensor | None,
                 causal: bool) -> Tensor | None:
    """Dense additive mask: bias, then -inf on padded keys and (for causal) future keys."""
    lq, lk = q.shape[-2], k.shape[-2]
    out = bias.dense() if bias is not None else None
    neg_inf = float("-inf")
    if causal:
        future = torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu(lk - lq + 1)
        causal_mask = torch.zeros(lq, lk, dtype=q.dtype, device=q.device).masked_fill(future, neg_inf)
        out = causal_mask if out is None else out + causal_mask
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, :]
        out = (torch.zeros(pad.shape, dtype=q.dtype, device=q.device) if out is None else out)
        out = out.masked_fill(pad, neg_inf)
    return out


def eager_attention(q: Tensor, k: Tensor, v: Tensor, bias: AttentionBias | None,
                    key_padding_mask: Tensor | None, causal: bool, dropout_p: float) -> Tensor:
    """Reference: weights = q kᵀ + bias, masked, softmax in fp32, dropout, times v."""
    weights = torch.matmul(q, k.transpose(-1, -2))
    mask = _masked_bias(bias, q, k, key_padding_mask, causal)
    if mask is not None:
        weights = weights + mask
    probs = torch.softmax(weights.float(), dim=-1).type_as(weights)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, bias: AttentionBias | None,
                   key_padding_mask: Tensor | None, causal: bool, dropout_p: float) -> Tensor:
    """PyTorch's fused kernels; the bias goes in as a float mask (q is pre-scaled, so scale=1)."""
    if bias is None and key_padding_mask is None and (not causal or q.shape[-2] == k.shape[-2]):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=1.0)
    mask = _masked_bias(bias, q, k, key_padding_mask, causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=1.0)


BACKENDS = {"eager": eager_attention, "sdpa": sdpa_attention}


def resolve_backend(name: str) -> str:
    """``auto`` picks the fastest backend that handles the OFA biases on this machine."""
    if name == "auto":
        return "sdpa"
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not available here; available: {sorted(BACKENDS)}")
    return name


def attention(q: Tensor, k: Tensor, v: Tensor, bias: AttentionBias | None, key_padding_mask: Tensor | None,
              causal: bool, dropout_p: float, backend: str) -> Tensor:
    """Multi-head attention core: q, k, v are [B, H, L, Dh] with q already scaled."""
    return BACKENDS[backend](q, k, v, bias, key_padding_mask, causal, dropout_p)
