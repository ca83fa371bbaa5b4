"""Precision names (``fp32`` / ``bf16`` / ``fp16``: settings, model directories, checkpoints) and their torch
dtypes: the one map between the two, for every package (settings stay torch-free: ``models.config.Precision``)."""
from __future__ import annotations

import typing

import torch

from biomedgpt.models.config import Precision

_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
assert set(_DTYPES) == set(typing.get_args(Precision))


def torch_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a precision name."""
    try:
        return _DTYPES[precision]
    except KeyError:
        raise ValueError(f"unknown precision {precision!r}; known: {', '.join(_DTYPES)}") from None
