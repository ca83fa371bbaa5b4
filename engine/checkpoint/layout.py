"""The names of a training checkpoint's files: the one place they are spelled (writer, reader, tools, tests),
and finding a tag from a run or checkpoints folder (torch-free).

Layout under ``<output_dir>/checkpoints``::

    step_00000100/                 one DeepSpeed tag (model/optimizer shards of every rank)
        mp_rank_00_model_states.pt                 DeepSpeed's model states (ZeRO-3: one per rank,
        zero_pp_rank_R_mp_rank_00_model_states.pt   named after the rank)
        zero_pp_rank_R_mp_rank_00_optim_states.pt  rank R's optimizer shard (ZeRO 1-3)
        rank_00000.pt ...          this rank's loader state, RNG states, BN buffers, EMA shard
        .complete_rank_00000 ...   this rank's files are durable
        .failed_rank_00000 ...     this rank's write failed (disk full, ...): the tag is never completed
        consolidation_index.json   where each tensor of the consolidated model lies (rank 0, before meta.json)
        meta.json                  written last: the checkpoint is complete
        universal/                 made on demand when resuming into another world size / ZeRO stage
        zero/<param>/fp32.pt       (a universal checkpoint's own tag) one fp32 tensor per parameter
    latest                         the tag of the newest complete checkpoint (replaced atomically)

A consolidated model directory carries ``consolidation.json`` (what was written, for ``verify``).
"""
from __future__ import annotations

import re
from pathlib import Path

from biomedgpt.models.model_dir import CheckpointError

LATEST_FILE = "latest"
META_FILE = "meta.json"
UNIVERSAL_DIR = "universal"
LATEST_UNIVERSAL_FILE = "latest_universal"  # ds_to_universal's pointer beside its output
UNIVERSAL_PARAMS_DIR = "zero"
UNIVERSAL_PARAM_FILE = "fp32.pt"
REPORT_FILE = "consolidation.json"
CONSOLIDATION_INDEX_FILE = "consolidation_index.json"
TAG_RE = re.compile(r"^step_(\d{8})$")
MODEL_FILE_RE = re.compile(r"^(?:zero_pp_rank_(?P<rank>\d+)_)?mp_rank_(?P<mp>\d+)_model_states\.pt$")
OPTIM_FILE_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(?P<rank>\d+)_mp_rank_(?P<mp>\d+)_optim_states\.pt$")
# Any per-rank file of a tag (ours or DeepSpeed's), with its rank.
RANK_RE = re.compile(r"(?:rank_|zero_pp_rank_)0*(\d+)")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rank_state_file(rank: int) -> str:
    """The engine's own per-rank state (loader, RNG, buffers, EMA shard)."""
    return f"rank_{rank:05d}.pt"


def complete_mark(rank: int) -> str:
    return f".complete_rank_{rank:05d}"


def failed_mark(rank: int) -> str:
    """This rank could not write its files (rank 0 then stops waiting for them)."""
    return f".failed_rank_{rank:05d}"


def model_states_file(rank: int | None = None) -> str:
    """DeepSpeed's model-states file: rank 0's single file (stages 0-2) or, with ``rank``, ZeRO-3's per-rank one."""
    return "mp_rank_00_model_states.pt" if rank is None else f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"


def optim_states_file(rank: int) -> str:
    return f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def with_rank(name: str, rank: int) -> str:
    """A rank file's name with another rank (e.g. the missing shard next to one that exists)."""
    return re.sub(r"zero_pp_rank_\d+_", f"zero_pp_rank_{rank}_", name)


def is_optim_file(name: str) -> bool:
    return OPTIM_FILE_RE.match(name) is not None


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / META_FILE).exists()


def resolve_tag_dir(path: str | Path, tag: str | None = None) -> Path:
    """A tag directory from a tag directory itself, a checkpoints root, or a run's output directory
    (``<output_dir>/checkpoints``); without ``tag`` the engine's pointer to the newest tag picks it."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if tag is None and (is_tag_dir(path)):
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() and not (path / LATEST_FILE).exists() else path
    if tag is None:
        latest = root / LATEST_FILE
        if not latest.is_file():
            raise CheckpointError(f"{latest}: missing; pass tag=... (tags here: {list_tags(root)})")
        tag = latest.read_text().strip()
    tag_dir = root / tag
    if not tag_dir.is_dir():
        raise CheckpointError(f"{tag_dir}: no such tag (tags here: {list_tags(root)})")
    return tag_dir


def is_tag_dir(path: Path) -> bool:
    return any(MODEL_FILE_RE.match(p.name) for p in path.iterdir()) or (path / UNIVERSAL_PARAMS_DIR).is_dir()


def list_tags(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and is_tag_dir(p))
