"""The BiomedGPT / OFA unified encoder-decoder in plain PyTorch.

Module and parameter names follow the released fairseq checkpoints (``encoder.layers.0.attn_ln`` …),
so those load without renaming; ``biomedgpt.models.checkpoint`` maps the HF-port names. Tensors are batch-first.
See ``docs/architecture.md`` for the structure this file implements.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from biomedgpt.models.attention import (AttentionBias, RelativeBias, RelativePositions, Rotary, attention, resolve_backend,
                              rotary_angles)
from biomedgpt.models.config import ModelConfig

# ----------------------------------------------------------------------------------------------
# Deterministic position buckets (recomputed, never loaded from a checkpoint)
# ----------------------------------------------------------------------------------------------


def token_bucket_positions(bucket_size: int, max_position: int) -> Tensor:
    """[max_position]² table of text relative-position buckets (log-spaced beyond bucket_size/2)."""
    pos = torch.arange(max_position)
    relative = pos[:, None] - pos[None, :]
    sign = torch.sign(relative)
    mid = bucket_size // 2
    abs_pos = torch.where((relative < mid) & (relative > -mid), torch.full_like(relative, mid - 1), relative.abs())
    log_pos = torch.ceil(torch.log(abs_pos / mid) / math.log((max_position - 1) / mid) * (mid - 1)) + mid
    bucket = torch.where(abs_pos.le(mid), relative, log_pos.int() * sign).long()
    return bucket + bucket_size - 1


def image_bucket_positions(bucket_size: int) -> Tensor:
    """[(n²+1)]² table of 2-D relative buckets; row/column 0 (position id 0) use the 3 extra rows."""
    num_relative = (2 * bucket_size - 1) ** 2 + 3
    coords = torch.stack(torch.meshgrid(torch.arange(bucket_size), torch.arange(bucket_size), indexing="ij"))
    flat = coords.flatten(1)
    relative = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
    relative[:, :, 0] += bucket_size - 1
    relative[:, :, 1] += bucket_size - 1
    relative[:, :, 0] *= 2 * bucket_size - 1
    index = torch.zeros((bucket_size * bucket_size + 1,) * 2, dtype=relative.dtype)
    index[1:, 1:] = relative.sum(-1)
    index[0, 0:] = num_relative - 3
    index[0:, 0] = num_relative - 2
    index[0, 0] = num_relative - 1
    return index


def image_position_ids(rows: int, cols: int, bucket_size: int) -> Tensor:
    """Row-major patch position ids r*bucket + c + 1 (0 is reserved)."""
    return (torch.arange(cols)[None, :] + torch.arange(rows)[:, None] * bucket_size + 1).view(-1)


def image_id_coords(ids: Tensor, bucket_size: int) -> Tensor:
    """(row, col) + 1 of patch position ids (``[..., 2]``); the reserved id 0 (the decoder's ``<s>``) is (0, 0)."""
    cell = (ids - 1).clamp(min=0)
    coords = torch.stack([cell // bucket_size + 1, cell % bucket_size + 1], dim=-1)
    return coords * (ids > 0)[..., None]


def text_coords(start: int, stop: int, offset: int, device: torch.device) -> Tensor:
    """``[1, n, 2]`` rotary coordinates of text positions: the same on both axes (1-D rotary), + offset."""
    pos = torch.arange(start, stop, device=device) + offset
    return torch.stack([pos, pos], dim=-1)[None]


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


def linear_rates(stop: float, n: int) -> list[float]:
    """Drop-path rates growing linearly from 0 to ``stop`` over ``n`` blocks (as torch.linspace)."""
    return [stop * i / (n - 1) if n > 1 else 0.0 for i in range(n)]


def normalise_images(images: Tensor, dtype: torch.dtype, mean: Sequence[float] = (0.5, 0.5, 0.5),
                     std: Sequence[float] = (0.5, 0.5, 0.5)) -> Tensor:
    """uint8 RGB (0..255) -> ``dtype`` as ``(x / 255 - mean) / std`` per channel, in float32 (mean = std = 0.5
    gives exactly the old ``x / 127.5 - 1``: scaling by 2 is exact); float input is taken as normalised."""
    if images.is_floating_point():
        return images.to(dtype)
    images = images.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)  # batches come channels-last
    if len(set(mean)) == 1 and len(set(std)) == 1:
        images.sub_(mean[0]).div_(std[0])
    else:
        channel_mean, channel_std = _channel_stats(tuple(mean), tuple(std), images.device)
        images.sub_(channel_mean).div_(channel_std)
    return images.to(dtype)


@functools.lru_cache(maxsize=16)
def _channel_stats(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """[1, 3, 1, 1] float32 mean and std on ``device``, made once (no host-to-device copy per batch)."""
    return (torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1),
            torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1))


def drop_path(x: Tensor, prob: float, training: bool) -> Tensor:
    """Stochastic depth: drop the whole residual branch per sample (dim 0)."""
    if prob == 0.0 or not training:
        return x
    keep = 1.0 - prob
    mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x.div(keep) * mask


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv) with drop path on the residual branch."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, drop_path_rate: float):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes * 4))
        self.drop_path_rate = drop_path_rate

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(identity + drop_path(out, self.drop_path_rate, self.training))


