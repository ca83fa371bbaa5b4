"""Reading training-checkpoint files without running anything they hold.

Every ``.pt`` file of a checkpoint tag (DeepSpeed's model states and ZeRO optimizer shards, a universal
checkpoint's files, the engine's per-rank state) is read with ``torch.load(weights_only=True)`` under
``torch.serialization.safe_globals`` of ``DEEPSPEED_GLOBALS``: the globals DeepSpeed 0.19 and this engine
pickle, found by writing real checkpoints at ZeRO 0-3 in fp32 and bf16 (and a universal conversion) and
listing ``torch.serialization.get_unsafe_globals_in_checkpoint``. Anything else is refused with one line
naming the file and the global (``biomedgpt.models.checkpoint.load_weights_only``). The commands, the
resume checks and DeepSpeed's own loading during a resume (``CheckpointManager.attach``) go through here.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
from pathlib import Path
from typing import Any

#: DeepSpeed's classes a checkpoint pickles, by the name the pickle gives them: the loss scaler (fp32: the
#: static one; fp16: the dynamic one), the ZeRO stage enum, ZeRO 1/2's parameter slice addresses.
DEEPSPEED_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                     "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                     "deepspeed.runtime.zero.config.ZeroStageEnum",
                     "deepspeed.utils.tensor_fragment.fragment_address")


class _ZeroStage(enum.IntEnum):
    """Stands in for ``ZeroStageEnum`` (same values: an int to every reader)."""

    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3


class _LossScalerState:
    """Stands in for DeepSpeed's loss scalers: holds the pickled attributes, runs nothing."""


@dataclasses.dataclass
class _FragmentAddress:
    """Stands in for ``fragment_address`` (a slice of a flat parameter group)."""

    numel: int
    start: int


def _deepspeed_classes() -> tuple:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)


@functools.lru_cache(maxsize=None)
def checkpoint_globals(live: bool = False) -> tuple:
    """The allow-list of ``DEEPSPEED_GLOBALS``: with ``live``, DeepSpeed's own classes (for DeepSpeed loading
    the objects back during a resume); else small stand-ins under the same names, so that reading a
    checkpoint (consolidation, checks) needs no DeepSpeed import (seconds). numpy's reconstructors (the
    engine's saved numpy RNG state) are allowed by ``load_weights_only`` itself."""
    if live:
        classes = _deepspeed_classes()
    else:
        classes = (_LossScalerState, _LossScalerState, _ZeroStage, _FragmentAddress)
    return tuple(zip(classes, DEEPSPEED_GLOBALS))


def load_checkpoint_file(path: str | Path, mmap: bool = True, meta: bool = False, live: bool = False) -> Any:
    """One checkpoint file, weights-only; with ``mmap`` its tensors stay in the file (mapped) until read,
    with ``meta`` none is read (meta tensors; where each lies in the file: ``zero_reader.CheckpointFile``);
    ``live``: DeepSpeed's objects as DeepSpeed pickled them, else stand-ins (``checkpoint_globals``).
    Raises ``CheckpointError`` (one line naming the file) for a missing, junk, truncated or unsafe file."""
    from biomedgpt.models.checkpoint import load_weights_only

    return load_weights_only(path, list(checkpoint_globals(live)), mmap=mmap and not meta, meta=meta)
