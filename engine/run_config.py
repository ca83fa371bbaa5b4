"""The settings of one training run, as the typed dataclasses that ``biomedgpt.core.config`` parses.

Every value DeepSpeed needs (batch sizes, clipping, precision, ZeRO stage, offload) is derived from this
config and written into the ``ds_configs/*.json`` template by the engine, so the two cannot disagree.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from biomedgpt.data.config import DataConfig
from biomedgpt.core.config import PathStr, from_dict
from biomedgpt.engine.distributed.zero import check_stage_settings, stage_partitions_params
from biomedgpt.engine.eval.config import DownstreamConfig, selection_data
from biomedgpt.models.config import ModelConfig, ModelSpec, Precision, saved_model_settings


@dataclass
class OptimConfig:
    """AdamW with linear warmup then linear / polynomial decay (the published runs' settings)."""

    lr: float = 5e-5  # peak learning rate
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    warmup_ratio: float = 0.01  # share of max steps spent warming up (used when warmup_steps is None)
    warmup_steps: Optional[int] = None  # warmup length in optimizer steps (overrides warmup_ratio)
    # decay after warmup (polynomial with power 1.0 is linear)
    schedule: Literal["linear", "polynomial", "constant"] = "polynomial"
    power: float = 1.0  # polynomial decay exponent (1.0 = linear)
    end_lr: float = 0.0  # learning rate at the end of the decay
    max_steps: Optional[int] = 1000  # optimizer steps; with max_epochs the smaller wins (null: epochs only)
    max_epochs: Optional[int] = None  # epochs over the training streams (with max_steps the smaller wins)
    grad_accum: int = 1  # micro-batches per optimizer step (--update-freq)
    clip_norm: float = 1.0  # 0 disables clipping
    label_smoothing: float = 0.0  # label smoothing of the cross-entropy
    # OFA's --freeze-encoder-embedding / --freeze-decoder-embedding. Encoder and decoder share one token table
    # (tied to the output projection, as OFA's --share-all-embeddings): either flag keeps that table fixed, and
    # it gets no optimizer state.
    freeze_encoder_embedding: bool = False
    freeze_decoder_embedding: bool = False
    # OFA's --drop-worst-ratio / --drop-worst-after: once more than drop_worst_after optimizer steps are done,
    # each micro-batch drops this fraction of its target tokens with the largest loss (per loss group)
    drop_worst_ratio: float = 0.0
    drop_worst_after: int = 0
    # accumulation: fairseq's - the loss summed over every micro-batch of an optimizer step on every rank, divided
    # by their total target tokens (one big batch's loss); micro_batch: each micro-batch's own mean, averaged
    loss_normalization: Literal["accumulation", "micro_batch"] = "accumulation"
    implementation: Literal["torch", "deepspeed"] = "torch"  # deepspeed: its compiled Fused/CPU Adam

    def __post_init__(self) -> None:
        if self.max_steps is None and self.max_epochs is None:
            raise ValueError("set optim.max_steps or optim.max_epochs")
        if self.grad_accum < 1:
            raise ValueError(f"optim.grad_accum must be >= 1, got {self.grad_accum}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"optim.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 <= self.drop_worst_ratio < 1.0:
            raise ValueError(f"optim.drop_worst_ratio must be in [0, 1), got {self.drop_worst_ratio}")
        if self.drop_worst_after < 0:
            raise ValueError(f"optim.drop_worst_after must be >= 0, got {self.drop_worst_after}")

    def drop_worst_at(self, completed_steps: int) -> float:
        """The share of token losses dropped while the optimizer has done ``completed_steps`` steps
        (OFA drops once its update count exceeds ``drop_worst_after``)."""
        return self.drop_worst_ratio if completed_steps > self.drop_worst_after else 0.0


@dataclass
class DeepSpeedConfig:
    """ZeRO stage, offload, precision and the distributed run's failure handling."""

    zero_stage: int = 0  # DeepSpeed ZeRO stage: 0 none, 1 optimizer states, 2 + gradients, 3 + parameters partitioned
    template: Optional[PathStr] = None  # a ds_configs/*.json file; None: ds_configs/zero{stage}[_offload].json
    offload_optimizer: Literal["none", "cpu"] = "none"  # ZeRO >= 1: optimizer states in host memory
    offload_param: Literal["none", "cpu"] = "none"  # ZeRO-3 only
    zero_init: Optional[bool] = None  # build under zero.Init (ZeRO-3); None: from 300M parameters up
    precision: Precision = "fp32"  # fp32, or bf16 / fp16 mixed precision (fp32 on a device without them, said once)
    # recompute each transformer layer in the backward (less memory, ~30% more compute)
    activation_checkpointing: bool = False
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on GPUs, gloo on CPUs
    collective_timeout_s: int = 600  # a collective waiting longer (a dead peer) fails the rank
    # host allocations from this size (MiB) return to the OS when freed (engine/train/host_memory.py); 0: glibc's own
    # dynamic threshold; None: 1 MiB at ZeRO-3, 0 below (there the fixed threshold's page faults cost a CPU step)
    host_mmap_threshold_mib: Optional[float] = None
    # fp16 dynamic loss scaling (None: the template's values). fairseq's scaler, which the original scripts run,
    # starts at 2**7 (--fp16-init-scale 128), grows after --fp16-scale-window overflow-free updates and halves
    # on the first overflow (hysteresis 1)
    initial_scale_power: Optional[int] = None  # the first loss scale is 2**this
    loss_scale_window: Optional[int] = None  # --fp16-scale-window
    loss_scale_hysteresis: Optional[int] = None  # overflows tolerated before the scale drops

    def __post_init__(self) -> None:
        check_stage_settings(self.zero_stage, self.offload_optimizer, self.offload_param)
        for name in ("initial_scale_power", "loss_scale_window", "loss_scale_hysteresis"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "initial_scale_power" else 1):
                raise ValueError(f"deepspeed.{name} must be {'>= 0' if name == 'initial_scale_power' else '>= 1'}, "
                                 f"got {value}")
        if self.host_mmap_threshold_mib is not None and self.host_mmap_threshold_mib < 0:
            raise ValueError(f"deepspeed.host_mmap_threshold_mib must be >= 0, got {self.host_mmap_threshold_mib}")

    @property
    def mmap_threshold_mib(self) -> float:
        """The threshold this run sets (``host_mmap_threshold_mib`` resolved)."""
        if self.host_mmap_threshold_mib is not None:
            return self.host_mmap_threshold_mib
        return 1.0 if stage_partitions_params(self.zero_stage) else 0.0


@dataclass
class EmaConfig:
    """Exponential moving average of the weights (the paper evaluates EMA weights)."""

    enabled: bool = False  # keep an exponential moving average of the weights
    decay: float = 0.9999  # EMA decay per optimizer step
    start_step: int = 0  # steps before this copy the weights instead of averaging
    # also average the floating buffers (BatchNorm running mean / var) and copy the integer ones
    # (num_batches_tracked), as fairseq's EMA; evaluation with the EMA uses them too
    buffers: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"ema.decay must be in (0, 1), got {self.decay}")


@dataclass
class EvalConfig:
    """When to evaluate on ``data.eval_streams`` and which metric picks the best checkpoint."""

    interval: int = 0  # optimizer steps between evaluations; 0: only at the end
    interval_epochs: int = 0  # also every this many epochs (the original's --validate-interval); 0: off
    at_end: bool = True  # evaluate once more at the end of training
    metric: str = "loss"  # a key of the evaluation results (loss, accuracy, loss/<task>, ...)
    mode: Literal["min", "max"] = "min"  # whether a lower (min) or higher (max) metric is better
    # cap per evaluation (None: the whole eval set): the first max_batches x data.eval_batch_size samples,
    # over all ranks together (each rank its share), so eval/loss means the same on any number of ranks
    max_batches: Optional[int] = None
    use_ema: bool = True  # evaluate the EMA weights when EMA is enabled
    export_best: bool = True  # write <output_dir>/best (a model directory) when the metric improves
    # Training evaluates the eval streams that are not split: test; a run whose eval streams are all test splits
    # refuses to select the best model on them unless this is true (numbers picked on test are optimistic).
    select_on_test: bool = False
    # The paper's task metrics (VQA accuracy, BLEU/CIDEr, ROUGE, ...) by generation, added to the results
    # under their names (e.g. metric: vqa/accuracy, mode: max). At every ZeRO stage: under ZeRO-3 the
    # ranks decode in lockstep (biomedgpt.models.generation, synced decoding).
    downstream: Optional[DownstreamConfig] = None
    write_predictions: bool = True  # with downstream: <output_dir>/eval_predictions/step_N.jsonl (rank 0)

    def __post_init__(self) -> None:
        if self.interval < 0 or self.interval_epochs < 0:
            raise ValueError(f"eval.interval and eval.interval_epochs must be >= 0, got {self.interval}, "
                             f"{self.interval_epochs}")


@dataclass
class LogConfig:
    """Console, metrics.jsonl and wandb. wandb is offline unless WANDB_MODE / an API key says otherwise."""

    interval: int = 10  # optimizer steps between logged lines
    progress_bar: bool = True  # on a terminal only; redirected output gets the plain lines every interval
    # auto: WANDB_MODE, online with an API key, else offline files under output_dir/wandb
    wandb_mode: Literal["auto", "offline", "online", "disabled"] = "auto"
    wandb_project: str = "biomedgpt"  # wandb project name
    wandb_run_name: Optional[str] = None  # wandb run name (None: wandb's own)
    peak_tflops: Optional[float] = None  # per device, for MFU; None: from the device table / a measurement
    sample_ids: bool = False  # write each rank's sample ids per step to sample_ids/rank_NNNNN.jsonl (data audit)


@dataclass
class CheckpointConfig:
    interval: int = 1000  # optimizer steps between checkpoints (0: only on exit / signal)
    keep_last_n: int = 2  # checkpoints kept (older ones are deleted once a newer one is complete)
    at_end: bool = True  # checkpoint at the end of training
    resume: Literal["auto", "never"] = "auto"  # auto: continue from <output_dir>/checkpoints/latest
    stop_after: Optional[int] = None  # steps to run in this invocation, then checkpoint and exit 75 (chunked jobs)
    init_from: Optional[PathStr] = None  # a model directory (biomedgpt.models.checkpoint) to start a fresh run from
    # Snapshot to host memory and write in a background thread (training goes on; `latest` moves once every
    # rank's files are fsynced). None: on unless host memory cannot hold a second copy of the state.
    background: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.keep_last_n < 1:
            raise ValueError(f"checkpoint.keep_last_n must be >= 1, got {self.keep_last_n}")


@dataclass
class WatchdogConfig:
    """Progress watchdog (engine/distributed/watchdog.py): a rank without progress this long dumps every rank's stacks
    into <output_dir>/watchdog/ and the job exits 86. Sized for slow GPU steps and large checkpoint writes."""

    timeout_s: float = 1800.0  # 0: off
    poll_s: float = 1.0  # seconds between the watchdog's progress checks

    def __post_init__(self) -> None:
        if self.timeout_s < 0 or self.poll_s <= 0:
            raise ValueError(f"watchdog.timeout_s must be >= 0 and watchdog.poll_s > 0, got {self.timeout_s}, "
                             f"{self.poll_s}")


@dataclass
class LoraConfig:
    """LoRA fine-tuning through peft (engine/train/lora.py): low-rank adapters on the matching Linear layers, every
    other weight frozen (no gradients, no optimizer state) except the modules listed as fully trainable."""

    enabled: bool = False  # LoRA adapters (peft) on target_modules; everything else frozen
    r: int = 8  # adapter rank
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # dropout on the adapters' input
    # Linear layers that get adapters: names or name suffixes as peft matches them (models/ofa.py: q_proj,
    # k_proj, v_proj, out_proj in attention; fc1, fc2 in the feed-forward blocks)
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    modules_to_save: list[str] = field(default_factory=list)  # modules trained in full beside the adapters

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.enabled and not self.target_modules:
            raise ValueError("lora.target_modules is empty: name the Linear layers that get adapters")


@dataclass
class RunConfig:
    """A training run: model, data, optimisation, DeepSpeed, EMA, evaluation, logging and checkpoints."""

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    tokenizer: Optional[PathStr] = None  # a saved tokenizer dir; None: the canonical one from bpe_dir
    bpe_dir: Optional[PathStr] = None  # GPT-2 BPE files (encoder.json, vocab.bpe, dict.txt); None: packaged
    max_nonfinite_steps: int = 20  # skipped NaN/inf losses tolerated before the run fails
    seed: int = 1  # seed of the model's initialisation and dropout (the data order: data.shuffle_seed)
    output_dir: PathStr = "runs/default"  # where the run writes checkpoints, metrics.jsonl, config.yaml and best/
    demo_data_dir: Optional[PathStr] = None  # build the demo shards (biomedgpt.data.demo) here when absent

    moved_settings = {"sample_patch_num": "data.sample_patch_num"}  # old key -> its place (a one-line error)

    def model_config(self) -> ModelConfig:
        """The model this run trains: ``model``'s architecture with the data's image normalisation."""
        return dataclasses.replace(self.model.build(), image_mean=list(self.data.image_mean),
                                   image_std=list(self.data.image_std))

    def __post_init__(self) -> None:
        selection_data(self.data, self.eval.select_on_test, self.eval.export_best)  # refuses to select on test
        if self.lora.enabled and self.ema.enabled:
            raise ValueError("lora.enabled with ema.enabled is not supported: turn one of them off")


def saved_run_config(saved: dict) -> RunConfig:
    """A run config this program wrote (a sweep manifest's run, a run's ``config.yaml``), also by earlier
    versions: the model section of before its fields were typed (``saved_model_settings``) and the top-level
    ``sample_patch_num`` of before it moved to ``data``."""
    saved = dict(saved)
    if isinstance(saved.get("model"), dict):
        saved["model"] = saved_model_settings(saved["model"])
    if "sample_patch_num" in saved and isinstance(saved.get("data", {}), dict):
        saved["data"] = {**saved.get("data", {}), "sample_patch_num": saved.pop("sample_patch_num")}
    return from_dict(RunConfig, saved)


DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
