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
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from biomedgpt.core.config import PathStr, parse_cli
from biomedgpt.models.checkpoint import CheckpointError
from biomedgpt.models.config import ModelSpec, Precision
from biomedgpt.models.tokenizer import TokenizerError
from biomedgpt.tools.import_checkpoint import load_any_tokenizer
from biomedgpt.engine.checkpoint.consolidate import consolidate
from biomedgpt.engine.train.host_memory import set_mmap_threshold
from biomedgpt.engine.checkpoint.zero_reader import ZeroCheckpoint, checkpoint_model_config, open_checkpoint


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


def run_tokenizer(ckpt: ZeroCheckpoint, explicit: str | None, vocab_size: int):
    """The given tokenizer, else the one the run trained with (when its path still resolves), else None."""
    if explicit:
        return load_any_tokenizer(explicit)
    run_cfg = ckpt.client_state.get("config")
    if not isinstance(run_cfg, dict):
        return None
    for key in ("tokenizer", "bpe_dir"):
        if run_cfg.get(key) and Path(run_cfg[key]).is_dir():
            return load_any_tokenizer(run_cfg[key])
    if not run_cfg.get("tokenizer") and not run_cfg.get("bpe_dir"):
        packaged = load_any_tokenizer(None)  # the trainer's default: the packaged GPT-2 BPE
        return packaged if packaged.vocab_size == vocab_size else None
    return None


def run(cfg: ConsolidateConfig) -> Path:
    ckpt = open_checkpoint(cfg.checkpoint, cfg.tag)
    model_cfg = checkpoint_model_config(ckpt, cfg.model)

    def tokenizer():  # made on consolidate's thread, while the tensors stream
        found = run_tokenizer(ckpt, cfg.tokenizer, model_cfg.vocab_size)
        if found is not None and found.vocab_size != model_cfg.vocab_size:
            raise CheckpointError(f"the tokenizer ({cfg.tokenizer or 'of the run'}) has {found.vocab_size} ids, "
                                  f"the model's embedding {model_cfg.vocab_size} rows")
        return found

    result = consolidate(ckpt, cfg.output, model_cfg, dtype=cfg.dtype, ema=cfg.ema, tokenizer=tokenizer,
                         max_shard_bytes=int(cfg.max_shard_gb * (1 << 30)), overwrite=cfg.overwrite,
                         progress=cfg.progress, verify_output=cfg.verify,
                         merge_lora=cfg.merge_lora)
    print(f"{ckpt.directory} (ZeRO-{ckpt.stage}, {ckpt.world_size} ranks, step {ckpt.step}"
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
