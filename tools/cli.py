"""The ``biomedgpt`` command: one subcommand per job, each a thin front for its module's ``main(argv)``.

    biomedgpt train [-n RANKS] [--config FILE|NAME] [key.sub=value ...]
    biomedgpt evaluate|infer [-n RANKS] zero_stage=3 ...   # a ZeRO-3 model across RANKS processes
    biomedgpt SUB --help          # every setting of SUB
    biomedgpt bench NAME ...      # benchmarks

Settings keep the ``key=value`` override syntax of every module. ``train``/``demo``/``evaluate``/``infer``
run in this process when a launcher started it (``RANK`` is set: torchrun, the deepspeed launcher, srun)
or for one rank; with ``-n RANKS`` > 1 they start the ranks through ``launchers/local.sh`` (see its header).
"""
from __future__ import annotations

import functools
import importlib
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from biomedgpt.core.user_errors import command, report

#: subcommand -> (module, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("biomedgpt.tools.train", "train (or fine-tune) a model from a run config"),
    "demo": ("biomedgpt.tools.train", "the embedded demo run: build packaged real data, train, evaluate"),
    "prepare-data": ("biomedgpt.tools.prepare_data", "convert TSV/Parquet/JSONL/DICOM/LLaVA data into MDS shards"),
    "evaluate": ("biomedgpt.tools.evaluate", "task metrics of a model directory on a recipe's eval streams"),
    "infer": ("biomedgpt.tools.infer", "answer / caption PNG, JPEG or DICOM images with a model directory"),
    "import-checkpoint": ("biomedgpt.tools.import_checkpoint", "released BiomedGPT/OFA checkpoint -> model directory"),
    "export-hf": ("biomedgpt.tools.export_hf", "model directory -> OFA HF-port weights"),
    "consolidate": ("biomedgpt.tools.consolidate", "ZeRO training checkpoint -> model directory (safetensors)"),
    "reshard": ("biomedgpt.tools.reshard", "ZeRO checkpoint -> universal checkpoint (resume on another world size)"),
    "inspect-checkpoint": ("biomedgpt.tools.inspect_checkpoint", "what a checkpoint holds and whether it is usable"),
    "sweep": ("biomedgpt.tools.scaling.sweep", "scaling sweep: expand a grid, run locally or as a SLURM array"),
    "collect": ("biomedgpt.tools.scaling.collect", "a sweep's runs, status and end-of-run losses as tables"),
    "fit-scaling": ("biomedgpt.tools.scaling.fit", "power-law fits with bootstrap intervals, frontier, figure, report"),
    "estimate": ("biomedgpt.tools.estimate", "memory, FLOPs and time per step of a run config on a named GPU "
                 "(measure=true: real steps here)"),
    "train-tokenizer": ("biomedgpt.tools.train_tokenizer", "train a BPE tokenizer on your own text"),
    "make-demo-data": ("biomedgpt.data.demo", "build the demo shards from packaged real data"),
}

#: ``biomedgpt bench NAME`` -> description; the module is ``biomedgpt.tools.bench.NAME`` (``-`` as ``_``)
BENCHMARKS: dict[str, str] = {
    "attention": "attention backends: time and memory",
    "checkpoint": "training blocked per checkpoint: sync vs background writes",
    "consolidate": "consolidation vs DeepSpeed zero_to_fp32: RSS and time",
    "engine": "ZeRO stages: step time, tokens/s; checkpoint save/resume",
    "generation": "beam search throughput per task",
    "gpu": "GPU table: sizes x backends x image sizes",
    "loader": "loader samples per CPU-second: the original TSV path vs ours (resize / ofa_augment), local vs S3",
    "sizes": "every size trains: 2 ZeRO-3 steps on 2 CPU ranks, RSS vs estimate",
    "step": "training step: eager reference path vs default path, alternating",
    "model": "forward+backward time and peak memory per size",
    "text-only": "training step on half text-only batches: today's path vs images only where present",
}

LOCAL_LAUNCHER = Path(__file__).resolve().parents[1] / "launchers" / "local.sh"


