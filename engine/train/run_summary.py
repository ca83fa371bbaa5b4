"""What a researcher reads first and last on the console: a start-up summary (where the run writes, how big
the model is, how the ranks split the batch, which precision and attention kernel run, the peak FLOP/s
that MFU divides by) and an end summary (steps, the best evaluation and where its model went)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from biomedgpt.engine.run_config import RunConfig
from biomedgpt.models.attention import resolve_backend
from biomedgpt.models.config import ModelConfig


def start_summary(cfg: RunConfig, model_cfg: ModelConfig, params: int, world: int, device: str,
                  peak_tflops: float, peak_source: str, total_steps: int, start_step: int) -> list[str]:
    rows_per_step = cfg.data.batch_size * cfg.optim.grad_accum * world
    backend = resolve_backend(model_cfg.attention_backend, model_cfg.position_scheme, model_cfg.attention_dropout)
    return [
        f"run: {Path(cfg.output_dir).resolve()}",
        f"model: {cfg.model.size} ({params / 1e6:.2f}M parameters, d_model {model_cfg.d_model}, "
        f"{model_cfg.encoder_layers}/{model_cfg.decoder_layers} layers), attention {backend}",
        f"ranks: {world} on {device}, ZeRO stage {cfg.deepspeed.zero_stage}, precision {cfg.deepspeed.precision}",
        f"batch: {cfg.data.batch_size} rows per rank x {cfg.optim.grad_accum} accumulation x {world} ranks = "
        f"{rows_per_step} rows per optimizer step",
        f"steps: {start_step} -> {total_steps}" + (f"; EMA {cfg.ema.decay} (evaluated with EMA weights)"
                                                   if cfg.ema.enabled and cfg.eval.use_ema else ""),
        f"MFU: against {peak_tflops:.3g} TFLOP/s per rank ({peak_source})",
    ]


def end_summary(cfg: RunConfig, step: int, best: Optional[float], output_dir: Path) -> list[str]:
    lines = [f"finished at step {step}; metrics: {output_dir / 'metrics.jsonl'}"]
    if best is not None:
        best_dir = output_dir / "best"
        where = f"; model: {best_dir}" if cfg.eval.export_best and best_dir.is_dir() else ""
        lines.append(f"best eval/{cfg.eval.metric} = {best:.4g} ({cfg.eval.mode}){where}")
    latest = output_dir / "checkpoints" / "latest"
    if latest.is_file():
        lines.append(f"checkpoint: {output_dir / 'checkpoints' / latest.read_text().strip()}")
    return lines
