"""Training entry point: ``python -m biomedgpt.tools.train [--config configs/X.yaml] [key.sub=value ...]``.

Without ``--config`` it runs configs/demo.yaml (the README's main job): it builds the demo shards from
the packaged real data when they are missing, trains a small model, evaluates it and prints the metrics.
Under a launcher (launchers/local.sh, SLURM) every rank runs this same command.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Sequence

from biomedgpt.core.config import parse_cli
from biomedgpt.data.config import check_local_streams
from biomedgpt.engine.eval.config import selection_data
from biomedgpt.engine.run_config import DEMO_CONFIG, RunConfig
from biomedgpt.engine.train.run_lock import RunLock
from biomedgpt.core.user_errors import UserError, command


def ensure_demo_data(directory: str) -> None:
    """Build the demo shards once (every rank of a local job calls this; a file lock lets one build)."""
    import fcntl

    root = Path(directory)
    if (root / "data_config.yaml").exists():
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "data_config.yaml").exists():
            from biomedgpt.data.demo import DemoConfig, build

            print(f"building the demo dataset in {root} (once, about a minute)", flush=True)
            build(DemoConfig(output_dir=str(root)))


def in_demo_data(path: str, demo_data_dir: str | None) -> bool:
    """Whether a stream's folder is one the demo builds (in ``demo_data_dir``) when absent."""
    return demo_data_dir is not None and Path(path).resolve().is_relative_to(Path(demo_data_dir).resolve())


def check_init_from(model_dir: str | None) -> None:
    """A fine-tuning recipe's starting weights exist, or one line names the folder and the two ways out."""
    if model_dir is None:
        return
    from biomedgpt.models.checkpoint import model_weight_files

    missing = [str(p) for p in [Path(model_dir) / "config.json", *model_weight_files(model_dir)] if not p.is_file()]
    if missing:
        raise UserError(f"checkpoint.init_from {model_dir}: not a model directory ({', '.join(missing)} missing): "
                        f"make it from a released checkpoint with 'biomedgpt import-checkpoint source=<file.pt> "
                        f"output={model_dir}', or train from scratch with checkpoint.init_from=null")


def parse(argv: Sequence[str] | None = None) -> RunConfig:
    """``--config FILE`` and overrides; without ``--config``, configs/demo.yaml with the overrides."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv = ["--config", str(DEMO_CONFIG), *argv]
    return parse_cli(RunConfig, argv, description=__doc__)


@command  # a user error (bad path, missing shard or weights, a checkpoint that cannot resume): one line, exit 1
def main(argv: Sequence[str] | None = None) -> dict:
    cfg = parse(argv)  # torch-free: a bad setting fails here in well under a second, before any import of torch
    check_init_from(cfg.checkpoint.init_from)
    demo_streams = [s for s in [*cfg.data.streams, *cfg.data.eval_streams] if in_demo_data(s.remote, cfg.demo_data_dir)]
    opened = [*cfg.data.streams, *selection_data(cfg.data, cfg.eval.select_on_test, cfg.eval.export_best).eval_streams]
    check_local_streams([s for s in opened if s not in demo_streams])  # the streams the loaders will open
    if int(os.environ.get("RANK", "0")) == 0:  # a folder in use is refused in a second too (the Trainer keeps it)
        RunLock.acquire(cfg.output_dir)
    from biomedgpt.engine.distributed.process_group import configure_environment

    configure_environment()  # before deepspeed is imported
    from biomedgpt.engine.checkpoint.manager import CheckpointWriteError
    from biomedgpt.engine.train.trainer import Trainer

    if demo_streams:
        ensure_demo_data(cfg.demo_data_dir)
    trainer = Trainer(cfg)
    try:
        metrics = trainer.train()
    except CheckpointWriteError as exc:  # disk full, ...: one line (from one rank), exit status 1
        if exc.line:
            print(f"error: {exc.line}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    if trainer.is_main and metrics:
        print("final evaluation: " + json.dumps({k: round(v, 5) for k, v in metrics.items()}), flush=True)
    return metrics


if __name__ == "__main__":
    main()
