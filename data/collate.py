"""Collation: examples -> the batch dict of docs/DESIGN.md ("Batches"), the same keys on every rank, every step."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch

from biomedgpt.data.tasks import PAD, TASK_NAMES, Example

if TYPE_CHECKING:
    from biomedgpt.data.constraints import AnswerConstraints

_TASK_INDEX = {name: i for i, name in enumerate(TASK_NAMES)}
_BATCH_WIDE = ("group_weights", "sample_patch_num")  # batch keys that hold one value for all rows


def _pad(rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """Rows right-padded with PAD; filled in numpy (a torch tensor per row cost 8x as much)."""
    out = np.full((len(rows), max(map(len, rows))), PAD, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return torch.from_numpy(out)


def collate(examples: Sequence[Example], patch_image_size: int, group_weights: Sequence[float],
            with_references: bool = False, constraints: Optional["AnswerConstraints"] = None,
            sample_patch_num: Optional[int] = None) -> dict:
    """Right-pad tokens with 1; images stay uint8 (the model normalises them on its device); text-only
    examples get a zero image and ``patch_masks`` False.

    ``group_weights`` is carried whole even when a group has no example in this batch, so every rank
    sees the same structure. ``with_references`` adds, for evaluation, ``references`` (list of reference
    strings per example) and ``answer_types`` (the VQA "open" / "closed" annotation, or None).
    ``constraints`` adds ``constraint_masks`` (``data/constraints.py``: answer-set constrained training).
    ``sample_patch_num`` (training batches, ``data.sample_patch_num``) is carried as is: the patches the encoder
    keeps of the rows ``sample_patches`` marks.
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    # channels-last like the transforms' output (a plain copy per image); the model makes it contiguous
    images = torch.empty(len(examples), patch_image_size, patch_image_size, 3, dtype=torch.uint8).permute(0, 3, 1, 2)
    for i, ex in enumerate(examples):
        if ex.image is None:
            images[i] = 0
            continue
        if tuple(ex.image.shape) != (3, patch_image_size, patch_image_size) or ex.image.dtype != torch.uint8:
            raise ValueError(f"example {ex.uid!r} ({ex.task}): image {ex.image.dtype} {tuple(ex.image.shape)}, "
                             f"expected uint8 (3, {patch_image_size}, {patch_image_size})")
        images[i] = ex.image
    for ex in examples:
        if len(ex.prev_output) != len(ex.target):
            raise ValueError(f"example {ex.uid!r} ({ex.task}): decoder input and target lengths differ")
    batch = {
        "src_tokens": _pad([ex.source for ex in examples]),
        "src_lengths": torch.tensor([len(ex.source) for ex in examples], dtype=torch.long),
        "patch_images": images,
        "patch_masks": torch.tensor([ex.image is not None for ex in examples], dtype=torch.bool),
        "prev_output_tokens": _pad([ex.prev_output for ex in examples]),
        "target": _pad([ex.target for ex in examples]),
        "code_masks": torch.tensor([ex.code_mask for ex in examples], dtype=torch.bool),
        "sample_patches": torch.tensor([ex.sample_patches for ex in examples], dtype=torch.bool),
        "conf": torch.tensor([ex.conf for ex in examples], dtype=torch.float),
        "loss_groups": torch.tensor([ex.loss_group for ex in examples], dtype=torch.long),
        "group_weights": [float(w) for w in group_weights],
        "task_ids": torch.tensor([_TASK_INDEX[ex.task] for ex in examples], dtype=torch.long),
        "ids": [ex.uid for ex in examples],
    }
    if sample_patch_num is not None:
        batch["sample_patch_num"] = sample_patch_num
    if constraints is not None:
        batch["constraint_masks"] = constraints.masks(examples, batch["target"].shape[1])
    if with_references:
        batch["references"] = [dict(ex.references) if isinstance(ex.references, dict) else list(ex.references)
                               for ex in examples]
        batch["answer_types"] = [ex.answer_type for ex in examples]
    return batch


def first_rows(batch: dict, count: int) -> dict:
    """The examples of a collated batch's first ``count`` rows (a row's examples share its id and follow
    each other); ``group_weights`` and ``sample_patch_num`` stay whole."""
    ids, seen, end = batch["ids"], set(), 0
    for end, uid in enumerate(ids):
        if uid not in seen and len(seen) == count:
            break
        seen.add(uid)
    else:
        end = len(ids)
    return {key: value if key in _BATCH_WIDE else value[:end] for key, value in batch.items()}
