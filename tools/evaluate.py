"""Downstream evaluation of a model directory: decode every evaluation sample the way its task is judged,
score it with the paper's metrics, write a results JSON and per-sample predictions.

    biomedgpt evaluate recipe=finetune/vqa_rad split=test model_dir=runs/vqa_rad/best output_dir=runs/vqa_rad/eval

The recipe (a RunConfig file or packaged name) gives the ``data`` and ``eval.downstream`` sections. The work
is the library's: decoding per task (``engine/eval/decoding.py``), the evaluator training uses too
(``engine/eval/evaluator.py``), the metric formulas (``engine/eval/metrics.py``).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from biomedgpt.core.config import ConfigError, PathStr, load, parse_cli, to_dict
from biomedgpt.core.durable import atomic_write_text
from biomedgpt.core.user_errors import command
from biomedgpt.data.config import DataConfig
from biomedgpt.engine.distributed.process_group import configure_environment
from biomedgpt.engine.eval.config import DownstreamConfig, Split, streams_of_split
from biomedgpt.engine.eval.decoding import RankSync, decoding_model, prepare_model, start_ranks


@dataclass
class EvaluateConfig:
    """Evaluate a model directory on the evaluation streams of a fine-tuning recipe (or given data)."""

    model_dir: PathStr
    recipe: Optional[str] = None  # a run config (file or packaged name): its data and eval.downstream are used
    data: Optional[DataConfig] = None  # replaces the recipe's data section
    downstream: Optional[DownstreamConfig] = None  # replaces the recipe's eval.downstream section
    output_dir: PathStr = "eval"
    device: str = "auto"  # auto: cuda when available
    bpe_dir: Optional[PathStr] = None  # tokenizer when the model directory has none (None: packaged GPT-2)
    # evaluate the eval streams of this split (a recipe lists its valid and test streams); valid decodes with
    # downstream.valid_tasks as training does. None: every eval stream (which must all be of one split)
    split: Optional[Split] = None
    # 3: partition the model across the launched ranks with DeepSpeed ZeRO-3 (decoding gathers the whole
    # model once when it fits, see downstream.gather_memory_fraction; else the ranks decode in lockstep).
    # Started by a launcher (launchers/local.sh -n N -m biomedgpt.tools.evaluate), every rank evaluates
    # its share of the data; rank 0 writes the results.
    zero_stage: Literal[0, 3] = 0


def resolve(cfg: EvaluateConfig) -> tuple[DataConfig, DownstreamConfig]:
    """The data and downstream settings: explicit ones, else the recipe's (loaded as the RunConfig it is),
    for the eval streams of ``cfg.split``."""
    recipe = None
    if cfg.recipe is not None:
        from biomedgpt.engine.run_config import RunConfig

        try:
            recipe = load(RunConfig, cfg.recipe)
        except ConfigError as exc:
            raise ConfigError(f"recipe {cfg.recipe}: {exc}") from None
    data = cfg.data or (recipe.data if recipe is not None else None)
    if data is None:
        raise ConfigError("give data (eval_streams) or a recipe")
    downstream = cfg.downstream or (recipe.eval.downstream if recipe is not None else None) or DownstreamConfig()
    if not data.eval_streams:
        raise ConfigError("no data.eval_streams to evaluate")
    try:
        data = streams_of_split(data, cfg.split)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return data, downstream.for_split(cfg.split)


def sync_costs(sync: RankSync) -> dict[str, float]:
    """What lockstep decoding cost this rank: padding decoder calls (priced at this rank's mean decoder
    call) and the time in the agreement collectives."""
    mean = sync.decode_s / max(1, sync.decode_calls)
    return {"decoder_calls": sync.decode_calls, "decoder_s": sync.decode_s, "padding_calls": sync.padding_calls,
            "padding_s_estimate": sync.padding_calls * mean, "agree_s": sync.agree_s}


def peak_rss_gib() -> float:
    """This process's peak resident memory so far."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run(cfg: EvaluateConfig) -> dict:
    """Evaluate and write ``results.json`` and ``predictions.jsonl`` into ``output_dir``."""
    from biomedgpt.data.loader import build_eval_loader

    from biomedgpt.engine.eval.evaluator import evaluate_model, paper_metrics, unique_records

    data, downstream = resolve(cfg)
    ranks = start_ranks(cfg.zero_stage, cfg.device)
    rank, device, gather = ranks.rank, ranks.device, ranks.gather
    model, tokenizer, sync, engine = prepare_model(cfg.model_dir, cfg.bpe_dir, cfg.zero_stage, ranks)
    loaded_rss = gather([peak_rss_gib()])
    loader = build_eval_loader(data, tokenizer, rank, ranks.world)
    start = time.perf_counter()
    with decoding_model(engine, ranks, downstream.gather_memory_fraction) as whole:
        sync = None if whole else sync
        metrics, records = evaluate_model(model, tokenizer, loader, downstream, device, gather, sync)
    elapsed = time.perf_counter() - start
    records = unique_records(records)
    rss = gather([peak_rss_gib()])
    synced = gather([sync_costs(sync)]) if sync is not None else None
    if rank != 0:
        return {"metrics": metrics}
    results = {"model_dir": str(cfg.model_dir), "split": cfg.split, "paper_metrics": paper_metrics(metrics),
               "metrics": metrics, "samples": len({r["id"] for r in records}),
               "seconds": elapsed,
               **({"decoding": "whole model" if whole else "per module"} if engine is not None else {}),
               "peak_rss_gib_per_rank": {"after_load": loaded_rss, "at_end": rss},
               **({"synced_decoding_per_rank": synced} if synced is not None else {}),
               "eval_streams": [to_dict(s) for s in data.eval_streams],
               "downstream": {name: to_dict(downstream.task(name))
                              for name in sorted({r["task"] for r in records})}}
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    return results


@command
def main(argv: list[str] | None = None) -> None:
    configure_environment()  # before deepspeed is imported
    cfg = parse_cli(EvaluateConfig, argv, description=__doc__.split("\n\n")[0])
    results = run(cfg)  # a data error (DataSourceError, too many bad rows) is a UserError: one line (@command)
    if int(os.environ.get("RANK", "0")) == 0:
        json.dump(results["metrics"], sys.stdout, indent=2)
        print()


if __name__ == "__main__":
    main()
