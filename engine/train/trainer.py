"""The training loop: ``Trainer.train_step`` (one micro-batch) and ``Trainer.train`` with its hooks (evaluation
due, checkpoint due, stop on a signal or ``checkpoint.stop_after``, the logged metrics window). What it runs
with (process group, loaders, DeepSpeed engine, EMA, checkpoint manager, logger, restored state) is built by
``engine/train/builders.py``; the LR schedule is ``engine/train/schedule.py``."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from typing import Iterator, Optional

import psutil
import torch

from biomedgpt.engine.distributed import process_group as dist_utils
from biomedgpt.engine.checkpoint.manager import rng_state, set_rng_state
from biomedgpt.core.config import to_dict
from biomedgpt.core.hosts import ranks_on_this_host
from biomedgpt.engine.distributed.watchdog import Watchdog
from biomedgpt.engine.flops import batch_train_flops, image_tokens
from biomedgpt.engine.train.builders import TrainParts, TrainSpec, build_parts
from biomedgpt.engine.train.loss import kept_tokens, label_smoothed_cross_entropy
from biomedgpt.engine.train.metrics import MetricWindow
from biomedgpt.engine.run_config import RunConfig
from biomedgpt.engine.train.schedule import steps_per_epoch
from biomedgpt.engine.distributed.zero import local_param_elements

EXIT_RESUME = 75  # EX_TEMPFAIL: checkpoint written after a signal, resume to continue


class TrainingStopped(SystemExit):
    """Raised after the checkpoint that a SIGTERM/SIGUSR1 asked for: exit status 75."""

    def __init__(self) -> None:
        super().__init__(EXIT_RESUME)


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class StepResult:
    """What one ``train_step`` did: ``skipped`` (a non-finite loss on some rank: no backward, no step),
    ``boundary`` (the optimizer stepped), ``stop`` (some rank was asked to stop), the batch's sample ids."""

    skipped: bool
    boundary: bool
    stop: bool
    ids: list[str] = field(default_factory=list)


def _move(batch: dict, device: torch.device, float_dtype: torch.dtype) -> dict:
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if value.is_floating_point() and key == "patch_images":
                value = value.to(float_dtype)
        out[key] = value
    return out


