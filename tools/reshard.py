"""Convert a ZeRO checkpoint tag to DeepSpeed's universal format, to resume on another number of ranks.

    python -m biomedgpt.tools.reshard checkpoint=runs/demo [tag=step_00000200] [output=...]

By default the universal copy is written to ``<tag>/universal``, where the engine looks for it when a run
resumes with another world size or ZeRO stage (so a big conversion can run on a CPU node before the GPU
job starts). Any DeepSpeed job loads it with ``"checkpoint": {"load_universal": true}`` and
``engine.load_checkpoint(<tag dir>, tag="universal")``; ``biomedgpt.tools.consolidate`` reads it too.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

from biomedgpt.core.config import PathStr, parse_cli
from biomedgpt.models.checkpoint import CheckpointError
from biomedgpt.engine.checkpoint.manager import to_universal
from biomedgpt.engine.checkpoint.zero_reader import open_checkpoint
from biomedgpt.tools.cli import one_line_errors


@dataclass
class ReshardConfig:
    checkpoint: PathStr
    tag: Optional[str] = None  # default: the tag named by checkpoints/latest
    output: Optional[str] = None  # default: <tag dir>/universal
    overwrite: bool = False


@one_line_errors(CheckpointError)
def main(argv: list[str] | None = None) -> int:
    cfg = parse_cli(ReshardConfig, argv, description=__doc__)
    ckpt = open_checkpoint(cfg.checkpoint, cfg.tag)
    if not ckpt.partitioned:  # unpartitioned (or converted): the engine loads it on any world size
        print(f"{ckpt.directory} ({'universal' if ckpt.universal else 'ZeRO-0'}, {ckpt.world_size} ranks): "
              "resumes on any number of ranks as it is; nothing to convert")
        return 0
    out = to_universal(ckpt.directory, cfg.output, cfg.overwrite, checked=True)  # every file read just above
    print(f"{ckpt.directory} (ZeRO-{ckpt.stage}, {ckpt.world_size} ranks) -> universal checkpoint {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
