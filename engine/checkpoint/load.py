"""Reading training-checkpoint files without running anything they hold.

Every ``.pt`` file of a checkpoint tag (DeepSpeed's model states and ZeRO optimizer shards, a universal
checkpoint's files, the engine's per-rank state) is read with ``torch.load(weights_only=True)`` under
``torch.serialization.safe_globals(CHECKPOINT_GLOBALS)``: the globals DeepSpeed 0.19 and this engine
pickle, found by writing real checkpoints at ZeRO 0-3 in fp32 and bf16 (and a universal conversion) and
listing ``torch.serialization.get_unsafe_globals_in_checkpoint``. Anything else is refused with one line
naming the file and the global (``biomedgpt.models.checkpoint.load_weights_only``). The commands, the
resume checks and DeepSpeed's own loading during a resume (``CheckpointManager.attach``) go through here.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any


@functools.lru_cache(maxsize=None)
def checkpoint_globals() -> tuple:
    """DeepSpeed's classes a checkpoint pickles: the loss scaler (fp32: the static one; fp16: the dynamic
    one), the ZeRO stage enum, ZeRO 1/2's parameter slice addresses. numpy's reconstructors (the engine's
    saved numpy RNG state) are allowed by ``load_weights_only`` itself."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)


def load_checkpoint_file(path: str | Path, mmap: bool = True, meta: bool = False) -> Any:
    """One checkpoint file, weights-only; with ``mmap`` its tensors stay in the file (mapped) until read,
    with ``meta`` none is read (meta tensors; where each lies in the file: ``zero_reader.CheckpointFile``).
    Raises ``CheckpointError`` (one line naming the file) for a missing, junk, truncated or unsafe file."""
    from biomedgpt.models.checkpoint import load_weights_only

    return load_weights_only(path, list(checkpoint_globals()), mmap=mmap and not meta, meta=meta)
