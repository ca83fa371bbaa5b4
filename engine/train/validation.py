"""The in-training evaluation (torchtitan's validator): the eval set's loss metrics and, with ``eval.downstream``,
the task metrics by generation, on the evaluated weights (the EMA's when ``eval.use_ema``), every rank agreeing
(``engine/eval/evaluator.py``); the predictions of each evaluation; the best model's export. When to evaluate
and which value is the best are the loop's (``Trainer.evaluate_and_track``)."""
from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional

import torch

from biomedgpt.core.durable import atomic_write_text
from biomedgpt.engine.distributed import process_group as dist_utils
from biomedgpt.engine.run_config import RunConfig
from biomedgpt.engine.train.ema import EMA


class Validator:
    def __init__(self, cfg: RunConfig, engine, ema: Optional[EMA], plan, device: torch.device, rank: int, world: int,
                 tokenizer, eval_loader, task_names: list[str], out: Path, log: Callable[[str], None]):
        self.cfg, self.engine, self.ema, self.plan, self.device = cfg, engine, ema, plan, device
        self.rank, self.world, self.tokenizer, self.eval_loader = rank, world, tokenizer, eval_loader
        self.task_names, self.out, self.log = task_names, out, log

    @property
    def uses_ema(self) -> bool:
        return self.ema is not None and self.cfg.eval.use_ema

    def ema_note(self, step: int) -> Optional[str]:
        """How much of the EMA's starting weights an evaluation at ``step`` still sees (a young run's
        near-initial EMA scores puzzle otherwise)."""
        if not self.uses_ema:
            return None
        ema = self.cfg.ema
        updates = max(0, step - ema.start_step)
        first = "initial weights" if not ema.start_step else f"weights of step {ema.start_step}"
        return (f"step {step}: evaluating the EMA weights (decay {ema.decay}: the {first} still make up "
                f"{ema.decay ** updates:.1%} of them; eval.use_ema=false evaluates the trained weights)")

    @torch.no_grad()
    def evaluate(self, step: int, loss_of: Callable[[dict], object], beat: Callable[[str], None]) -> dict:
        """Loss, perplexity and token accuracy over the eval set (overall and per task; ``loss_of(batch)`` is the
        trainer's loss without smoothing), and with ``eval.downstream`` the task metrics by generation."""
        from biomedgpt.engine.eval.evaluator import Evaluator

        self.engine.eval()
        evaluator = Evaluator(self.engine.module, self.device, self.rank, self.world,
                              self.plan, beat=beat, engine=self.engine,
                              log=self.log)
        with self.ema.swapped_in(self.engine.module) if self.uses_ema else nullcontext():
            metrics = evaluator.loss_metrics(self.eval_loader, loss_of, self.task_names, self.cfg.eval.max_batches)
            if self.cfg.eval.downstream is not None:
                metrics.update(self._downstream(evaluator, step))
        return metrics

    def _downstream(self, evaluator, step: int) -> dict:
        """The task metrics by generation; rank 0 writes the predictions of this step."""
        start = time.perf_counter()
        results, records = evaluator.task_metrics(self.tokenizer, self.eval_loader, self.cfg.eval.downstream)
        results["downstream_time_s"] = time.perf_counter() - start
        if evaluator.gathered is not None:
            results["decoding_gathered"] = float(evaluator.gathered)
        if evaluator.sync is not None:
            results["synced_padding_calls"] = float(sum(evaluator.gather([evaluator.sync.padding_calls])))
        if self.rank == 0 and self.cfg.eval.write_predictions:
            path = self.out / "eval_predictions" / f"step_{step:08d}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            ordered = sorted(records, key=lambda r: (r["task"], r["id"]))
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in ordered))
        return results

    def export(self, directory: Path) -> None:
        """Collective: write a model directory (biomedgpt.models.checkpoint format) with the evaluated weights
        (EMA if used; LoRA merged)."""
        from biomedgpt.engine.train.lora import write_merged_lora
        from biomedgpt.models.checkpoint import save_pretrained

        module = self.engine.module
        with (self.ema.swapped_in(module) if self.uses_ema else nullcontext()):
            with self.plan.gathered(module):
                if self.rank == 0 and self.cfg.lora.enabled:
                    write_merged_lora(module, directory, self.tokenizer, self.cfg.lora)
                elif self.rank == 0:
                    save_pretrained(module, directory, self.tokenizer, overwrite=True)
        dist_utils.barrier()
