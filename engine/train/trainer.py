"""The DeepSpeed trainer: one code path for every model size, ZeRO stage, precision and device type."""
from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import psutil
import torch
import yaml

from biomedgpt.engine.distributed import process_group as dist_utils  # sets DS_ACCELERATOR before deepspeed is imported
from biomedgpt.engine.checkpoint.manager import CheckpointManager, ResumeError, rng_state, set_rng_state
from biomedgpt.core.durable import atomic_write_text
from biomedgpt.core.config import to_dict
from biomedgpt.engine.distributed.ds_config import build_ds_config, device_precision
from biomedgpt.engine.train.ema import EMA
from biomedgpt.engine.flops import batch_train_flops, device_peak, image_tokens
from biomedgpt.engine.train.host_memory import set_mmap_threshold
from biomedgpt.engine.train.loss import kept_tokens, label_smoothed_cross_entropy
from biomedgpt.engine.train.metrics import MetricsLogger, MetricWindow
from biomedgpt.engine.distributed.parallelize import (apply_activation_checkpointing, apply_compile, build_model, compile_enabled,
                                          use_zero_init)
from biomedgpt.engine.run_config import OptimConfig, RunConfig
from biomedgpt.engine.train.run_lock import lock_output_dir
from biomedgpt.engine.distributed.zero import ZeroPlan
from biomedgpt.models.precision import torch_dtype

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


