"""Everything a training run is built from, before its loop starts (torchtitan's ``TrainSpec``): the process
(host memory, process group, seeds, output-folder lock), the tokenizer, the loaders, the checkpoint manager
and the resume point (checked before DeepSpeed loads anything), the model, optimizer and DeepSpeed engine,
the EMA, the restored loop state, the metrics logger, the sample-id log, the in-training evaluation, the
run's config.yaml and start summary. ``build_parts`` runs them in order and returns ``TrainParts``, from which ``Trainer`` (the loop
alone) is made.

Each builder is a plain function; ``TrainSpec`` names the swappable ones, so a tool or a test replaces any
of them (a loader over a list of batches, an engine of its own) and builds a ``Trainer`` in-process.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, TextIO

import numpy as np
import torch
import yaml

from biomedgpt.engine.distributed import process_group as dist_utils  # sets DS_ACCELERATOR before deepspeed is imported
from biomedgpt.engine.checkpoint.manager import CheckpointManager, ResumeError
from biomedgpt.core.durable import atomic_write_text
from biomedgpt.core.config import to_dict
from biomedgpt.engine.distributed.ds_config import build_ds_config, device_precision
from biomedgpt.engine.train.ema import EMA
from biomedgpt.engine.flops import DevicePeak, device_peak
from biomedgpt.engine.train.host_memory import set_mmap_threshold
from biomedgpt.engine.train.metrics import MetricsLogger
from biomedgpt.engine.distributed.parallelize import apply_activation_checkpointing, apply_compile
from biomedgpt.engine.run_config import RunConfig
from biomedgpt.engine.train.run_lock import RunLock, lock_output_dir
from biomedgpt.engine.train.schedule import lr_lambda, total_steps
from biomedgpt.engine.train.validation import Validator
from biomedgpt.engine.distributed.zero import ZeroPlan
from biomedgpt.models.config import ModelConfig
from biomedgpt.models.precision import torch_dtype


# -- the process -------------------------------------------------------------------------------------------


@dataclass
class RunProcess:
    """This rank in its job: the process group, the ZeRO plan, the output folder (locked), the device's peak."""

    dist: dist_utils.DistInfo
    plan: ZeroPlan
    out: Path
    run_lock: Optional[RunLock]
    peak: DevicePeak
    notes: list[str] = field(default_factory=list)  # for the console once the logger runs

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def world(self) -> int:
        return self.dist.world_size

    @property
    def is_main(self) -> bool:
        return self.dist.rank == 0


def setup_process(cfg: RunConfig) -> RunProcess:
    """Host memory, the process group, the precision the device supports (the run and its config.yaml then
    say fp32), the one-run-per-folder lock (before anything is written there), the seeds."""
    ds = cfg.deepspeed
    set_mmap_threshold(ds.mmap_threshold_mib)
    dist = dist_utils.init_distributed(ds.backend, ds.collective_timeout_s)
    ds.precision, precision_note = device_precision(ds.precision)
    out = Path(cfg.output_dir)
    run_lock = lock_output_dir(out, dist.rank)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    notes = [n for n in (run_lock.note if run_lock else None, precision_note) if n]
    return RunProcess(dist, ZeroPlan.from_config(ds, dist.world_size), out, run_lock,
                      device_peak(ds.precision, cfg.log.peak_tflops), notes)


# -- tokenizer and data ------------------------------------------------------------------------------------


def build_tokenizer(cfg: RunConfig):
    from biomedgpt.models.tokenizer import Tokenizer

    if cfg.tokenizer:
        return Tokenizer.load(cfg.tokenizer)
    return Tokenizer.from_gpt2_files(cfg.bpe_dir)


def build_train_loader(cfg: RunConfig, tokenizer, rank: int, world: int):
    """The streaming training loader over ``data.streams``; any iterable with ``__len__``, ``state_dict()``
    and ``load_state_dict()`` may stand in for it."""
    from biomedgpt.data.loader import build_train_loader as streaming_train_loader

    if not cfg.data.streams:
        raise ValueError("data.streams is empty: nothing to train on")
    return streaming_train_loader(cfg.data, tokenizer, rank, world)