class ResNet(nn.Module):
    """The image stem: conv/BN/ReLU/maxpool then layer1..layer3 (no layer4): 1024 channels, stride 16."""

    def __init__(self, layers: list[int], drop_path_rate: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        rates = linear_rates(drop_path_rate, sum(layers))
        inplanes, start = 64, 0
        for index, (planes, blocks) in enumerate(zip((64, 128, 256), layers)):
            stride = 1 if index == 0 else 2
            stage = []
            for j in range(blocks):
                stage.append(Bottleneck(inplanes, planes, stride if j == 0 else 1, rates[start + j]))
                inplanes = planes * 4
            start += blocks
            setattr(self, f"layer{index + 1}", nn.Sequential(*stage))

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))


class MultiheadAttention(nn.Module):
    """q/k/v/out projections, q scaled by (head_dim * factor)^-0.5, per-head learned output scale c_attn."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.scaling = (self.head_dim * cfg.attn_scale_factor) ** -0.5
        self.k_proj, self.v_proj, self.q_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        self.c_attn = nn.Parameter(torch.ones(cfg.heads))
        self.dropout = cfg.attention_dropout
        self.backend = resolve_backend(cfg.attention_backend, cfg.position_scheme, cfg.attention_dropout)
        self.attend = attention  # apply_compile keeps it out of the compiled graph (own kernels, chunked backward)

    def split(self, x: Tensor) -> Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def project_kv(self, x: Tensor, rotary: Rotary | None = None) -> tuple[Tensor, Tensor]:
        k = self.split(self.k_proj(x))
        return (k if rotary is None else rotary.rotate(k)), self.split(self.v_proj(x))

    def forward(self, x: Tensor, k: Tensor, v: Tensor, bias: AttentionBias | None,
                key_padding_mask: Tensor | None, causal: bool = False, rotary: Rotary | None = None) -> Tensor:
        q = self.split(self.q_proj(x) * self.scaling)
        if rotary is not None:
            q = rotary.rotate(q)
        out = self.attend(q, k, v, bias, key_padding_mask, causal, self.dropout if self.training else 0.0,
                          self.backend)
        out = out * self.c_attn[None, :, None, None]
        return self.out_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class TransformerLayer(nn.Module):
    """What encoder and decoder layers share: the NormFormer FFN block and the dropout/drop-path residual.

    Subclasses build their attention blocks first, then call ``add_ffn``: that creation order is the
    order of PyTorch's default-init draws, which the released seeds' weights depend on.
    """

    def add_ffn(self, cfg: ModelConfig, drop_path_rate: float) -> None:
        d = cfg.d_model
        self.fc1, self.fc2 = nn.Linear(d, cfg.ffn_dim), nn.Linear(cfg.ffn_dim, d)
        self.ffn_layernorm = nn.LayerNorm(cfg.ffn_dim)
        self.final_layer_norm = nn.LayerNorm(d)
        self.dropout, self.activation_dropout, self.drop_path_rate = cfg.dropout, cfg.activation_dropout, drop_path_rate

    def residual(self, x: Tensor, h: Tensor) -> Tensor:
        return x + drop_path(F.dropout(h, self.dropout, self.training), self.drop_path_rate, self.training)

    def ffn(self, x: Tensor) -> Tensor:
        """NormFormer FFN branch: LN → fc1 → gelu → dropout → ffn_layernorm → fc2 → dropout."""
        x = F.gelu(self.fc1(self.final_layer_norm(x)))
        x = F.dropout(x, self.activation_dropout, self.training)
        return F.dropout(self.fc2(self.ffn_layernorm(x)), self.dropout, self.training)


class EncoderLayer(TransformerLayer):
    """Pre-LN NormFormer layer: x + DropPath(attn_ln(attn(ln(x)))), then the FFN block."""

    def __init__(self, cfg: ModelConfig, drop_path_rate: float):
        super().__init__()
        d = cfg.d_model
        self.self_attn = MultiheadAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.attn_ln = nn.LayerNorm(d)
        self.add_ffn(cfg, drop_path_rate)

    def forward(self, x: Tensor, padding_mask: Tensor | None, bias: AttentionBias | None,
                rotary: Rotary | None = None) -> Tensor:
        h = self.self_attn_layer_norm(x)
        k, v = self.self_attn.project_kv(h, rotary)
        x = self.residual(x, self.attn_ln(self.self_attn(h, k, v, bias, padding_mask, rotary=rotary)))
        return x + drop_path(self.ffn(x), self.drop_path_rate, self.training)


class DecoderLayer(TransformerLayer):
    """Self-attention (causal), cross-attention and FFN blocks, each pre-LN with a NormFormer mid-LN."""

    def __init__(self, cfg: ModelConfig, drop_path_rate: float):
        super().__init__()
        d = cfg.d_model
        self.self_attn = MultiheadAttention(cfg)
        self.self_attn_layer_norm, self.self_attn_ln = nn.LayerNorm(d), nn.LayerNorm(d)
        self.encoder_attn = MultiheadAttention(cfg)
        self.encoder_attn_layer_norm, self.cross_attn_ln = nn.LayerNorm(d), nn.LayerNorm(d)
        self.add_ffn(cfg, drop_path_rate)

    def forward(self, x: Tensor, encoder_states: Tensor, self_bias: AttentionBias | None,
                self_padding_mask: Tensor | None, cross_bias: AttentionBias | None,
                encoder_padding_mask: Tensor | None, rotary: Rotary | None = None,
                cache: "DecoderCache | None" = None, idx: int = 0) -> Tensor:
        """The new tokens ``x`` through the layer; with a ``cache``, their keys/values are appended to slot
        ``idx`` (self-attention reads them all) and the encoder's are projected once. ``rotary``: the new
        tokens' rotary tables (cached keys are stored rotated)."""
        h = self.self_attn_layer_norm(x)
        k, v = self.self_attn.project_kv(h, rotary)
        if cache is not None:
            if cache.self_kv[idx] is not None:
                pk, pv = cache.self_kv[idx]
                k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
            cache.self_kv[idx] = (k, v)
        cross_kv = cache.cross_kv[idx] if cache is not None else None
        if cross_kv is None:
            cross_kv = self.encoder_attn.project_kv(encoder_states)
            if cache is not None:
                cache.cross_kv[idx] = cross_kv
        h = self.self_attn(h, k, v, self_bias, self_padding_mask, causal=True, rotary=rotary)
        x = self.residual(x, self.self_attn_ln(h))
        h = self.encoder_attn(self.encoder_attn_layer_norm(x), *cross_kv, cross_bias, encoder_padding_mask)
        x = self.residual(x, self.cross_attn_ln(h))
        return x + drop_path(self.ffn(x), self.drop_path_rate, self.training)


