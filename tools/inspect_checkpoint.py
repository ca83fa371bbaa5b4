"""What a checkpoint directory holds, read from the pickles only (no tensor is loaded).

    python -m biomedgpt.tools.inspect_checkpoint path=runs/demo [tag=step_00000200] [json=true]

``path`` is a run's output directory, a ``checkpoints/`` root or one tag directory. For every tag:
ZeRO stage, world size, step, parameter count, file sizes, EMA / universal copies, the client state's
scalars and the model config; a broken tag is listed with the error that makes it unusable.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from biomedgpt.engine.checkpoint.layout import LATEST_FILE
from biomedgpt.core.config import PathStr, parse_cli
from biomedgpt.models.checkpoint import CheckpointError
from biomedgpt.engine.checkpoint.zero_reader import describe, iter_tags, open_checkpoint
from biomedgpt.tools.cli import one_line_errors


@dataclass
class InspectConfig:
    path: PathStr  # a run output_dir, its checkpoints/ folder or one tag folder
    tag: Optional[str] = None  # only this tag
    json: bool = False  # machine-readable output


def inspect(path: str | Path, tag: str | None = None) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory")
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    latest = root / LATEST_FILE
    tags = []
    for name, directory in iter_tags(path):
        if tag is not None and name != tag:
            continue
        try:
            tags.append(describe(open_checkpoint(directory)))
        except CheckpointError as exc:
            tags.append({"tag": name, "directory": str(directory), "error": str(exc)})
    if tag is not None and not tags:
        raise CheckpointError(f"{root / tag}: no such tag")
    return {"root": str(root), "latest": latest.read_text().strip() if latest.is_file() else None, "tags": tags}


def _print_text(info: dict[str, Any]) -> None:
    print(f"{info['root']}  (latest: {info['latest']})")
    for tag in info["tags"]:
        if "error" in tag:
            print(f"  {tag['tag']}: UNUSABLE - {tag['error']}")
            continue
        cfg = tag["model_config"]
        arch = (f"d_model={cfg['d_model']} layers={cfg['encoder_layers']}+{cfg['decoder_layers']} "
                f"heads={cfg['heads']} vocab={cfg['vocab_size']}" if isinstance(cfg, dict) else cfg)
        print(f"  {tag['tag']}: step {tag['step']}, ZeRO-{tag['zero_stage']} x {tag['world_size']} ranks"
              f"{' (universal)' if tag['universal'] else ''}, {tag['parameters'] / 1e6:.2f}M params, "
              f"{tag['bytes'] / 1e6:.1f} MB on disk, EMA: {'yes' if tag['has_ema'] else 'no'}, "
              f"universal copy: {'yes' if tag['has_universal'] else 'no'}, DeepSpeed {tag['ds_version']}")
        print(f"    model: {arch}")
        if tag["client_state"]:
            print(f"    client state: {tag['client_state']}")
        for name, size in tag["files"].items():
            print(f"    {size / 1e6:10.2f} MB  {name}")


@one_line_errors(CheckpointError)
def main(argv: list[str] | None = None) -> int:
    cfg = parse_cli(InspectConfig, argv, description=__doc__)
    info = inspect(cfg.path, cfg.tag)
    if cfg.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        _print_text(info)
    return 0 if all("error" not in t for t in info["tags"]) else 1


if __name__ == "__main__":
    sys.exit(main())