def one_line_errors(*errors: type[BaseException]) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """For a command's ``main``: an expected error (its message names the file or setting) prints as one
    ``error:`` line (``core.user_errors.report``) and the command returns 1, without a traceback."""
    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            try:
                return main(argv)
            except errors as exc:
                report(exc)
                return 1
        return run
    return wrap


def _bench_module(name: str) -> str:
    return f"biomedgpt.tools.bench.{name.replace('-', '_')}"


def _usage(table: dict[str, str], prefix: str) -> str:
    width = max(map(len, table))
    rows = "\n".join(f"  {name:<{width}}  {desc}" for name, desc in table.items())
    return f"usage: {prefix} <command> [--help] [settings ...]\n\ncommands:\n{rows}\n"


def _run_module(module: str, argv: list[str], prog: str) -> int:
    sys.argv = [prog, *argv]  # argparse names the subcommand in usage and errors
    result = command(importlib.import_module(module).main)(argv)  # every command: a user error is one line, exit 1
    return result if isinstance(result, int) else 0


#: commands that run on several ranks (``-n RANKS``)
RANKED = ("train", "demo", "evaluate", "infer")


def _parse(module: str, argv: list[str]) -> None:
    """Parse a ranked command's settings here, once (each rank parses them again)."""
    if module == "biomedgpt.tools.train":
        importlib.import_module(module).parse(argv)
        return
    from biomedgpt.core.config import parse_cli

    config = {"biomedgpt.tools.evaluate": ("biomedgpt.tools.evaluate", "EvaluateConfig"),
              "biomedgpt.tools.infer": ("biomedgpt.tools.infer", "InferConfig")}[module]
    parse_cli(getattr(importlib.import_module(config[0]), config[1]), argv)


def _ranked(module: str, argv: list[str], prog: str, demo: bool) -> int:
    """``-n RANKS``: start that many ranks (local.sh) unless a launcher already started this one."""
    ranks = None
    rest = []
    args = iter(argv)
    for arg in args:
        if arg in ("-n", "--nproc"):
            ranks = next(args, None)
            if ranks is None:
                sys.exit(f"{prog}: {arg} needs a number of ranks")
        elif arg.startswith("--nproc="):
            ranks = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if demo and any(a == "--config" or a.startswith("--config=") for a in rest):
        sys.exit(f"{prog}: the demo has its own config; use 'biomedgpt train --config ...' for another run")
    if "RANK" in os.environ or ranks == "1" or (ranks is None and not demo):
        return _run_module(module, rest, prog)
    sys.argv = [prog, *rest]
    _parse(module, rest)  # a bad setting fails before any rank starts
    launch = ["bash", str(LOCAL_LAUNCHER)] + (["-n", ranks] if ranks else []) + ["-m", module, "--", *rest]
    os.environ.setdefault("PYTHON", sys.executable)
    os.execvp("bash", launch)
    return 0  # unreachable


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage({name: desc for name, (_, desc) in COMMANDS.items()}, "biomedgpt") + f"  {'bench':<18}  benchmarks (biomedgpt bench --help)\n"
              + "\n" + __doc__.split("\n\n", 1)[1])
        return 0
    name, rest = argv[0], argv[1:]
    if name in RANKED:
        return _ranked(COMMANDS[name][0], rest, f"biomedgpt {name}", demo=name == "demo")
    if name == "bench":
        if not rest or rest[0] in ("-h", "--help"):
            print(_usage(BENCHMARKS, "biomedgpt bench"))
            return 0
        if rest[0] not in BENCHMARKS:
            sys.exit(f"biomedgpt bench: unknown benchmark {rest[0]!r}; known: {', '.join(BENCHMARKS)}")
        return _run_module(_bench_module(rest[0]), rest[1:], f"biomedgpt bench {rest[0]}")
    if name not in COMMANDS:
        sys.exit(f"biomedgpt: unknown command {name!r}; known: {', '.join([*COMMANDS, 'bench'])}")
    return _run_module(COMMANDS[name][0], rest, f"biomedgpt {name}")


if __name__ == "__main__":
    sys.exit(main())