class TiedEmbedding(nn.Embedding):
    """The token embedding, which is also the output projection (``project=True``: ``x @ weightᵀ``).

    Both uses are calls of this module, so every read of the weight is inside a call of the module that owns
    it (an engine that gathers a module's parameters around its calls sees both).
    """

    def forward(self, x: Tensor, project: bool = False) -> Tensor:
        return F.linear(x, self.weight) if project else super().forward(x)


class RelativeTable(nn.Embedding):
    """A relative-position table (rows × heads), called for the whole table: the attention kernels look
    buckets up in it themselves. A copy is returned, so the table's own storage may be released after the
    call (an engine that gathers parameters per call) while the kernels use the copy; its gradient flows back to the table."""

    def forward(self) -> Tensor:
        return self.weight.clone()


def add_relative_tables(module: nn.Module, cfg: ModelConfig, layers: int, max_positions: int) -> None:
    """Per-layer text and image relative-position tables (rows × heads) and their bucket buffers."""
    module.token_rel_pos_table_list = nn.ModuleList(
        RelativeTable(2 * cfg.token_bucket_size - 1, cfg.heads) for _ in range(layers))
    module.image_rel_pos_table_list = nn.ModuleList(
        RelativeTable((2 * cfg.image_bucket_size - 1) ** 2 + 3, cfg.heads) for _ in range(layers))
    module.register_buffer("token_rp_bucket", token_bucket_positions(cfg.token_bucket_size, max_positions),
                           persistent=False)
    module.register_buffer("image_rp_bucket", image_bucket_positions(cfg.image_bucket_size), persistent=False)