class Trainer:
    """The loop over ``TrainParts``: every piece of state it keeps is set here, so a test builds it in-process
    from builders with stand-ins (tests/test_trainer_loop.py)."""

    def __init__(self, cfg: RunConfig, parts: Optional[TrainParts] = None, *, train_loader=None, eval_loader=None):
        """``parts`` from ``builders.build_parts`` (the default builders when not given). ``train_loader`` /
        ``eval_loader`` replace the default loaders: any iterable with ``state_dict()``/``load_state_dict()``."""
        if parts is None:
            spec = TrainSpec()
            if train_loader is not None:
                spec = replace(spec, train_loader=lambda *_: train_loader)
            if eval_loader is not None:
                spec = replace(spec, eval_loader=lambda *_: eval_loader)
            parts = build_parts(cfg, spec)
        self.cfg = cfg
        process = parts.process
        self.dist, self.plan, self.out, self.run_lock, self.peak = (process.dist, process.plan, process.out,
                                                                    process.run_lock, process.peak)
        self.rank, self.world, self.is_main = process.rank, process.world, process.is_main
        self.model_cfg, self.tokenizer, self.task_names = parts.model_cfg, parts.tokenizer, parts.task_names
        self.train_loader, self.eval_loader, self.total_steps = parts.train_loader, parts.eval_loader, parts.total_steps
        self.ckpt, self.engine, self.float_dtype, self.ema = parts.ckpt, parts.engine, parts.float_dtype, parts.ema
        self.stop, self.logger, self.sample_log = parts.stop, parts.logger, parts.sample_log
        self.validator = parts.validator
        state = parts.state
        self.step, self.epoch, self.nonfinite, self.best = state.step, state.epoch, state.nonfinite, state.best
        self.resumed_rng: Optional[dict] = state.rng  # restored once the first batch is fetched (_batches)
        self.window = self._new_window()  # the micro-batches' metrics since the last logged step
        self.stop_at: Optional[int] = None  # checkpoint.stop_after: the step this job stops at (train())
        self.checkpoint_memory_reserved = False
        self.last_save_blocked_s: Optional[float] = None
        self.watchdog = Watchdog(self.out, self.rank, cfg.watchdog.timeout_s, cfg.watchdog.poll_s)  # runs in train()

    # -- checkpoints ---------------------------------------------------------------------------

    def _buffers(self) -> dict[str, torch.Tensor]:
        """Per-rank buffers (BatchNorm statistics drift apart across ranks; restore each rank's own)."""
        names = dict(self.engine.module.named_buffers())
        return {k: v.detach().cpu().clone() for k, v in self.engine.module.state_dict().items() if k in names}

    def _checkpoint_state(self) -> tuple[dict, dict]:
        """(client state in DeepSpeed's model file, this rank's own state file)."""
        client = {"step": self.step, "epoch": self.epoch, "nonfinite": self.nonfinite, "best": self.best,
                  "config": to_dict(self.cfg), "world_size": self.world}
        rank_state = {"loader": self.train_loader.state_dict(), "rng": rng_state(), "buffers": self._buffers(),
                      "ema": self.ema.state_dict() if self.ema is not None else None}
        return client, rank_state

    def reserve_checkpoint_memory(self) -> None:
        """Decide background vs synchronous writes and allocate the background snapshot's host buffers, once
        (after the first step: the optimizer state exists), so no save pays for them."""
        writer = self.ckpt.writer
        if self.checkpoint_memory_reserved:
            return
        self.checkpoint_memory_reserved = True
        if writer.background and self.cfg.checkpoint.background is None:
            # every rank on this machine reserves its own snapshot: all of them, twice over, must fit
            need = self._state_bytes() * ranks_on_this_host(self.world)
            flag = torch.tensor([float(psutil.virtual_memory().available < 2 * need)])
            if dist_utils.all_reduce(flag, "max")[0] > 0:  # every rank writes the same way (reserve is collective)
                writer.background = False
                self.logger.write(f"checkpoints are written synchronously: {need / 2**30:.1f} GiB of state on this "
                                  f"machine's ranks and {psutil.virtual_memory().available / 2**30:.1f} GiB of host "
                                  "memory free (checkpoint.background=true forces background writes)")
        start = time.perf_counter()
        self.ckpt.reserve(self.engine, *self._checkpoint_state())
        if writer.background:
            self.logger.write(f"checkpoint snapshot buffers: {writer.snapshot.bytes / 2**30:.2f} GiB of host memory "
                              f"per rank, reserved in {time.perf_counter() - start:.2f}s")

    def save(self) -> str:
        self.reserve_checkpoint_memory()
        client, rank_state = self._checkpoint_state()
        start = time.perf_counter()
        writer = self.ckpt.writer
        self._beat("checkpoint")
        tag = self.ckpt.save(self.engine, self.step, client, rank_state, self.plan.stage)
        self._beat("checkpoint written")
        self.last_save_blocked_s = time.perf_counter() - start
        how = "writing in the background" if writer.background else "written"
        self.logger.write(f"checkpoint {tag}: training blocked {self.last_save_blocked_s:.2f}s ({how})")
        return tag

    def _state_bytes(self) -> int:
        """About this rank's checkpoint state: its weights and fp32 optimizer state (two AdamW moments,
        a master copy under mixed precision), the EMA."""
        local = local_param_elements(self.engine.module)
        local_opt = self.plan.optimizer_state_elements(local)
        mixed = self.cfg.deepspeed.precision != "fp32"
        return local * (2 if mixed else 4) + local_opt * 4 * (3 if mixed else 2) + (local * 4 if self.ema else 0)

    # -- the loop ------------------------------------------------------------------------------

    def _batches(self) -> Iterator[dict]:
        """Training batches forever, counting epochs (the loader's state resumes mid-epoch).

        Starting an epoch (the first batch of a new iterator) draws from torch's RNG (the loader's
        base seed), so a resumed run fetches its first batch and only then restores the saved RNG
        states: from there on it draws exactly what the uninterrupted run drew.
        """
        iterator = iter(self.train_loader)
        pending = next(iterator, None)
        if self.resumed_rng is not None:
            set_rng_state(self.resumed_rng)
            self.resumed_rng = None
        produced = True  # a run resumed exactly at an epoch's end starts with an empty remainder
        while True:
            while pending is not None:
                produced = True
                yield pending
                pending = next(iterator, None)
            if not produced:
                raise RuntimeError("the training loader yielded no batch in a whole epoch")
            self.epoch += 1
            produced = False
            iterator = iter(self.train_loader)
            pending = next(iterator, None)

    def _forward_loss(self, batch: dict, train: bool, window_tokens: Optional[torch.Tensor] = None):
        logits = self.engine(src_tokens=batch["src_tokens"], prev_output_tokens=batch["prev_output_tokens"],
                             patch_images=batch.get("patch_images"), patch_masks=batch.get("patch_masks"),
                             code_masks=batch.get("code_masks"),
                             sample_patch_num=batch.get("sample_patch_num") if train else None,
                             sample_rows=batch.get("sample_patches"))
        return label_smoothed_cross_entropy(
            logits, batch["target"], self.cfg.optim.label_smoothing if train else 0.0,
            pad_id=self.model_cfg.pad_id, conf=batch.get("conf"), constraint_masks=batch.get("constraint_masks"),
            loss_groups=batch.get("loss_groups"), group_weights=batch.get("group_weights"),
            drop_worst_ratio=self.cfg.optim.drop_worst_at(self.step) if train else 0.0, group_tokens=window_tokens)

    def window_tokens(self, batches: list[dict]) -> torch.Tensor:
        """Collective: the target tokens per loss group that the loss keeps in ``batches`` (one accumulation
        window's micro-batches) summed over every rank: fairseq's denominator of an update's loss."""
        counts = sum(kept_tokens(b["target"], b.get("loss_groups"), len(b.get("group_weights") or [1.0]),
                                 self.cfg.optim.drop_worst_at(self.step), self.model_cfg.pad_id) for b in batches)
        return dist_utils.all_reduce(counts, "sum")

    def _next_window(self, batches: Iterator[dict], tokens: Optional[torch.Tensor]):
        """The micro-batches left in DeepSpeed's accumulation window, and the window's token count
        (``loss_normalization: accumulation``; collective) counted before the first of them runs. A micro-batch
        that replaces a skipped one (non-finite loss: no backward) keeps its window's count."""
        accum = self.cfg.optim.grad_accum
        left = accum - self.engine.micro_steps % accum
        window = [next(batches) for _ in range(left)]
        if self.cfg.optim.loss_normalization == "accumulation" and left == accum:
            tokens = self.window_tokens(window)
        return window, tokens

    def _new_window(self) -> MetricWindow:
        return MetricWindow(len(self.task_names))

    def train_step(self, batch: dict, window_tokens: Optional[torch.Tensor] = None) -> StepResult:
        """One micro-batch: forward and loss; the ranks agree whether to skip it (a non-finite loss on any
        rank) and whether to stop (a signal on any rank); backward; the gradient norm where DeepSpeed
        records none; DeepSpeed's step (the optimizer steps at a gradient-accumulation boundary).

        ``loss_normalization: accumulation`` divides the loss by ``window_tokens`` (``window_tokens()`` of the
        accumulation window's micro-batches; with ``grad_accum`` 1 this batch's count when not given) and
        scales it so that DeepSpeed's mean over the ranks leaves the window's sum over the ranks: the update
        is one big batch's. ``micro_batch``: each micro-batch's own mean, DeepSpeed averaging them."""
        self.engine.train()
        accumulate = self.cfg.optim.loss_normalization == "accumulation"
        if accumulate and window_tokens is None:
            if self.cfg.optim.grad_accum > 1:
                raise ValueError("loss_normalization accumulation with grad_accum > 1: pass the window's count "
                                 "(Trainer.window_tokens of its micro-batches) to train_step")
            window_tokens = self.window_tokens([batch])
        batch = _move(batch, self.dist.device, self.float_dtype)
        out = self._forward_loss(batch, train=True, window_tokens=window_tokens if accumulate else None)
        flags = torch.tensor([0.0 if torch.isfinite(out.loss) else 1.0, float(self.stop.requested),
                              float(self.ckpt.write_failed)])
        dist_utils.all_reduce(flags, "max")
        if flags[2] > 0:  # a background checkpoint write failed (disk full, ...): one line, every rank stops
            self.ckpt.raise_write_failure()
        if flags[0] > 0:
            self._skip_nonfinite()
            return StepResult(skipped=True, boundary=False, stop=bool(flags[1] > 0))
        if accumulate:
            self.engine.backward(out.loss * self.world, scale_wrt_gas=False)
        else:
            self.engine.backward(out.loss)
        boundary = self.engine.is_gradient_accumulation_boundary()
        if boundary and self.plan.own_grad_norm:
            self.window.grad_norm = self._unclipped_grad_norm()
        self.engine.step()
        self._accumulate(batch, out)
        return StepResult(skipped=False, boundary=boundary, stop=bool(flags[1] > 0), ids=list(batch.get("ids", [])))

    def _skip_nonfinite(self) -> None:
        self.nonfinite += 1
        self.logger.write(f"step {self.step}: non-finite loss, micro-batch skipped ({self.nonfinite} so far)")
        if self.nonfinite > self.cfg.max_nonfinite_steps:
            raise NonFiniteLossError(f"{self.nonfinite} non-finite losses (limit "
                                     f"max_nonfinite_steps={self.cfg.max_nonfinite_steps})")

    def train(self) -> dict:
        """Train to the configured end; returns the last evaluation's metrics."""
        cfg = self.cfg
        metrics: dict = {}
        if self.step >= self.total_steps:
            self.logger.write(f"already at step {self.step} of {self.total_steps}")
        batches = self._batches()
        self.window = self._new_window()
        last_eval_step, last_save_step = -1, self.step
        self.stop_at = self.step + cfg.checkpoint.stop_after if cfg.checkpoint.stop_after else None
        step_ids: list[str] = []
        self.watchdog.start()
        window: list[dict] = []
        tokens: Optional[torch.Tensor] = None
        try:
            while self.step < self.total_steps:
                self.watchdog.beat("train", self.step)
                if not window:  # empty at every optimizer step: checkpoints see the whole window consumed
                    window, tokens = self._next_window(batches, tokens)
                result = self.train_step(window.pop(0), tokens)
                if result.skipped:
                    continue
                step_ids.extend(result.ids)
                if not result.boundary:
                    continue
                self._finish_optimizer_step(step_ids)
                step_ids = []
                if self._eval_due() and self.eval_loader is not None:
                    metrics = self.evaluate_and_track()
                    last_eval_step = self.step
                self._stop_if_asked(result.stop)
                if self._due(cfg.checkpoint.interval):
                    self.save()
                    last_save_step = self.step
            if self.eval_loader is not None and cfg.eval.at_end and last_eval_step != self.step:
                metrics = self.evaluate_and_track()
            if cfg.checkpoint.at_end and last_save_step != self.step:
                self.save()
            self.ckpt.close()  # before the end summary names the latest checkpoint
            if self.is_main:
                from biomedgpt.engine.train.run_summary import end_summary

                for line in end_summary(cfg, self.step, self.best, self.out):
                    self.logger.write(line)
        finally:
            self.ckpt.close()  # the last checkpoint's background write completes before the run ends
            self.watchdog.stop()
            self.logger.close()
            self.stop.uninstall()
            if self.sample_log is not None:
                self.sample_log.close()
        return metrics

    def _due(self, interval: int | None) -> bool:
        return bool(interval) and self.step % interval == 0

    def _eval_due(self) -> bool:
        """Every ``eval.interval`` steps and every ``eval.interval_epochs`` epochs (the original's
        --validate-interval-updates and --validate-interval; an epoch is the loader's length in steps)."""
        epochs = self.cfg.eval.interval_epochs
        epoch_steps = steps_per_epoch(len(self.train_loader), self.cfg.optim.grad_accum) if epochs else 0
        return self._due(self.cfg.eval.interval) or self._due(epochs * epoch_steps)

    def _finish_optimizer_step(self, step_ids: list[str]) -> None:
        """After the optimizer stepped: count the step, log its sample ids, update the EMA, log the window."""
        self.step += 1
        self.window.steps += 1
        if self.sample_log is not None:
            self.sample_log.write(json.dumps({"step": self.step, "ids": step_ids}) + "\n")
        if self.ema is not None:
            self.ema.update(self.engine.module, self.step)
        if self.cfg.checkpoint.interval or self.cfg.checkpoint.at_end:  # else the first save (a signal) reserves
            self.reserve_checkpoint_memory()
        self.logger.advance(1)
        if self._due(self.cfg.log.interval) or self.step == self.total_steps:
            self.logger.log(self.step, self._window_metrics(self.window))
            self.window = self._new_window()

    def _stop_if_asked(self, signalled: bool) -> None:
        """A signal, or ``checkpoint.stop_after`` steps done in this job: checkpoint and exit 75."""
        chunk_done = self.stop_at is not None and self.stop_at <= self.step < self.total_steps
        if not (signalled or chunk_done):
            return
        self.save()
        reason = "on signal" if signalled else f"after {self.cfg.checkpoint.stop_after} steps (stop_after)"
        self.logger.write(f"stopping {reason} at step {self.step}: checkpoint saved, exit "
                          f"{EXIT_RESUME} (resume to continue)")
        raise TrainingStopped()

    def _accumulate(self, batch: dict, out) -> None:
        images = batch.get("patch_images")
        n_img = 0.0
        if images is not None:
            per_image = image_tokens(*images.shape[-2:], sample_patch_num=batch.get("sample_patch_num"))
            n_img = float(batch["patch_masks"].sum()) * per_image
        text_tokens = float(batch["src_tokens"].ne(self.model_cfg.pad_id).sum()
                            + batch["target"].ne(self.model_cfg.pad_id).sum())
        self.window.add(batch.get("task_ids"), out.sample_loss, out.sample_tokens,
                        loss=float(out.sample_loss.sum()), nll=float(out.sample_nll.sum()),
                        tokens=float(out.sample_tokens.sum()), correct=float(out.sample_correct.sum()),
                        samples=float(batch["src_tokens"].shape[0]), all_tokens=text_tokens + n_img,
                        flops=batch_train_flops(self.model_cfg, batch, batch.get("sample_patch_num")))

    def _memory_gb(self) -> float:
        if self.dist.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.dist.device) / 2**30
        return psutil.Process().memory_info().rss / 2**30

    def _window_metrics(self, window: MetricWindow) -> dict:
        """Collective: the window summed over ranks, as the logged metrics."""
        total = window.reduced(self._memory_gb(), self.rank, self.world)
        elapsed = max(time.perf_counter() - window.start, 1e-9)
        tokens = max(total.tokens, 1)
        metrics = {
            "loss": total.loss / tokens, "nll": total.nll / tokens, "accuracy": total.correct / tokens,
            "lr": self.engine.get_lr()[0], "grad_norm": self._grad_norm(window),
            "step_time_s": elapsed / max(window.steps, 1),
            "samples_per_s": total.samples / elapsed, "tokens_per_s": total.all_tokens / elapsed,
            "mfu": total.flops / elapsed / (self.world * self.peak.tflops * 1e12),
            "memory_gb": total.memory_gb, "epoch": self.epoch, "nonfinite_skipped": self.nonfinite,
        }
        if self.cfg.deepspeed.precision == "fp16":
            metrics["loss_scale"] = float(self.engine.optimizer.cur_scale)
        for i, name in enumerate(self.task_names):
            if total.per_task[i, 1] > 0:
                metrics[f"loss/{name}"] = float(total.per_task[i, 0] / total.per_task[i, 1])
        return metrics

    def _grad_norm(self, window: MetricWindow) -> float:
        """DeepSpeed's norm of the last step; its plain fp32 path (stage 0) records none, so ours is used."""
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return window.grad_norm if window.grad_norm is not None else float("nan")
        return float(norm.item() if isinstance(norm, torch.Tensor) else norm)

    def _unclipped_grad_norm(self) -> float:
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    # -- evaluation ----------------------------------------------------------------------------

    def _beat(self, phase: str) -> None:
        self.watchdog.beat(phase, self.step)

    def evaluate(self) -> dict:
        """The evaluation's metrics at this step (``Validator.evaluate``)."""
        return self.validator.evaluate(
            self.step, lambda batch: self._forward_loss(_move(batch, self.dist.device, self.float_dtype), train=False),
            self._beat)

    def evaluate_and_track(self) -> dict:
        """Evaluate, keep the best value of ``eval.metric`` (exporting its model with ``eval.export_best``), log."""
        start = time.perf_counter()
        note = self.validator.ema_note(self.step)
        if note:
            self.logger.write(note)
        metrics = self.evaluate()
        key, mode = self.cfg.eval.metric, self.cfg.eval.mode
        if key not in metrics:
            raise KeyError(f"eval.metric {key!r} is not among the evaluation results {sorted(metrics)}")
        value = metrics[key]
        improved = self.best is None or (value < self.best if mode == "min" else value > self.best)
        if improved:
            self.best = value
            if self.cfg.eval.export_best:
                self.validator.export(self.out / "best")
        logged = {f"eval/{k}": v for k, v in metrics.items()}
        logged["eval/best"] = self.best
        logged["eval/time_s"] = time.perf_counter() - start
        self.logger.log(self.step, logged)
        return metrics
