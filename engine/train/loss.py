"""OFA's label-smoothed cross-entropy: confidence weights, constrained smoothing, drop-worst, sub-batch
normalisation by the micro-batch's own token count or by a whole accumulation window's (fairseq's)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class LossOutput:
    loss: Tensor  # the scalar to back-propagate: sum over groups of weight * (group loss / group tokens)
    sample_loss: Tensor  # [B] summed smoothed loss per sample (detached), for per-task logging
    sample_nll: Tensor  # [B] summed unsmoothed NLL per sample (detached)
    sample_tokens: Tensor  # [B] target tokens per sample that count in the loss (drop-worst leaves some out)
    sample_correct: Tensor  # [B] argmax hits per sample among those tokens


def label_smoothed_cross_entropy(
    logits: Tensor,
    target: Tensor,
    epsilon: float,
    pad_id: int = 1,
    conf: Optional[Tensor] = None,
    constraint_masks: Optional[Tensor] = None,
    loss_groups: Optional[Tensor] = None,
    group_weights: Optional[Sequence[float]] = None,
    drop_worst_ratio: float = 0.0,
    group_tokens: Optional[Tensor] = None,
) -> LossOutput:
    """Per token: (1 - ε - ε_i)·nll + ε_i·Σ_allowed(-log p), ε_i = ε / (allowed - 1).

    ``allowed`` is the whole vocabulary, or the tokens of ``constraint_masks`` [B, T, V] (their logits
    are masked to -inf before the log-softmax, so smoothing never puts mass on impossible answers).
    ``conf`` [B] weights each sample's tokens (VQA answer confidence). Each loss group (``loss_groups``
    [B], indices into ``group_weights``) is normalised by its own token count, then weighted and summed:
    the pretraining mixture's second sub-batch has its own normalisation and weight 2.

    ``drop_worst_ratio`` (OFA's drop-worst): each group keeps the ``int(n * (1 - ratio))`` of its ``n`` target
    tokens with the smallest (confidence-weighted) loss; the rest are left out of the loss, its count and the
    statistics.
    ``group_tokens`` [groups] replaces the token counts the groups are divided by (fairseq's normalisation:
    the counts of a whole accumulation window on every rank, ``kept_tokens`` summed).
    """
    logits = logits.float()
    if constraint_masks is not None:
        constraint_masks = constraint_masks.bool()
        logits = logits.masked_fill(~constraint_masks, float("-inf"))
    lprobs = F.log_softmax(logits, dim=-1)
    mask = target.ne(pad_id)
    safe_target = target.masked_fill(~mask, 0)
    nll = -lprobs.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1)
    if constraint_masks is not None:
        smooth = -lprobs.masked_fill(~constraint_masks, 0.0).sum(-1)
        eps_i = epsilon / (constraint_masks.sum(-1) - 1).clamp(min=1).float()
    else:
        smooth = -lprobs.sum(-1)
        eps_i = torch.full_like(nll, epsilon / (lprobs.shape[-1] - 1))
    token_loss = (1.0 - epsilon - eps_i) * nll + eps_i * smooth
    zero = torch.zeros((), dtype=token_loss.dtype, device=token_loss.device)
    token_loss = torch.where(mask, token_loss, zero)
    nll = torch.where(mask, nll, zero)
    if conf is not None:
        weight = conf.to(token_loss.dtype)[:, None]
        token_loss, nll = token_loss * weight, nll * weight

    if loss_groups is None:
        loss_groups = torch.zeros(target.shape[0], dtype=torch.long, device=target.device)
    if drop_worst_ratio > 0:
        mask = mask & ~_worst_tokens(token_loss.detach(), mask, loss_groups, drop_worst_ratio)
        token_loss, nll = torch.where(mask, token_loss, zero), torch.where(mask, nll, zero)

    sample_loss = token_loss.sum(1)
    sample_tokens = mask.sum(1)
    weights = torch.as_tensor(list(group_weights or [1.0]), dtype=sample_loss.dtype, device=sample_loss.device)
    if int(loss_groups.max()) >= weights.numel():
        raise ValueError(f"loss group {int(loss_groups.max())} has no weight in group_weights {weights.tolist()}")
    n = weights.numel()
    group_loss = torch.zeros(n, dtype=sample_loss.dtype, device=sample_loss.device).index_add(
        0, loss_groups, sample_loss)
    if group_tokens is None:
        group_tokens = torch.zeros(n, dtype=sample_loss.dtype, device=sample_loss.device).index_add(
            0, loss_groups, sample_tokens.to(sample_loss.dtype))
    elif group_tokens.numel() != n:
        raise ValueError(f"group_tokens has {group_tokens.numel()} counts for {n} loss groups")
    loss = (weights * group_loss / group_tokens.to(group_loss).clamp(min=1)).sum()
    with torch.no_grad():
        correct = (lprobs.argmax(-1).eq(target) & mask).sum(1)
    return LossOutput(loss=loss, sample_loss=sample_loss.detach(), sample_nll=nll.sum(1).detach(),
                      sample_tokens=sample_tokens, sample_correct=correct)


def _worst_tokens(token_loss: Tensor, mask: Tensor, loss_groups: Tensor, ratio: float) -> Tensor:
    """[B, T] bool: per loss group, the target tokens beyond the ``int(n * (1 - ratio))`` smallest losses."""
    worst = torch.zeros_like(mask)
    group_of_token = loss_groups[:, None].expand_as(mask)
    for group in loss_groups.unique().tolist():
        where = (mask & group_of_token.eq(group)).nonzero(as_tuple=True)
        drop = where[0].numel() - int(where[0].numel() * (1.0 - ratio))
        if drop:
            top = token_loss[where].topk(drop).indices
            worst[where[0][top], where[1][top]] = True
    return worst


def kept_tokens(target: Tensor, loss_groups: Optional[Tensor], num_groups: int, drop_worst_ratio: float = 0.0,
                pad_id: int = 1) -> Tensor:
    """[num_groups] float64: the target tokens per loss group that ``label_smoothed_cross_entropy`` keeps for
    this batch (``int(n * (1 - drop_worst_ratio))`` of each group's ``n``); no forward needed."""
    if loss_groups is None:
        loss_groups = torch.zeros(target.shape[0], dtype=torch.long, device=target.device)
    per_sample = target.ne(pad_id).sum(1).to(torch.float64)
    counts = torch.zeros(num_groups, dtype=torch.float64, device=target.device).index_add(0, loss_groups, per_sample)
    return torch.floor(counts * (1.0 - drop_worst_ratio))