# ----------------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------------


@dataclass
class EncoderOutput:
    """Encoder states, their padding mask, and the normalised positions P for cross-attention (None: rope)."""

    states: Tensor  # [B, L, d]
    padding_mask: Tensor  # [B, L] bool, True = masked
    positions: Tensor | None  # [B, L, d]

    def reorder(self, index: Tensor) -> "EncoderOutput":
        positions = None if self.positions is None else self.positions.index_select(0, index)
        return EncoderOutput(self.states.index_select(0, index), self.padding_mask.index_select(0, index), positions)


def _pos_linear_heads(linear: nn.Linear, positions: Tensor, heads: int) -> Tensor:
    b, l, _ = positions.shape
    return linear(positions).view(b, l, heads, -1).transpose(1, 2)


class _Stack(nn.Module):
    """What the encoder and decoder share: the config, the tied token embedding, its layer norm."""

    def __init__(self, cfg: ModelConfig, embed_tokens: nn.Embedding):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = embed_tokens
        self.layernorm_embedding = nn.LayerNorm(cfg.d_model)

    def _add_position_tables(self, max_positions: int) -> None:
        """OFA's absolute text and image position tables and their layer norms."""
        d = self.cfg.d_model
        self.embed_positions = nn.Embedding(max_positions + 2, d)
        self.embed_image_positions = nn.Embedding(self.cfg.image_bucket_size ** 2 + 1, d)
        self.pos_ln, self.image_pos_ln = nn.LayerNorm(d), nn.LayerNorm(d)
        self.pos_scaling = (d / self.cfg.heads * self.cfg.attn_scale_factor) ** -0.5

    def _add_layers(self, layer: type, drop_path_rate: float, count: int, max_positions: int) -> None:
        """The layers (drop-path rates rising linearly), the final layer norm, OFA's relative tables."""
        self.layers = nn.ModuleList(layer(self.cfg, r) for r in linear_rates(drop_path_rate, count))
        self.layer_norm = nn.LayerNorm(self.cfg.d_model)
        if self.cfg.position_scheme == "ofa":
            add_relative_tables(self, self.cfg, count, max_positions)


