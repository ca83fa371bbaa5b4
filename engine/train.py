"""Training entry point: ``python -m engine.train [--config configs/X.yaml] [key.sub=value ...]``.

Without ``--config`` it runs the embedded demo (the README's main job): it builds the demo shards from
the packaged real data when they are missing, trains a small model, evaluates it and prints the metrics.
Under a launcher (launchers/local.sh, SLURM) every rank runs this same command.
"""
from __future__ import annotations

import json
import sys
from typing import Sequence

from engine import distributed  # noqa: F401  (sets DS_ACCELERATOR before deepspeed is imported)
from engine.config import ConfigError, load, parse_cli, to_dict
from engine.run_config import RunConfig, demo_config
from engine.trainer import Trainer


def _demo_with_overrides(overrides: Sequence[str]) -> RunConfig:
    """The demo config with command-line overrides applied through the same typed loader."""
    import tempfile

    import yaml

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(to_dict(demo_config()), f)
        f.flush()
        return load(RunConfig, f.name, overrides)


def parse(argv: Sequence[str] | None = None) -> RunConfig:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--config" or a.startswith("--config=") or a in ("-h", "--help") for a in argv):
        return parse_cli(RunConfig, argv, description=__doc__)
    try:
        return _demo_with_overrides(argv)
    except ConfigError as exc:
        sys.exit(f"engine.train: error: {exc}")


def main(argv: Sequence[str] | None = None) -> dict:
    cfg = parse(argv)
    if cfg.demo_data:
        from engine.demo import ensure_demo_data

        ensure_demo_data(cfg)
    trainer = Trainer(cfg)
    metrics = trainer.train()
    if trainer.is_main and metrics:
        print("final evaluation: " + json.dumps({k: round(v, 5) for k, v in metrics.items()}), flush=True)
    return metrics


if __name__ == "__main__":
    main()
