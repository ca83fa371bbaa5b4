"""A model directory's files without torch: their names, the shard planner, the shard index, ``config.json``,
the atomic publish, and the error of a checkpoint that cannot be used.

The tensors' side (reading, writing safetensors from tensors, import of released weights) is
``biomedgpt.models.checkpoint``, which re-exports these names; this module is what a tool needs that
writes a model directory from bytes it already has (``engine/checkpoint/consolidation_index.py``) and
starts in a fraction of a second because it imports no torch.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Mapping

from biomedgpt.core import durable


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message names the file and key."""


TIED_KEY = "embed_tokens.weight"
TIED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "decoder.output_projection.weight")
WEIGHTS_PATTERN = "model{suffix}.safetensors"  # model.safetensors, or model-00001-of-00003.safetensors ...
WEIGHTS_INDEX = "model.safetensors.index.json"
CONFIG_FILE = "config.json"


def plan_shards(sizes: Mapping[str, int], max_shard_bytes: int):
    """Which safetensors file each tensor goes to, from each tensor's size in bytes (``huggingface_hub``'s
    planner, in ``sizes``' order: the file names and index transformers reads). The one planner of the
    project (model directories and consolidation)."""
    from huggingface_hub import split_state_dict_into_shards_factory

    # the factory with the size itself: split_torch_state_dict_into_shards's own size function imports
    # torch.distributed.tensor (seconds) to recognise DTensors, which a model directory never holds
    return split_state_dict_into_shards_factory(dict(sizes), get_storage_size=lambda size: size,
                                                filename_pattern=WEIGHTS_PATTERN, max_shard_size=max_shard_bytes)


def write_shard_index(directory: Path, plan) -> None:
    """``model.safetensors.index.json`` for a plan of several files (none for one)."""
    if plan.is_sharded:
        index = {"metadata": plan.metadata, "weight_map": plan.tensor_to_filename}
        (directory / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2))


def write_config(directory: Path, cfg: Any) -> None:
    """``config.json``: the model config (a ``ModelConfig``) as its fields."""
    (directory / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(cfg), indent=2))


def write_dir_atomically(out_dir: Path, write: Callable[[Path], None], overwrite: bool) -> Path:
    """``write(folder)`` fills a new folder that then replaces ``out_dir`` durably (``core/durable.py``):
    a crash never leaves a complete-looking directory. An existing ``out_dir`` needs ``overwrite``."""
    if Path(out_dir).exists() and not overwrite:
        raise CheckpointError(f"{out_dir} already exists (pass overwrite=true to replace it)")
    return durable.write_dir_atomically(out_dir, write)