class Encoder(_Stack):
    def __init__(self, cfg: ModelConfig, embed_tokens: nn.Embedding):
        super().__init__(cfg, embed_tokens)
        d = cfg.d_model
        ofa = cfg.position_scheme == "ofa"
        self.type_embedding = nn.Embedding(2, d)
        self.embed_images = ResNet(cfg.resnet_layers, cfg.resnet_drop_path_rate)
        self.image_proj = nn.Linear(1024, d)
        self.patch_layernorm_embedding = nn.LayerNorm(d)
        if ofa:
            self._add_position_tables(cfg.max_source_positions)
            self.pos_q_linear, self.pos_k_linear = nn.Linear(d, d), nn.Linear(d, d)
        self._add_layers(EncoderLayer, cfg.encoder_drop_path_rate, cfg.encoder_layers, cfg.max_source_positions)

    #: run the ResNet only on samples with an image (``patch_masks`` True); False: on every placeholder too
    image_rows_only = True

    def token_type(self, kind: int, device: torch.device) -> Tensor:
        """The type embedding ``[d]`` of text (0) or image (1) tokens."""
        return self.type_embedding(torch.tensor(kind, device=device))

    def embed_image(self, patch_images: Tensor, patch_masks: Tensor | None, sample_patch_num: int | None,
                    sample_rows: Tensor | None = None):
        """Image tokens, their padding mask and position ids (``[1, n]``, or ``[B, k]`` for a random subset).

        ``sample_patch_num`` keeps that many random patches of the rows ``sample_rows`` marks (all rows when
        None): OFA samples only its pretraining's image-text sub-batch. When only some rows are sampled,
        every row keeps n slots and a sampled row's slots past ``sample_patch_num`` are padding (masked).

        ``patch_images`` uint8 (0..255) are normalised here, on their device, with the config's image_mean /
        image_std; float images are taken as normalised. Text-only samples' image tokens are zeros (they are
        masked): the ResNet runs on one placeholder only when no sample has an image, so every batch calls the
        same modules (every parameter takes part in every step).
        """
        patch_images = normalise_images(patch_images, self.image_proj.weight.dtype, self.cfg.image_mean,
                                        self.cfg.image_std)
        rows_idx = None
        if self.image_rows_only and patch_masks is not None and not bool(patch_masks.all()):
            rows_idx = patch_masks.bool().nonzero().squeeze(1)
            rows_idx = rows_idx if rows_idx.numel() else rows_idx.new_zeros(1)
        full_b = patch_images.shape[0]
        if self.cfg.channels_last:
            patch_images = patch_images.contiguous(memory_format=torch.channels_last)
        features = self.embed_images(patch_images if rows_idx is None else patch_images.index_select(0, rows_idx))
        b, _, rows, cols = features.shape
        if rows > self.cfg.image_bucket_size or cols > self.cfg.image_bucket_size:
            raise ValueError(f"image grid {rows}x{cols} exceeds image_bucket_size {self.cfg.image_bucket_size} "
                             f"(images up to {16 * self.cfg.image_bucket_size} px)")
        tokens = features.flatten(2).transpose(1, 2)
        ids = image_position_ids(rows, cols, self.cfg.image_bucket_size).to(tokens.device)[None]
        sampled_away = None  # [b, n]: slots of sampled rows beyond sample_patch_num
        rows = None if sample_rows is None else sample_rows.bool()
        if rows is not None and rows_idx is not None:
            rows = rows.index_select(0, rows_idx)
        n = ids.shape[1]
        if sample_patch_num is not None and sample_patch_num < n and (rows is None or bool(rows.any())):
            order = torch.rand(b, n, device=tokens.device).argsort(dim=1)
            if rows is None or bool(rows.all()):
                order = order[:, :sample_patch_num]
            else:
                slots = torch.arange(n, device=tokens.device)
                order = torch.where(rows[:, None], order, slots.expand(b, n))
                sampled_away = rows[:, None] & (slots >= sample_patch_num)[None]
            tokens = tokens.gather(1, order[:, :, None].expand(-1, -1, tokens.shape[2]))
            ids = ids.expand(b, -1).gather(1, order)
        x = self.image_proj(tokens) + self.token_type(1, tokens.device)
        x = F.dropout(self.patch_layernorm_embedding(x), self.cfg.dropout, self.training)
        if rows_idx is not None:  # back to the whole batch; the placeholder rows stay in the graph (zero grads)
            x = x.new_zeros(full_b, *x.shape[1:]).index_copy(0, rows_idx, x)
            ids = ids if ids.shape[0] == 1 else ids.new_zeros(full_b, ids.shape[1]).index_copy(0, rows_idx, ids)
        padding = torch.zeros((full_b, ids.shape[1]), dtype=torch.bool, device=tokens.device)
        if sampled_away is not None:
            padding = sampled_away if rows_idx is None else padding.index_copy(0, rows_idx, sampled_away)
        if patch_masks is not None:
            padding = padding | ~patch_masks.bool()[:, None]
        return x, padding, ids

    def forward(self, src_tokens: Tensor, patch_images: Tensor | None = None, patch_masks: Tensor | None = None,
                sample_patch_num: int | None = None, sample_rows: Tensor | None = None) -> EncoderOutput:
        b, s = src_tokens.shape
        if s > self.cfg.max_source_positions:
            raise ValueError(f"source length {s} exceeds max_source_positions {self.cfg.max_source_positions}")
        x = self.embed_tokens(src_tokens) + self.token_type(0, src_tokens.device)
        x = F.dropout(self.layernorm_embedding(x), self.cfg.dropout, self.training)
        padding = src_tokens.eq(self.cfg.pad_id)
        image_ids = None
        if patch_images is not None:
            image_x, image_padding, image_ids = self.embed_image(patch_images, patch_masks, sample_patch_num,
                                                                 sample_rows)
            x = torch.cat([image_x, x], dim=1)
            padding = torch.cat([image_padding, padding], dim=1)
        x = x * (1 - padding.unsqueeze(-1).type_as(x))
        key_padding = padding if padding.any() else None
        if self.cfg.position_scheme == "rope":
            rotary = self.rotary(s, image_ids, x.device)
            for layer in self.layers:
                x = layer(x, key_padding, None, rotary)
            return EncoderOutput(self.layer_norm(x), padding, None)
        positions, biases = self.ofa_biases(s, image_ids)
        for layer, bias in zip(self.layers, biases):
            x = layer(x, key_padding, bias)
        return EncoderOutput(self.layer_norm(x), padding, positions.expand(b, -1, -1))

    def rotary(self, s: int, image_ids: Tensor | None, device: torch.device) -> Rotary:
        """2-D rotary over patch (row, col), 1-D rotary over text positions placed after the image grid."""
        coords = text_coords(0, s, self.cfg.image_bucket_size + 1, device)
        if image_ids is not None:
            image = image_id_coords(image_ids, self.cfg.image_bucket_size)
            coords = torch.cat([image, coords.expand(image.shape[0], -1, -1)], dim=1)
        return rotary_angles(coords, self.cfg.head_dim, self.cfg.rope_theta)

    def ofa_biases(self, s: int, image_ids: Tensor | None) -> tuple[Tensor, list[AttentionBias]]:
        """Positions P ``[1 or B, L, d]`` and each layer's bias: shared absolute part + its relative tables.

        Positions are batch-shared (batch 1) unless patches were sampled per sample.
        """
        heads, device = self.cfg.heads, self.token_rp_bucket.device
        positions = self.pos_ln(self.embed_positions(torch.arange(s, device=device)))[None]
        n_img = 0
        if image_ids is not None:
            n_img = image_ids.shape[1]
            image_positions = self.image_pos_ln(self.embed_image_positions(image_ids))
            positions = torch.cat([image_positions, positions.expand(image_ids.shape[0], -1, -1)], dim=1)
        base = AttentionBias(_pos_linear_heads(self.pos_q_linear, positions, heads) * self.pos_scaling,
                             _pos_linear_heads(self.pos_k_linear, positions, heads))
        text_ids = torch.arange(s, device=device)[None]
        text = RelativePositions(self.token_rp_bucket, text_ids, text_ids, n_img, n_img)
        image = RelativePositions(self.image_rp_bucket, image_ids, image_ids) if n_img else None
        biases = []
        for idx in range(len(self.layers)):
            rel = [RelativeBias(self.token_rel_pos_table_list[idx](), text)]
            if image is not None:
                rel.append(RelativeBias(self.image_rel_pos_table_list[idx](), image))
            biases.append(base.with_relative(rel))
        return positions, biases