def build_eval_loader(cfg: RunConfig, tokenizer, rank: int, world: int):
    """The in-training evaluation's loader: the streams that select the best model (None: no evaluation)."""
    from biomedgpt.data.loader import build_eval_loader as streaming_eval_loader
    from biomedgpt.engine.eval.config import selection_data

    if not cfg.data.eval_streams:
        return None
    data = selection_data(cfg.data, cfg.eval.select_on_test, cfg.eval.export_best)
    return streaming_eval_loader(data, tokenizer, rank, world)


def task_names() -> list[str]:
    from biomedgpt.data.tasks import TASK_NAMES

    return list(TASK_NAMES)


# -- checkpoints and resuming ------------------------------------------------------------------------------


def build_checkpoint_manager(cfg: RunConfig, process: RunProcess) -> CheckpointManager:
    return CheckpointManager(process.out, process.rank, process.world, cfg.checkpoint.keep_last_n,
                             background=cfg.checkpoint.background is not False,
                             timeout_s=cfg.deepspeed.collective_timeout_s)


@dataclass
class ResumePoint:
    """A checkpoint this run resumes from, already checked: what DeepSpeed loads (``load_dir``/``load_tag``,
    the tag itself or its universal conversion) and the optimizer settings this run changes."""

    tag: str
    load_dir: str
    load_tag: str
    changed: list[str]

    @property
    def universal(self) -> bool:
        return self.load_tag != self.tag


def find_resume_point(cfg: RunConfig, ckpt: CheckpointManager, plan: ZeroPlan, rank: int) -> Optional[ResumePoint]:
    """The newest complete checkpoint (``checkpoint.resume=auto``), once ``resume_checks`` accepts it for this
    run's settings (``ResumeError`` naming the setting or file otherwise): before any model is built or
    DeepSpeed reads a file. A checkpoint of another ZeRO layout is converted to the universal format."""
    from biomedgpt.engine.checkpoint.resume_checks import check_resumable

    tag = ckpt.latest() if cfg.checkpoint.resume == "auto" else None
    if tag is None:
        return None
    changed = check_resumable(ckpt.root, tag, rank, to_dict(cfg))
    load_dir, load_tag = str(ckpt.root), tag
    if ckpt.needs_universal(tag, plan):
        load_dir, load_tag = ckpt.prepare_universal(tag)
    return ResumePoint(tag, load_dir, load_tag, changed)


@dataclass
class LoopState:
    """The loop's counters (saved as DeepSpeed's client state) and the RNG states the loop restores once its
    first batch is fetched (``Trainer._batches``)."""

    step: int = 0
    epoch: int = 0
    nonfinite: int = 0
    best: Optional[float] = None
    rng: Optional[dict] = None


