"""Consolidate a DeepSpeed ZeRO checkpoint into a model directory (safetensors + config + tokenizer).

    python -m biomedgpt.tools.consolidate checkpoint=runs/demo output=models/demo [tag=step_00000200] \
        [dtype=bf16] [ema=true] [verify=true] [merge_lora=true] [model.size=base]

``checkpoint`` is a run's output directory, its ``checkpoints/`` root (``latest`` picks the tag) or a tag
directory; ZeRO 1/2/3 from any world size, stage 0 and universal checkpoints. Tensors are streamed one
at a time (memory about the largest tensor, see ``engine/checkpoint/consolidate.py``); the directory appears
complete or not at all. ``verify=true`` checks, before the directory is published, every tensor against
DeepSpeed's own ``zero_to_fp32`` reconstruction and a forward pass (that step holds the model in memory).
A LoRA run's checkpoint needs ``merge_lora=true``: peft merges each adapter into its weight as it streams, and
the directory is a plain model (``export-hf`` takes it as any other).

A tag this project's trainer saved carries a consolidation index: the default output (fp32, no EMA, no
merge, no verify, the saved model) is then copied from the stored bytes without importing torch
(``engine/checkpoint/consolidation_index.py``), the same directory in a fraction of the time.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from biomedgpt.core.config import PathStr, parse_cli
from biomedgpt.engine.checkpoint.consolidation_index import consolidate_indexed, indexed_request
from biomedgpt.engine.checkpoint.layout import resolve_tag_dir
from biomedgpt.engine.train.host_memory import set_mmap_threshold
from biomedgpt.models.config import ModelSpec, Precision
from biomedgpt.models.model_dir import CheckpointError
from biomedgpt.models.tokenizer import TokenizerError, load_any_tokenizer


@dataclass
class ConsolidateConfig:
    """Which checkpoint, and how to write its model directory."""

    checkpoint: PathStr
    output: PathStr
    tag: Optional[str] = None  # default: the tag named by checkpoints/latest
    dtype: Precision = "fp32"
    ema: bool = False  # the engine's EMA weights instead of the trained ones
    model: Optional[ModelSpec] = None  # default: the run config saved with the checkpoint
    tokenizer: Optional[str] = None  # default: the run's tokenizer / bpe_dir when it can be found
    max_shard_gb: float = 2.0
    verify: bool = False
    merge_lora: bool = False  # a LoRA run's checkpoint: merge the adapters into plain weights (W + B@A * alpha/r)
    overwrite: bool = False
    progress: bool = True


def run_tokenizer(run_cfg: dict | None, explicit: str | None, vocab_size: int):
    """The given tokenizer, else the one the run trained with (``run_cfg``: its saved settings; when its path
    still resolves), else None."""
    if explicit:
        return load_any_tokenizer(explicit)
    if not isinstance(run_cfg, dict):
        return None
    for key in ("tokenizer", "bpe_dir"):
        if run_cfg.get(key) and Path(run_cfg[key]).is_dir():
            return load_any_tokenizer(run_cfg[key])
    if not run_cfg.get("tokenizer") and not run_cfg.get("bpe_dir"):
        packaged = load_any_tokenizer(None)  # the trainer's default: the packaged GPT-2 BPE
        return packaged if packaged.vocab_size == vocab_size else None
    return None


def _tokenizer(run_cfg: dict | None, explicit: str | None, vocab_size: int):
    """A function making the tokenizer to save (on consolidate's thread, while the tensors stream)."""
    def make():
        found = run_tokenizer(run_cfg, explicit, vocab_size)
        if found is not None and found.vocab_size != vocab_size:
            raise CheckpointError(f"the tokenizer ({explicit or 'of the run'}) has {found.vocab_size} ids, "
                                  f"the model's embedding {vocab_size} rows")
        return found

    return make


def run(cfg: ConsolidateConfig) -> Path:
    tag_dir = resolve_tag_dir(cfg.checkpoint, cfg.tag)
    index = indexed_request(tag_dir, cfg.dtype, cfg.ema, cfg.merge_lora, cfg.verify,
                            cfg.model.build() if cfg.model is not None else None)
    max_shard_bytes = int(cfg.max_shard_gb * (1 << 30))
    if index is not None:  # the stored bytes copied, no torch
        where = (index.directory, index.zero_stage, index.world_size, index.step)
        result = consolidate_indexed(index, cfg.output, _tokenizer(index.run_tokenizer, cfg.tokenizer,
                                                                   index.model_config.vocab_size),
                                     max_shard_bytes, cfg.overwrite, cfg.progress)
    else:
        from biomedgpt.engine.checkpoint.consolidate import consolidate
        from biomedgpt.engine.checkpoint.zero_reader import checkpoint_model_config, open_checkpoint

        ckpt = open_checkpoint(tag_dir)
        model_cfg = checkpoint_model_config(ckpt, cfg.model)
        where = (ckpt.directory, ckpt.stage, ckpt.world_size, ckpt.step)
        result = consolidate(ckpt, cfg.output, model_cfg, dtype=cfg.dtype, ema=cfg.ema,
                             tokenizer=_tokenizer(ckpt.client_state.get("config"), cfg.tokenizer, model_cfg.vocab_size),
                             max_shard_bytes=max_shard_bytes, overwrite=cfg.overwrite, progress=cfg.progress,
                             verify_output=cfg.verify, merge_lora=cfg.merge_lora)
    directory, stage, world_size, step = where
    print(f"{directory} (ZeRO-{stage}, {world_size} ranks, step {step}"
          f"{', EMA' if cfg.ema else ''}) -> {result.output}: {result.tensors} tensors, "
          f"{result.bytes / 1e6:.1f} MB {cfg.dtype}{', verified' if cfg.verify else ''}"
          f"{'' if result.tokenizer else ' (no tokenizer found: pass tokenizer=...)'}")
    return result.output


def main(argv: list[str] | None = None) -> int:
    cfg = parse_cli(ConsolidateConfig, argv, description=__doc__)
    set_mmap_threshold(1)  # blocks freed on the way (building the model's key list) go back to the OS
    try:
        run(cfg)
    except (CheckpointError, TokenizerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
