"""The train step's forward: a batch as two passes by modality, and on several ranks the same module calls
for every batch.

A text-only sample's image tokens are all masked, so leaving them out changes no logit; running the samples
with an image and the text-only samples as two passes saves the ResNet and the encoder / cross attention over
those tokens. Logits come back in the batch's order.

With ``same_calls`` (``ZeroPlan.same_calls_every_batch``: several ranks) both passes run for every batch,
whatever its mix, so every rank makes the same module calls in the same order (ZeRO-3 gathers each module's
parameters collectively) and its gradients become ready in the same order (DeepSpeed reduces them in buckets
in that order): a side without samples runs on one stand-in row whose logits are dropped (zero gradients) --
a 32 px blank image with the BatchNorm statistics untouched, or row 0's text. Without it only the image side
gets a stand-in (all-text batches: the ResNet's parameters still take part in every step), and a batch of
images only runs as one pass.

The model itself (``models/ofa.py``) stays one pass over its public ``encode`` / ``decode``; ``split_by_modality``
installs this forward on the model instance, so parameter names and checkpoints are unchanged.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from biomedgpt.models.ofa import BiomedGPT

#: side of the stand-in image of a batch without images (a 2 x 2 feature grid: BatchNorm needs > 1 value)
PLACEHOLDER_SIDE = 32


def split_by_modality(model: BiomedGPT, same_calls: bool) -> BiomedGPT:
    """``model`` (in place) with ``forward_by_modality`` as its forward; returns it."""
    model.forward = functools.partial(forward_by_modality, model, same_calls=same_calls)
    return model


def forward_by_modality(model: BiomedGPT, src_tokens: Tensor, prev_output_tokens: Tensor,
                        patch_images: Tensor | None = None, patch_masks: Tensor | None = None,
                        code_masks: Tensor | None = None, sample_patch_num: int | None = None,
                        sample_rows: Tensor | None = None, *, same_calls: bool) -> Tensor:
    """``BiomedGPT.forward``'s logits [B, T, V], as two passes where the batch has text-only samples (or
    ``same_calls``; see the module docstring)."""
    if (patch_images is None or patch_masks is None or not model.encoder.image_rows_only
            or (not same_calls and bool(patch_masks.all()))):
        encoder_out = model.encode(src_tokens, patch_images, patch_masks, sample_patch_num, sample_rows)
        return model.decode(prev_output_tokens, encoder_out, code_masks)
    has = patch_masks.bool()
    img, txt = has.nonzero().squeeze(1), (~has).nonzero().squeeze(1)
    stand_in = img.new_zeros(1)

    def part(index: Tensor, images: Tensor | None) -> Tensor:
        codes = None if code_masks is None else code_masks.index_select(0, index)
        rows = None if sample_rows is None else sample_rows.index_select(0, index)
        enc = model.encode(src_tokens.index_select(0, index), images, None, sample_patch_num, rows)
        return model.decode(prev_output_tokens.index_select(0, index), enc, codes)

    if img.numel():
        image_logits = part(img, patch_images.index_select(0, img))
    else:
        side = PLACEHOLDER_SIDE
        with _statistics_kept(model.encoder.embed_images):
            image_logits = part(stand_in, patch_images.new_zeros(1, patch_images.shape[1], side, side))
    parts = [image_logits]
    if txt.numel() or same_calls:
        parts.append(part(txt if txt.numel() else stand_in, None))
    logits = torch.cat(parts)
    rows = torch.empty_like(has, dtype=torch.long)
    rows[img] = torch.arange(img.numel(), device=rows.device)
    rows[txt] = torch.arange(image_logits.shape[0], image_logits.shape[0] + txt.numel(), device=rows.device)
    return logits.index_select(0, rows)


class _statistics_kept:
    """BatchNorm layers of ``module`` normalise with batch statistics but leave their running ones as they were."""

    def __init__(self, module: nn.Module):
        self.norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def __enter__(self) -> None:
        self.saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
                      for m in self.norms]
        for m in self.norms:
            m.momentum = 0.0

    def __exit__(self, *exc) -> None:
        for m, (momentum, tracked) in zip(self.norms, self.saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