# ----------------------------------------------------------------------------------------------
# Decoder
# ----------------------------------------------------------------------------------------------


class DecoderCache:
    """Keys/values of the tokens decoded so far (self-attention) and of the encoder (cross-attention)."""

    def __init__(self, num_layers: int):
        self.self_kv: list[tuple[Tensor, Tensor] | None] = [None] * num_layers
        self.cross_kv: list[tuple[Tensor, Tensor] | None] = [None] * num_layers
        self.cross_pos_k: Tensor | None = None
        self.length = 0

    def reorder(self, index: Tensor) -> None:
        """Follow beam search: keep the rows of ``index`` (along the batch dimension)."""
        pick = lambda kv: None if kv is None else (kv[0].index_select(0, index), kv[1].index_select(0, index))  # noqa: E731
        self.self_kv = [pick(kv) for kv in self.self_kv]
        self.cross_kv = [pick(kv) for kv in self.cross_kv]
        if self.cross_pos_k is not None:
            self.cross_pos_k = self.cross_pos_k.index_select(0, index)


class Decoder(_Stack):
    def __init__(self, cfg: ModelConfig, embed_tokens: nn.Embedding):
        super().__init__(cfg, embed_tokens)
        d = cfg.d_model
        ofa = cfg.position_scheme == "ofa"
        self.code_layernorm_embedding = nn.LayerNorm(d)
        if ofa:
            self._add_position_tables(cfg.max_target_positions)
            self.self_pos_q_linear, self.self_pos_k_linear = nn.Linear(d, d), nn.Linear(d, d)
            self.cross_pos_q_linear, self.cross_pos_k_linear = nn.Linear(d, d), nn.Linear(d, d)
        self._add_layers(DecoderLayer, cfg.decoder_drop_path_rate, cfg.decoder_layers, cfg.max_target_positions)
        # Position ids of generated image codes: 0 for <s>, then the code window row-major, then a filler.
        window = image_position_ids(cfg.code_grid, cfg.code_grid, cfg.image_bucket_size)
        filler = torch.full((cfg.max_target_positions + 1 - window.numel(),), 1024)
        self.register_buffer("image_position_idx", torch.cat([torch.zeros(1, dtype=torch.long), window, filler]),
                             persistent=False)

    def target_positions(self, length: int, code_masks: Tensor | None) -> Tensor:
        """Normalised target positions ``[1 or B, T, d]``: text positions, or the code window for image codes."""
        ids = torch.arange(length, device=self.image_position_idx.device)
        positions = self.pos_ln(self.embed_positions(ids))[None]
        if code_masks is not None and code_masks.any():
            code_pos = self.image_pos_ln(self.embed_image_positions(self.image_position_idx[:length]))
            positions = torch.where(code_masks.bool()[:, None, None], code_pos[None], positions)
        return positions

    def forward(self, prev_output_tokens: Tensor, encoder_out: EncoderOutput, code_masks: Tensor | None = None,
                cache: DecoderCache | None = None) -> Tensor:
        """Hidden states of the tokens after ``cache.length`` (all tokens without a cache)."""
        t = prev_output_tokens.shape[1]
        if t > self.cfg.max_target_positions:
            raise ValueError(f"target length {t} exceeds max_target_positions {self.cfg.max_target_positions}")
        start = cache.length if cache is not None else 0
        tokens = prev_output_tokens[:, start:]
        x = self.embed_tokens(tokens)
        if code_masks is not None and code_masks.any():
            x = torch.where(code_masks.bool()[:, None, None], self.code_layernorm_embedding(x),
                            self.layernorm_embedding(x))
        else:
            x = self.layernorm_embedding(x)
        x = F.dropout(x, self.cfg.dropout, self.training)

        self_padding = prev_output_tokens.eq(self.cfg.pad_id)
        self_padding = self_padding if self_padding.any() else None
        encoder_padding = encoder_out.padding_mask if encoder_out.padding_mask.any() else None
        if self.cfg.position_scheme == "rope":
            rotary = self.rotary(start, t, code_masks, x.device)
            self_biases, cross_bias = [None] * len(self.layers), None
        else:
            rotary = None
            self_biases, cross_bias = self.ofa_biases(start, t, code_masks, encoder_out, cache)
        for idx, layer in enumerate(self.layers):
            x = layer(x, encoder_out.states, self_biases[idx], self_padding, cross_bias, encoder_padding, rotary,
                      cache, idx)
        if cache is not None:
            cache.length = t
        return self.layer_norm(x)

    def rotary(self, start: int, t: int, code_masks: Tensor | None, device: torch.device) -> Rotary:
        """Rotary tables of target positions ``start..t-1``: 1-D for text, 2-D over the code window for codes."""
        coords = text_coords(start, t, 0, device)
        if code_masks is not None and code_masks.any():
            code = image_id_coords(self.image_position_idx[start:t], self.cfg.image_bucket_size)[None]
            coords = torch.where(code_masks.bool()[:, None, None], code, coords)
        return rotary_angles(coords, self.cfg.head_dim, self.cfg.rope_theta)

    def ofa_biases(self, start: int, t: int, code_masks: Tensor | None, encoder_out: EncoderOutput,
                   cache: DecoderCache | None) -> tuple[list[AttentionBias], AttentionBias]:
        """Each layer's self-attention bias (absolute + its relative tables) and the cross-attention bias."""
        heads = self.cfg.heads
        positions = self.target_positions(t, code_masks)
        self_base = AttentionBias(
            _pos_linear_heads(self.self_pos_q_linear, positions[:, start:], heads) * self.pos_scaling,
            _pos_linear_heads(self.self_pos_k_linear, positions, heads))
        if cache is not None and cache.cross_pos_k is not None:
            cross_pos_k = cache.cross_pos_k
        else:
            cross_pos_k = _pos_linear_heads(self.cross_pos_k_linear, encoder_out.positions, heads)
            if cache is not None:
                cache.cross_pos_k = cross_pos_k
        cross_bias = AttentionBias(
            _pos_linear_heads(self.cross_pos_q_linear, positions[:, start:], heads) * self.pos_scaling, cross_pos_k)

        device = self.token_rp_bucket.device
        text = RelativePositions(self.token_rp_bucket, torch.arange(start, t, device=device)[None],
                                 torch.arange(t, device=device)[None])
        code = code_masks.bool() if code_masks is not None and code_masks.any() else None
        if code is not None:
            ids = self.image_position_idx[:t]
            image = RelativePositions(self.image_rp_bucket, ids[start:][None], ids[None])
        biases = []
        for idx in range(len(self.layers)):
            token_table = self.token_rel_pos_table_list[idx]()
            if code is None:
                rel = [RelativeBias(token_table, text)]
            else:
                rel = [RelativeBias(token_table, text, samples=~code),
                       RelativeBias(self.image_rel_pos_table_list[idx](), image, samples=code)]
            biases.append(self_base.with_relative(rel))
        return biases, cross_bias


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class BiomedGPT(nn.Module):
    """OFA/BiomedGPT encoder-decoder with one tied embedding for text, image codes and location bins."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = TiedEmbedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        self.encoder = Encoder(cfg, self.embed_tokens)
        self.decoder = Decoder(cfg, self.embed_tokens)

    @torch.no_grad()
    def init_weights(self) -> "BiomedGPT":
        """fairseq/OFA initialisation: N(0, d^-0.5) embeddings, xavier projections, zero relative tables.

        Not run by ``__init__`` (whose modules keep PyTorch's defaults), so a model that loads weights
        skips it, and a model built already partitioned runs it once on the gathered parameters. The rest of the
        parameters keep PyTorch's defaults, drawn at construction. Returns the model.
        """
        d = self.cfg.d_model
        for module in self.modules():
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, d ** -0.5)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, MultiheadAttention):
                for proj in (module.q_proj, module.k_proj, module.v_proj):
                    nn.init.xavier_uniform_(proj.weight, gain=2 ** -0.5)
                nn.init.xavier_uniform_(module.out_proj.weight)
                nn.init.zeros_(module.out_proj.bias)
            elif isinstance(module, TransformerLayer):
                for fc in (module.fc1, module.fc2):
                    nn.init.xavier_uniform_(fc.weight)
                    nn.init.zeros_(fc.bias)
            elif isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if self.cfg.position_scheme == "ofa":
            for coder in (self.encoder, self.decoder):
                for table in [*coder.token_rel_pos_table_list, *coder.image_rel_pos_table_list]:
                    nn.init.zeros_(table.weight)
        return self

    def encode(self, src_tokens: Tensor, patch_images: Tensor | None = None, patch_masks: Tensor | None = None,
               sample_patch_num: int | None = None, sample_rows: Tensor | None = None) -> EncoderOutput:
        return self.encoder(src_tokens, patch_images, patch_masks, sample_patch_num, sample_rows)

    def new_cache(self) -> DecoderCache:
        return DecoderCache(self.cfg.decoder_layers)

    def decode(self, prev_output_tokens: Tensor, encoder_out: EncoderOutput, code_masks: Tensor | None = None,
               cache: DecoderCache | None = None) -> Tensor:
        """Logits [B, T', V] of the tokens after those already in ``cache`` (all of them without one)."""
        hidden = self.decoder(prev_output_tokens, encoder_out, code_masks, cache)
        return self.embed_tokens(hidden, project=True)

    def forward(self, src_tokens: Tensor, prev_output_tokens: Tensor, patch_images: Tensor | None = None,
                patch_masks: Tensor | None = None, code_masks: Tensor | None = None,
                sample_patch_num: int | None = None, sample_rows: Tensor | None = None) -> Tensor:
        """Logits [B, T, V]; ``sample_patch_num`` random patches per image of the rows ``sample_rows`` marks
        (every row when None). One pass: a text-only sample (``patch_masks`` False) attends over its masked
        image tokens, which changes none of its logits (training runs such samples as a second pass without
        them: ``engine/distributed/modality_passes.py``)."""
        encoder_out = self.encode(src_tokens, patch_images, patch_masks, sample_patch_num, sample_rows)
        return self.decode(prev_output_tokens, encoder_out, code_masks)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, each shared tensor once (the tied embedding), BN statistics excluded."""
    return sum(p.numel() for p in model.parameters())