def lr_lambda(optim: OptimConfig, total_steps: int):
    """Multiplier of the base lr at optimizer step ``s``: linear warmup, then linear/polynomial decay."""
    warmup = optim.warmup_steps if optim.warmup_steps is not None else int(optim.warmup_ratio * total_steps)
    end = optim.end_lr / optim.lr if optim.lr > 0 else 0.0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if optim.schedule == "constant":
            return 1.0
        power = 1.0 if optim.schedule == "linear" else optim.power
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return (1.0 - end) * (1.0 - progress) ** power + end

    return factor


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
    def __init__(self, cfg: RunConfig, train_loader=None, eval_loader=None):
        """Loaders default to ``biomedgpt.data.loader.build_{train,eval}_loader`` over ``cfg.data``; tests and tools
        may pass any iterable with ``state_dict()``/``load_state_dict()``."""
        self.cfg = cfg
        ds = cfg.deepspeed
        set_mmap_threshold(ds.mmap_threshold_mib)
        self.dist = dist_utils.init_distributed(ds.backend, ds.collective_timeout_s)
        self.rank, self.world = self.dist.rank, self.dist.world_size
        ds.precision, precision_note = device_precision(ds.precision)  # the run (and its config.yaml) says fp32
        self.plan = ZeroPlan.from_config(ds, self.world)
        self.is_main = self.rank == 0
        self.out = Path(cfg.output_dir)
        self.run_lock = lock_output_dir(self.out, self.rank)  # one run per folder, before anything is written there
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)

        self.model_cfg = cfg.model_config()
        self.tokenizer = self._load_tokenizer()
        if self.tokenizer is not None and self.tokenizer.vocab_size != self.model_cfg.vocab_size:
            raise ValueError(f"model.vocab_size {self.model_cfg.vocab_size} != tokenizer vocabulary "
                             f"{self.tokenizer.vocab_size}")
        self.task_names = self._task_names()
        self.window = self._new_window()
        self.train_loader = train_loader if train_loader is not None else self._build_train_loader()
        self.eval_loader = eval_loader if eval_loader is not None else self._build_eval_loader()
        self.total_steps = self._total_steps()

        self.ckpt = CheckpointManager(self.out, self.rank, self.world, cfg.checkpoint.keep_last_n,
                                      background=cfg.checkpoint.background is not False,
                                      timeout_s=ds.collective_timeout_s)
        resume_tag = self.ckpt.latest() if cfg.checkpoint.resume == "auto" else None
        changed: list[str] = []  # optimizer settings this resumed run changes
        if resume_tag is not None:
            from biomedgpt.engine.checkpoint.resume_checks import check_resumable

            changed = check_resumable(self.ckpt.root, resume_tag, self.rank, to_dict(cfg))
        self.ds_config = build_ds_config(cfg)
        load_dir, load_tag = str(self.ckpt.root), resume_tag
        if resume_tag is not None and self.ckpt.needs_universal(resume_tag, self.plan):
            load_dir, load_tag = self.ckpt.prepare_universal(resume_tag)
            self.ds_config["checkpoint"] = {"load_universal": True}

        self.lora_note: Optional[str] = None  # set by _build_engine when LoRA is on
        self.engine = self._build_engine()
        self.ckpt.attach(self.engine)  # DeepSpeed's loads and saves go through the checkpoint manager
        self.float_dtype = torch_dtype(ds.precision)
        self.ema = (EMA(self.engine.module, cfg.ema.decay, cfg.ema.start_step, buffers=cfg.ema.buffers)
                    if cfg.ema.enabled else None)
        self.step, self.epoch, self.nonfinite = 0, 0, 0
        self.checkpoint_memory_reserved = False
        self.best: Optional[float] = None
        self.notes: list[str] = [n for n in (self.run_lock.note if self.run_lock else None, precision_note,
                                             self.lora_note) if n]
        self.resumed_rng: Optional[dict] = None
        if resume_tag is not None:
            self._resume(load_dir, load_tag, resume_tag, changed)
        if self.is_main:  # this run's settings (a resumed run's changes are applied or refused above)
            atomic_write_text(self.out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        self.peak = device_peak(ds.precision, cfg.log.peak_tflops)
        self.stop = dist_utils.StopRequest().install()
        self.logger = MetricsLogger(cfg.log, self.out, to_dict(cfg), self.total_steps, self.step, self.is_main)
        self.sample_log = self._open_sample_log() if cfg.log.sample_ids else None
        if resume_tag is not None:
            self.notes.insert(0, f"resumed from {resume_tag} at step {self.step}"
                              + (" through a universal checkpoint" if load_tag == "universal" else ""))
        for note in self.notes:
            self.logger.write(note)
        self._write_start_summary()

    def _write_start_summary(self) -> None:
        from biomedgpt.engine.flops import parameter_counts
        from biomedgpt.engine.train.run_summary import start_summary

        if not self.is_main:
            return
        lines = start_summary(self.cfg, self.model_cfg, parameter_counts(self.model_cfg)[0], self.world,
                              self.peak.name, self.peak.tflops, self.peak.source, self.total_steps, self.step)
        for line in lines:
            self.logger.write(line)

    # -- construction --------------------------------------------------------------------------

    def _load_tokenizer(self):
        from biomedgpt.models.tokenizer import Tokenizer

        if self.cfg.tokenizer:
            return Tokenizer.load(self.cfg.tokenizer)
        return Tokenizer.from_gpt2_files(self.cfg.bpe_dir)

    def _task_names(self) -> list[str]:
        from biomedgpt.data.tasks import TASK_NAMES

        return list(TASK_NAMES)

    def _build_train_loader(self):
        from biomedgpt.data.loader import build_train_loader

        if not self.cfg.data.streams:
            raise ValueError("data.streams is empty: nothing to train on")
        return build_train_loader(self.cfg.data, self.tokenizer, self.rank, self.world)

    def _build_eval_loader(self):
        from biomedgpt.data.loader import build_eval_loader

        from biomedgpt.engine.eval.config import selection_data

        if not self.cfg.data.eval_streams:
            return None
        data = selection_data(self.cfg.data, self.cfg.eval.select_on_test, self.cfg.eval.export_best)
        return build_eval_loader(data, self.tokenizer, self.rank, self.world)

    def _total_steps(self) -> int:
        optim = self.cfg.optim
        limits = []
        if optim.max_steps is not None:
            limits.append(optim.max_steps)
        if optim.max_epochs is not None:
            limits.append(optim.max_epochs * max(1, len(self.train_loader) // optim.grad_accum))
        return min(limits)

    def _build_engine(self):
        import deepspeed

        cfg, ds = self.cfg, self.cfg.deepspeed
        init_state = None
        if cfg.checkpoint.init_from:
            from biomedgpt.models.checkpoint import read_model_weights

            init_state = read_model_weights(cfg.checkpoint.init_from)
        zero_init = use_zero_init(self.model_cfg, ds.zero_stage, ds.zero_init)
        model = build_model(self.model_cfg, self.ds_config, zero_init, init_state)
        # Ranks' batches mix modalities differently; the same module calls on every rank keep ZeRO's gathers
        # and bucketed reductions in step (models/ofa.py _forward_by_modality).
        model.same_calls_every_batch = self.world > 1
        if cfg.lora.enabled:
            from biomedgpt.engine.train.lora import apply_lora

            self.lora_note = f"LoRA (peft): {apply_lora(model, cfg.lora):,} trainable parameters"
        if cfg.optim.freeze_encoder_embedding or cfg.optim.freeze_decoder_embedding:
            model.embed_tokens.weight.requires_grad_(False)  # the one table both sides share: no optimizer state
        if ds.activation_checkpointing:
            apply_activation_checkpointing(model)
        if compile_enabled(self.model_cfg, self.dist.device, ds.zero_stage):
            apply_compile(model)
        params = [p for p in model.parameters() if p.requires_grad]
        optim = cfg.optim
        optimizer = None
        if optim.implementation == "torch":
            optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                          weight_decay=optim.weight_decay,
                                          fused=self.dist.device.type == "cuda" and ds.offload_optimizer == "none",
                                          foreach=None if self.dist.device.type == "cuda" else True)
        schedule = lr_lambda(optim, self.total_steps)
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, model_parameters=params if optimizer is None else None,
            config=self.ds_config, lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
        if ds.precision != "fp32":
            _match_buffer_dtype(engine.module)
        return engine

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
            need = self._state_bytes() * dist_utils.ranks_on_this_host(self.world)
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
        local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
                    for p in self.engine.module.parameters())
        local_opt = self.plan.optimizer_state_elements(local)
        mixed = self.cfg.deepspeed.precision != "fp32"
        return local * (2 if mixed else 4) + local_opt * 4 * (3 if mixed else 2) + (local * 4 if self.ema else 0)

    def _resume(self, load_dir: str, load_tag: str, tag: str, changed: list[str]) -> None:
        path, client = self.engine.load_checkpoint(load_dir, tag=load_tag, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if path is None:
            raise ResumeError(f"DeepSpeed could not load {load_dir}/{load_tag}")
        if changed:  # settings checked before loading (resume_checks): these apply from here on
            from biomedgpt.engine.checkpoint.resume_checks import apply_optimizer_settings

            apply_optimizer_settings(self.engine.lr_scheduler, self.cfg.optim)
            self.notes.append(f"resumed with changed optimizer settings, applied: {'; '.join(changed)}")
        self.step, self.epoch = client["step"], client["epoch"]
        self.nonfinite, self.best = client["nonfinite"], client["best"]
        state = self.ckpt.load_rank_state(tag)
        same_world = client["world_size"] == self.world
        self.train_loader.load_state_dict(state["loader"])
        if same_world:
            own = dict(self.engine.module.named_buffers())
            with torch.no_grad():
                for name, value in state["buffers"].items():
                    own[name].copy_(value)
        if self.ema is not None:
            if state["ema"] is not None and (same_world or not state["ema"]["partitioned"]):
                self.ema.load_state_dict(state["ema"])
            else:
                self.notes.append("EMA restarted from the current weights (its ZeRO-3 partitions were saved "
                                  "by another world size)")
        self.resumed_rng = state["rng"]

    def _open_sample_log(self):
        """This rank's sample-id log, cut back to the resumed step (a crashed run may have logged past it)."""
        path = self.out / "sample_ids" / f"rank_{self.rank:05d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= self.step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))
        return open(path, "a", buffering=1)

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
        from biomedgpt.engine.distributed.watchdog import Watchdog

        self.watchdog = Watchdog(self.out, self.rank, cfg.watchdog.timeout_s, cfg.watchdog.poll_s).start()
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
        steps_per_epoch = max(1, len(self.train_loader) // self.cfg.optim.grad_accum) if epochs else 0
        return self._due(self.cfg.eval.interval) or self._due(epochs * steps_per_epoch)

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

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Loss, perplexity and token accuracy over the eval set (overall and per task), and with
        ``eval.downstream`` the task metrics by generation, every rank agreeing (``engine/eval/evaluator.py``)."""
        from biomedgpt.engine.eval.evaluator import Evaluator

        use_ema = self.ema is not None and self.cfg.eval.use_ema
        self.engine.eval()
        evaluator = Evaluator(self.engine.module, self.dist.device, self.rank, self.world,
                              self.plan.partitions_params, beat=self._beat, engine=self.engine,
                              log=self.logger.write)
        context = self.ema.swapped_in(self.engine.module) if use_ema else nullcontext()
        with context:
            metrics = evaluator.loss_metrics(
                self.eval_loader, lambda batch: self._forward_loss(_move(batch, self.dist.device, self.float_dtype),
                                                                   train=False),
                self.task_names, self.cfg.eval.max_batches)
            if self.cfg.eval.downstream is not None:
                metrics.update(self._downstream(evaluator))
        return metrics

    def _downstream(self, evaluator) -> dict:
        """The task metrics by generation; rank 0 writes the predictions of this step."""
        start = time.perf_counter()
        results, records = evaluator.task_metrics(self.tokenizer, self.eval_loader, self.cfg.eval.downstream)
        results["downstream_time_s"] = time.perf_counter() - start
        if evaluator.gathered is not None:
            results["decoding_gathered"] = float(evaluator.gathered)
        if evaluator.sync is not None:
            results["synced_padding_calls"] = float(sum(evaluator.gather([evaluator.sync.padding_calls])))
        if self.is_main and self.cfg.eval.write_predictions:
            path = self.out / "eval_predictions" / f"step_{self.step:08d}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            ordered = sorted(records, key=lambda r: (r["task"], r["id"]))
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in ordered))
        return results

    def _beat(self, phase: str) -> None:
        watchdog = getattr(self, "watchdog", None)
        if watchdog is not None:
            watchdog.beat(phase, self.step)

    def evaluate_and_track(self) -> dict:
        start = time.perf_counter()
        if self.ema is not None and self.cfg.eval.use_ema:  # else a young run's near-initial EMA scores puzzle
            updates = max(0, self.step - self.cfg.ema.start_step)
            first = "initial weights" if not self.cfg.ema.start_step else f"weights of step {self.cfg.ema.start_step}"
            self.logger.write(f"step {self.step}: evaluating the EMA weights (decay {self.cfg.ema.decay}: the "
                              f"{first} still make up {self.cfg.ema.decay ** updates:.1%} of them; "
                              f"eval.use_ema=false evaluates the trained weights)")
        metrics = self.evaluate()
        key, mode = self.cfg.eval.metric, self.cfg.eval.mode
        if key not in metrics:
            raise KeyError(f"eval.metric {key!r} is not among the evaluation results {sorted(metrics)}")
        value = metrics[key]
        improved = self.best is None or (value < self.best if mode == "min" else value > self.best)
        if improved:
            self.best = value
            if self.cfg.eval.export_best:
                self.export(self.out / "best")
        logged = {f"eval/{k}": v for k, v in metrics.items()}
        logged["eval/best"] = self.best
        logged["eval/time_s"] = time.perf_counter() - start
        self.logger.log(self.step, logged)
        return metrics

    def export(self, directory: Path) -> None:
        """Write a model directory (biomedgpt.models.checkpoint format) with the evaluated weights (EMA if used)."""
        from biomedgpt.engine.train.lora import write_merged_lora
        from biomedgpt.models.checkpoint import save_pretrained

        use_ema = self.ema is not None and self.cfg.eval.use_ema
        module = self.engine.module
        with (self.ema.swapped_in(module) if use_ema else nullcontext()):
            with self.plan.gathered(module):
                if self.is_main and self.cfg.lora.enabled:
                    write_merged_lora(module, directory, self.tokenizer, self.cfg.lora)
                elif self.is_main:
                    save_pretrained(module, directory, self.tokenizer, overwrite=True)
        dist_utils.barrier()


def _match_buffer_dtype(module: torch.nn.Module) -> None:
    """DeepSpeed casts parameters to bf16/fp16 but not buffers; BatchNorm needs its statistics in the same dtype."""
    dtype = next(module.parameters()).dtype
    for sub in module.modules():
        for name, buf in sub.named_buffers(recurse=False):
            if buf.is_floating_point() and buf.dtype != dtype:
                setattr(sub, name, buf.to(dtype))


