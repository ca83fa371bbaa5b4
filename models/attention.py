"""Attention with OFA's position biases (or rotary positions): the model-facing types and the backend choice.

The OFA bias of one attention call is the sum of
- an absolute part, a low-rank product ``pos_q · pos_kᵀ`` (per head) shared by all layers, and
- relative parts: per-layer tables (rows × heads) indexed by a bucket of (query position, key position)
  over a block of the (query, key) grid, optionally only for some samples (the decoder's image codes).
``AttentionBias`` keeps those small factors; a backend decides how (and whether) to materialise them.
The backends (``eager``, ``sdpa``, ``flex``, ``flash``, ``chunked``) are kernels in
``biomedgpt.models.kernels``; ``resolve_backend`` picks one per machine and ``attention`` dispatches to it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from biomedgpt.models.kernels import BACKENDS, flash_attn_available

log = logging.getLogger(__name__)


@dataclass
class RelativePositions:
    """Buckets of one block of the (query, key) grid: ``index[q_ids[i], k_ids[j]]``.

    ``index`` is the model's deterministic bucket buffer, ``q_ids``/``k_ids`` the block's position ids,
    so a kernel can look a bucket up per (query, key) pair without an L×L index tensor.
    """

    index: Tensor  # [N, N] long
    q_ids: Tensor  # [1 or B, lq] long
    k_ids: Tensor  # [1 or B, lk] long
    q_start: int = 0  # the block's first query / key in the attention call
    k_start: int = 0
    _bucket: Tensor | None = field(default=None, repr=False)

    def bucket(self) -> Tensor:
        """``[1 or B, lq, lk]`` bucket ids, computed once for every layer that shares these positions.

        Caching is safe under activation-checkpoint recomputation: an integer tensor outside autograd.
        """
        if self._bucket is None:
            self._bucket = self.index[self.q_ids[:, :, None], self.k_ids[:, None, :]]
        return self._bucket


@dataclass
class RelativeBias:
    """``table[bucket]`` added to the block of ``positions``; only for ``samples`` if given."""

    table: Tensor  # [rows, heads]
    positions: RelativePositions
    samples: Tensor | None = None  # [B] bool

    def values(self) -> Tensor:
        vals = F.embedding(self.positions.bucket(), self.table).permute(0, 3, 1, 2)  # [1|B, H, lq, lk]
        if self.samples is not None:
            vals = vals * self.samples.to(vals.dtype)[:, None, None, None]
        return vals

    def add_to(self, dense: Tensor) -> Tensor:
        """``dense`` (``[B', H, Lq, Lk]``) with this block added."""
        pos = self.positions
        block = (slice(None), slice(None), slice(pos.q_start, pos.q_start + pos.q_ids.shape[1]),
                 slice(pos.k_start, pos.k_start + pos.k_ids.shape[1]))
        dense[block] += self.values()
        return dense


@dataclass
class AttentionBias:
    """Additive attention bias in factored form: ``pos_q @ pos_kᵀ`` plus relative blocks."""

    pos_q: Tensor  # [1 or B, H, Lq, Dp], already scaled
    pos_k: Tensor  # [1 or B, H, Lk, Dp]
    relative: list[RelativeBias] = field(default_factory=list)

    def with_relative(self, relative: list[RelativeBias]) -> "AttentionBias":
        return AttentionBias(self.pos_q, self.pos_k, relative)

    def absolute(self) -> Tensor:
        """The low-rank product, computed where it is used (no state kept across layers)."""
        return torch.matmul(self.pos_q, self.pos_k.transpose(-1, -2))

    def dense(self) -> Tensor:
        """The full ``[B, H, Lq, Lk]`` bias (the reference's explicit matrix)."""
        bias = self.absolute()
        if not self.relative:
            return bias
        batch = max([bias.shape[0]] + [_rel_batch(rel) for rel in self.relative])
        bias = bias.expand(batch, -1, -1, -1).clone()
        for rel in self.relative:
            bias = rel.add_to(bias)
        return bias

    def dense_relative(self, dtype: torch.dtype) -> Tensor | None:
        """Only the relative blocks as a ``[1 or B, H, Lq, Lk]`` tensor (zero elsewhere), or None."""
        if not self.relative:
            return None
        batch = max(_rel_batch(rel) for rel in self.relative)
        heads, lq, lk = self.pos_q.shape[1], self.pos_q.shape[2], self.pos_k.shape[2]
        dense = torch.zeros(batch, heads, lq, lk, dtype=dtype, device=self.pos_q.device)
        for rel in self.relative:
            dense = rel.add_to(dense)
        return dense


def _rel_batch(rel: RelativeBias) -> int:
    pos = rel.positions
    return max(pos.q_ids.shape[0], pos.k_ids.shape[0], 1 if rel.samples is None else rel.samples.shape[0])


@dataclass
class Rotary:
    """Rotary position embedding (GPT-NeoX half-split layout): ``x·cos + rotate_half(x)·sin``."""

    cos: Tensor  # [1 or B, 1, L, Dh]
    sin: Tensor

    def rotate(self, x: Tensor) -> Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return x * self.cos + torch.cat([-x2, x1], dim=-1) * self.sin

    def slice(self, start: int) -> "Rotary":
        return Rotary(self.cos[:, :, start:], self.sin[:, :, start:])


def rotary_angles(coords: Tensor, head_dim: int, theta: float = 10000.0) -> Rotary:
    """Rotary tables for ``coords`` ``[1 or B, L, A]`` (A axes: 1 for text, 2 for (row, col) patches).

    Each axis rotates an equal share of the half-dimension's frequency pairs, so a 2-D position rotates
    by row in the first share and by column in the second; text given equal coordinates on both axes
    gets plain 1-D rotary behaviour.
    """
    axes = coords.shape[-1]
    half = head_dim // 2
    if half % axes:
        raise ValueError(f"head_dim {head_dim} cannot be split into {axes} rotary axes of frequency pairs")
    per_axis = half // axes
    inv_freq = theta ** (-torch.arange(per_axis, dtype=torch.float32, device=coords.device) / per_axis)
    angles = torch.cat([coords[..., a, None].float() * inv_freq for a in range(axes)], dim=-1)  # [.., L, half]
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # [1|B, 1, L, Dh]
    return Rotary(angles.cos(), angles.sin())


# ----------------------------------------------------------------------------------------------
# Backend choice
# ----------------------------------------------------------------------------------------------

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def resolve_backend(name: str, position_scheme: str = "ofa", attention_dropout: float = 0.0) -> str:
    """The backend to run for a configured name on this machine.

    ``auto``: on CUDA, ``flex`` (OFA biases in-kernel, fused backward), or for ``rope`` (no additive bias)
    ``flash`` where flash-attn is installed; without CUDA, ``chunked`` for OFA biases (the only CPU
    backward that keeps no L×L tensor, and no slower than eager) unless attention dropout is on, ``sdpa``
    otherwise. ``flash`` without the flash-attn package falls back to ``sdpa``, logged once per process.
    """
    if name == "auto":
        if not torch.cuda.is_available():
            return "chunked" if position_scheme == "ofa" and attention_dropout == 0.0 else "sdpa"
        if position_scheme == "rope":
            return "flash" if flash_attn_available() else "sdpa"
        return "flex"
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not available here; available: {sorted(BACKENDS)}")
    if name == "flash" and not flash_attn_available():
        _warn_once("attention_backend 'flash': the flash-attn package is not installed, using 'sdpa' instead")
        return "sdpa"
    return name


def attention(q: Tensor, k: Tensor, v: Tensor, bias: AttentionBias | None, key_padding_mask: Tensor | None,
              causal: bool, dropout_p: float, backend: str) -> Tensor:
    """Multi-head attention core: q, k, v are [B, H, L, Dh] with q already scaled."""
    return BACKENDS[backend](q, k, v, bias, key_padding_mask, causal, dropout_p)