def restore(resume: ResumePoint, engine, ckpt: CheckpointManager, cfg: RunConfig, world: int, train_loader,
            ema: Optional[EMA], notes: list[str]) -> LoopState:
    """Load the checkpoint into the engine (weights, optimizer, schedule), apply the optimizer settings this
    run changes, and restore this rank's loader position, buffers and EMA; returns the loop state."""
    path, client = engine.load_checkpoint(resume.load_dir, tag=resume.load_tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if path is None:
        raise ResumeError(f"DeepSpeed could not load {resume.load_dir}/{resume.load_tag}")
    if resume.changed:  # settings checked before loading (resume_checks): these apply from here on
        from biomedgpt.engine.checkpoint.resume_checks import apply_optimizer_settings

        apply_optimizer_settings(engine.lr_scheduler, cfg.optim)
        notes.append(f"resumed with changed optimizer settings, applied: {'; '.join(resume.changed)}")
    state = ckpt.load_rank_state(resume.tag)
    same_world = client["world_size"] == world
    train_loader.load_state_dict(state["loader"])
    if same_world:
        own = dict(engine.module.named_buffers())
        with torch.no_grad():
            for name, value in state["buffers"].items():
                own[name].copy_(value)
    if ema is not None:
        if state["ema"] is not None and (same_world or not state["ema"]["partitioned"]):
            ema.load_state_dict(state["ema"])
        else:
            notes.append("EMA restarted from the current weights (its ZeRO-3 partitions were saved "
                         "by another world size)")
    return LoopState(client["step"], client["epoch"], client["nonfinite"], client["best"], state["rng"])


# -- model, optimizer, engine ------------------------------------------------------------------------------


@dataclass
class EngineInputs:
    """What the engine builder needs besides the run config."""

    model_cfg: ModelConfig
    ds_config: dict
    device: torch.device
    plan: ZeroPlan
    total_steps: int


def build_engine(cfg: RunConfig, inputs: EngineInputs) -> tuple[Any, Optional[str]]:
    """The model (initial weights from ``checkpoint.init_from``, LoRA, frozen embeddings, activation
    checkpointing, compile), the optimizer and LR schedule, in a DeepSpeed engine; and a note for the console
    (LoRA's trainable parameters) or None."""
    import deepspeed

    ds = cfg.deepspeed
    init_state = None
    if cfg.checkpoint.init_from:
        from biomedgpt.models.checkpoint import read_model_weights

        init_state = read_model_weights(cfg.checkpoint.init_from)
    model = inputs.plan.build_model(inputs.model_cfg, inputs.ds_config, init_state)  # zero.Init, same calls per rank
    note = None
    if cfg.lora.enabled:
        from biomedgpt.engine.train.lora import apply_lora

        note = f"LoRA (peft): {apply_lora(model, cfg.lora):,} trainable parameters"
    if cfg.optim.freeze_encoder_embedding or cfg.optim.freeze_decoder_embedding:
        model.embed_tokens.weight.requires_grad_(False)  # the one table both sides share: no optimizer state
    if ds.activation_checkpointing:
        apply_activation_checkpointing(model)
    if inputs.plan.compiles(inputs.model_cfg, inputs.device):
        apply_compile(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = cfg.optim
    optimizer = None
    cuda = inputs.device.type == "cuda"
    if optim.implementation == "torch":
        optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                      weight_decay=optim.weight_decay,
                                      fused=cuda and ds.offload_optimizer == "none", foreach=None if cuda else True)
    schedule = lr_lambda(optim, inputs.total_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=params if optimizer is None else None,
        config=inputs.ds_config, lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    if ds.precision != "fp32":
        _match_buffer_dtype(engine.module)
    return engine, note


def _match_buffer_dtype(module: torch.nn.Module) -> None:
    """DeepSpeed casts parameters to bf16/fp16 but not buffers; BatchNorm needs its statistics in the same dtype."""
    dtype = next(module.parameters()).dtype
    for sub in module.modules():
        for name, buf in sub.named_buffers(recurse=False):
            if buf.is_floating_point() and buf.dtype != dtype:
                setattr(sub, name, buf.to(dtype))


def build_ema(cfg: RunConfig, module: torch.nn.Module) -> Optional[EMA]:
    return EMA(module, cfg.ema.decay, cfg.ema.start_step, buffers=cfg.ema.buffers) if cfg.ema.enabled else None


def build_validator(cfg: RunConfig, process: RunProcess, engine, ema: Optional[EMA], tokenizer, eval_loader,
                    names: list[str], logger: MetricsLogger) -> Validator:
    return Validator(cfg, engine, ema, process.plan, process.dist.device, process.rank, process.world, tokenizer,
                     eval_loader, names, process.out, logger.write)


# -- what the run writes -----------------------------------------------------------------------------------


def build_metrics_logger(cfg: RunConfig, process: RunProcess, total: int, start_step: int) -> MetricsLogger:
    return MetricsLogger(cfg.log, process.out, to_dict(cfg), total, start_step, process.is_main)


def open_sample_log(cfg: RunConfig, process: RunProcess, start_step: int) -> Optional[TextIO]:
    """This rank's sample-id log (``log.sample_ids``), cut back to the resumed step (a crashed run may have
    logged past it)."""
    if not cfg.log.sample_ids:
        return None
    path = process.out / "sample_ids" / f"rank_{process.rank:05d}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= start_step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
    return open(path, "a", buffering=1)


def write_run_config(cfg: RunConfig, process: RunProcess) -> None:
    """This run's settings in ``<output_dir>/config.yaml`` (a resumed run's changes are applied or refused
    before)."""
    if process.is_main:
        atomic_write_text(process.out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))


def start_lines(cfg: RunConfig, model_cfg: ModelConfig, process: RunProcess, total: int, step: int) -> list[str]:
    """The console's start-up summary (``run_summary.start_summary``)."""
    from biomedgpt.engine.flops import parameter_counts
    from biomedgpt.engine.train.run_summary import start_summary

    peak = process.peak
    return start_summary(cfg, model_cfg, parameter_counts(model_cfg)[0], process.world, peak.name, peak.tflops,
                         peak.source, total, step)


# -- the spec and the parts --------------------------------------------------------------------------------


@dataclass
class TrainSpec:
    """The swappable builders. Replace one with a function of the same signature (``dataclasses.replace``)."""

    tokenizer: Callable[[RunConfig], Any] = build_tokenizer
    train_loader: Callable[[RunConfig, Any, int, int], Any] = build_train_loader
    eval_loader: Callable[[RunConfig, Any, int, int], Any] = build_eval_loader
    checkpoint_manager: Callable[[RunConfig, RunProcess], CheckpointManager] = build_checkpoint_manager
    engine: Callable[[RunConfig, EngineInputs], tuple[Any, Optional[str]]] = build_engine
    ema: Callable[[RunConfig, torch.nn.Module], Optional[EMA]] = build_ema
    metrics_logger: Callable[[RunConfig, RunProcess, int, int], MetricsLogger] = build_metrics_logger
    sample_log: Callable[[RunConfig, RunProcess, int], Optional[TextIO]] = open_sample_log
    validator: Callable[[RunConfig, RunProcess, Any, Optional[EMA], Any, Any, list[str], MetricsLogger],
                        Validator] = build_validator


@dataclass
class TrainParts:
    """Everything ``Trainer`` runs with, built and (on resume) restored."""

    process: RunProcess
    model_cfg: ModelConfig
    tokenizer: Any
    task_names: list[str]
    train_loader: Any
    eval_loader: Any
    total_steps: int
    ckpt: CheckpointManager
    engine: Any
    float_dtype: torch.dtype
    ema: Optional[EMA]
    state: LoopState
    stop: dist_utils.StopRequest
    logger: MetricsLogger
    sample_log: Optional[TextIO]
    validator: Validator


def build_parts(cfg: RunConfig, spec: Optional[TrainSpec] = None) -> TrainParts:
    """Build a run's parts in order (``spec``: the builders, ``TrainSpec()`` by default); a resumed run's
    checkpoint is checked before the engine is built and loaded into it after. Writes config.yaml and logs
    the start summary."""
    spec = spec or TrainSpec()
    process = setup_process(cfg)
    model_cfg = cfg.model_config()
    tokenizer = spec.tokenizer(cfg)
    if tokenizer is not None and tokenizer.vocab_size != model_cfg.vocab_size:
        raise ValueError(f"model.vocab_size {model_cfg.vocab_size} != tokenizer vocabulary {tokenizer.vocab_size}")
    # a checkpoint that cannot resume fails before the data is opened (remote shards, streaming's import)
    ckpt = spec.checkpoint_manager(cfg, process)
    resume = find_resume_point(cfg, ckpt, process.plan, process.rank)
    train_loader = spec.train_loader(cfg, tokenizer, process.rank, process.world)
    eval_loader = spec.eval_loader(cfg, tokenizer, process.rank, process.world)
    total = total_steps(cfg.optim, train_loader)

    ds_config = build_ds_config(cfg)
    if resume is not None and resume.universal:
        ds_config["checkpoint"] = {"load_universal": True}
    engine, engine_note = spec.engine(cfg, EngineInputs(model_cfg, ds_config, process.dist.device, process.plan,
                                                        total))
    ckpt.attach(engine)  # DeepSpeed's loads and saves go through the checkpoint manager
    ema = spec.ema(cfg, engine.module)
    notes = process.notes + ([engine_note] if engine_note else [])
    state = LoopState()
    if resume is not None:
        state = restore(resume, engine, ckpt, cfg, process.world, train_loader, ema, notes)
        notes.insert(0, f"resumed from {resume.tag} at step {state.step}"
                     + (" through a universal checkpoint" if resume.universal else ""))
    write_run_config(cfg, process)
    stop = dist_utils.StopRequest().install()
    logger = spec.metrics_logger(cfg, process, total, state.step)
    sample_log = spec.sample_log(cfg, process, state.step)
    for line in notes + (start_lines(cfg, model_cfg, process, total, state.step) if process.is_main else []):
        logger.write(line)
    names = task_names()
    validator = spec.validator(cfg, process, engine, ema, tokenizer, eval_loader, names, logger)
    return TrainParts(process, model_cfg, tokenizer, names, train_loader, eval_loader, total, ckpt, engine,
                      torch_dtype(cfg.deepspeed.precision), ema, state, stop, logger, sample_log, validator)
