"""The ZeRO policy: every decision that depends on the ZeRO stage or on the parameters being partitioned,
made here once from the run config. The trainer, the model set-up, checkpointing, the EMA and evaluation ask
``ZeroPlan`` (or, for a parameter's own storage, the functions below it) instead of testing the stage or
DeepSpeed's parameter attributes themselves; ``models/`` knows nothing of it.

- stage 0: DeepSpeed's plain data-parallel path (its fp32 path records no gradient norm: ours is used);
  its optimizer state is not partitioned, so a checkpoint loads on any world size.
- stages 1-2: the optimizer state (and from 2 the gradients) are partitioned: a checkpoint saved by
  another world size or stage goes through DeepSpeed's universal format.
- stage 3: the parameters are partitioned too: optional construction under zero.Init (``builds_partitioned``,
  ``build_model``), a model directory loaded already partitioned for evaluation (``evaluation_engine``),
  whole-model gathers for export (``gathered``). Generation gathers the whole model once per evaluation
  pass when it fits the device (``decoding_model``: DeepSpeed's GatheredParameters, with ZeRO-3's
  per-module hooks lifted as TRL's ``unwrap_model_for_generation`` does), and the ranks decode independently
  as at stage 0; otherwise in lockstep across ranks (``lockstep_decoding``: every module call is a collective).
- several ranks, any stage: every batch makes the same module calls in the same order on every rank
  (``same_calls_every_batch``, ``modality_passes.split_by_modality``): ZeRO-3 gathers each module's
  parameters collectively, and DeepSpeed reduces gradients in buckets in the order they become ready.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Optional

if TYPE_CHECKING:  # torch is imported where it runs: the run config's checks (stage rules) stay torch-free
    import torch
    from torch import nn

    from biomedgpt.engine.run_config import DeepSpeedConfig
    from biomedgpt.models.config import ModelConfig
    from biomedgpt.models.ofa import BiomedGPT

ZERO_INIT_AUTO_PARAMS = 300e6  # build under zero.Init at ZeRO-3 from this size up


def stage_partitions_params(stage: int) -> bool:
    """ZeRO-3 partitions the parameters themselves (stages 1-2 only optimizer state and gradients)."""
    return stage == 3


def check_stage_settings(stage: int, offload_optimizer: str, offload_param: str) -> None:
    """The run config's ZeRO settings that only some stages have (``DeepSpeedConfig`` validation)."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {stage}")
    if offload_param != "none" and not stage_partitions_params(stage):
        raise ValueError("deepspeed.offload_param needs zero_stage 3")
    if offload_optimizer != "none" and stage == 0:
        raise ValueError("deepspeed.offload_optimizer needs zero_stage >= 1")


@dataclass(frozen=True)
class ZeroPlan:
    """The ZeRO policy of one run (or one evaluation): its stage, world size, precision and ``zero_init``
    setting (``deepspeed.zero_init``: None builds under zero.Init from ``ZERO_INIT_AUTO_PARAMS`` up)."""

    stage: int
    world: int
    precision: str = "fp32"
    zero_init: Optional[bool] = None

    @classmethod
    def from_config(cls, ds: "DeepSpeedConfig", world: int) -> "ZeroPlan":
        return cls(ds.zero_stage, world, ds.precision, ds.zero_init)

    @property
    def partitions_optimizer_state(self) -> bool:
        """Each rank keeps the optimizer state (and fp32 master weights) of its slice of the parameters only."""
        return self.stage >= 1

    @property
    def partitions_gradients(self) -> bool:
        """Gradients are reduce-scattered: each rank keeps those of its slice."""
        return self.stage >= 2

    @property
    def partitions_params(self) -> bool:
        """Each rank holds a slice of every parameter; module calls gather them collectively."""
        return stage_partitions_params(self.stage)

    @property
    def own_grad_norm(self) -> bool:
        """DeepSpeed reports no gradient norm on its plain fp32 path: the trainer computes it before the step."""
        return self.stage == 0 and self.precision == "fp32"

    @property
    def lockstep_decoding(self) -> bool:
        """Generation on the partitioned model must make the same module calls on every rank (``RankSync``)."""
        return self.partitions_params and self.world > 1

    @property
    def same_calls_every_batch(self) -> bool:
        """Every rank makes the same module calls in the same order for every batch, whatever its mix of
        text and images (``modality_passes``): ZeRO-3's gathers and DeepSpeed's bucketed gradient reduction
        are collectives. One rank needs no peer to agree with."""
        return self.world > 1

    @property
    def joins_ranks(self) -> bool:
        """Evaluation needs DeepSpeed's process group: several launched ranks, or a partitioned model."""
        return self.world > 1 or self.partitions_params

    def builds_partitioned(self, cfg: "ModelConfig") -> bool:
        """Build under ``zero.Init`` (every parameter partitioned as its module is built): ZeRO-3 only, as the
        ``zero_init`` setting says, or by default from ``ZERO_INIT_AUTO_PARAMS`` parameters up."""
        if not self.partitions_params:
            return False
        if self.zero_init is not None:
            return self.zero_init
        from biomedgpt.engine.distributed.parallelize import approx_parameters

        return approx_parameters(cfg) >= ZERO_INIT_AUTO_PARAMS

    def build_model(self, cfg: "ModelConfig", ds_config: dict, init_state: dict | None) -> "BiomedGPT":
        """The model with its initial weights, partitioned at construction where ``builds_partitioned``, its
        forward making the same module calls on every rank where ``same_calls_every_batch``."""
        from biomedgpt.engine.distributed.modality_passes import split_by_modality
        from biomedgpt.engine.distributed.parallelize import build_model

        model = build_model(cfg, ds_config, self.builds_partitioned(cfg), init_state)
        return split_by_modality(model, same_calls=self.same_calls_every_batch)

    def compiles(self, cfg: "ModelConfig", device: torch.device) -> bool:
        """Whether the layers are compiled (``parallelize.compile_enabled``: not under ZeRO-3 on ``auto``)."""
        from biomedgpt.engine.distributed.parallelize import compile_enabled

        return compile_enabled(cfg, device, partitions_params=self.partitions_params)

    def optimizer_state_elements(self, local_params: int) -> int:
        """Elements of fp32 optimizer state per moment on this rank, given its local parameter elements
        (under ZeRO-3 those are already its partition)."""
        if self.partitions_optimizer_state and not self.partitions_params:
            return local_params // self.world
        return local_params

    def needs_universal(self, saved_stage: int, saved_world: int) -> bool:
        """A checkpoint with partitioned optimizer state loads directly only into the same layout."""
        if saved_stage == 0:
            return False
        return saved_world != self.world or saved_stage != self.stage

    def gathered(self, module: nn.Module):
        """Context in which every parameter of ``module`` is whole (read-only) on every rank."""
        if not self.partitions_params:
            return nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)

    def evaluation_engine(self, model_dir, rank: int):
        """A model directory built already partitioned across the ranks (``parallelize.load_partitioned``: no
        rank holds the whole model), in DeepSpeed's forward-only engine (for ``decoding_model``), eval mode."""
        import deepspeed

        from biomedgpt.engine.distributed.ds_config import evaluation_ds_config
        from biomedgpt.engine.distributed.parallelize import load_partitioned

        ds_config = evaluation_ds_config(self.stage)
        engine, _, _, _ = deepspeed.initialize(model=load_partitioned(model_dir, ds_config, rank), config=ds_config)
        engine.module.eval()
        return engine

    def decoding_model(self, engine, device: torch.device, fraction: float, log: Callable[[str], None]):
        """Context for one evaluation pass of ``engine`` (None: a plain model); yields whether the ranks may
        decode independently on the whole model. Where the parameters are partitioned it gathers them once
        when they fit (``gathered_for_decoding``), else yields False: decode in lockstep."""
        if engine is None or not self.partitions_params:
            return nullcontext(False)
        return gathered_for_decoding(engine, device, self.world, fraction, log)


# ----------------------------------------------------------------------------------------------
# A parameter's storage under ZeRO-3 (DeepSpeed's ds_* attributes are read here only)
# ----------------------------------------------------------------------------------------------


def is_partitioned(param: nn.Parameter) -> bool:
    """DeepSpeed ZeRO-3 keeps only this rank's slice of ``param`` (``ds_tensor``)."""
    return hasattr(param, "ds_tensor")


def local_values(param: nn.Parameter) -> torch.Tensor:
    """This rank's values of a parameter: its ZeRO-3 partition, or the parameter itself."""
    return param.ds_tensor if is_partitioned(param) else param.data


def local_param_elements(module: nn.Module) -> int:
    """Elements of ``module``'s parameters this rank holds (its partitions under ZeRO-3)."""
    return sum(local_values(p).numel() for p in module.parameters())


def whole_param_bytes(module: nn.Module) -> int:
    """Bytes of every parameter of ``module`` at full size (a ZeRO-3 partition counts as the whole tensor)."""
    return sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in module.parameters())


def whole_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """A tensor's full shape (a ZeRO-3 partition's is that of the whole parameter)."""
    return tuple(getattr(tensor, "ds_shape", tensor.shape))


def refresh_gathered(params: Iterable[nn.Parameter]) -> None:
    """Collective under ZeRO-3: the full values that a parameter holds gathered right now (ZeRO-3 keeps the
    small ones, below ``stage3_param_persistence_threshold``, gathered between steps) rebuilt from every
    rank's partition, after the partitions were written (``EMA.swapped_in``). Nothing for whole parameters."""
    for param in params:
        if _gathered_now(param):
            _regather(param)


def _gathered_now(param: nn.Parameter) -> bool:
    """A ZeRO-3 parameter whose full values are in ``param.data`` right now."""
    if not is_partitioned(param):
        return False
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return param.ds_status == ZeroParamStatus.AVAILABLE and param.data.numel() == param.ds_numel


def _regather(param: nn.Parameter) -> None:
    """``param.data`` rebuilt from every rank's partition (``ds_tensor``)."""
    import torch
    import torch.distributed as dist

    group = getattr(param, "ds_process_group", None)
    parts = [torch.empty_like(param.ds_tensor) for _ in range(dist.get_world_size(group=group))]
    dist.all_gather(parts, param.ds_tensor.detach().contiguous(), group=group)
    full = torch.cat([p.reshape(-1) for p in parts])[:param.ds_numel]
    param.data.copy_(full.view(param.ds_shape).to(param.data.dtype))


# ----------------------------------------------------------------------------------------------
# The whole model for decoding
# ----------------------------------------------------------------------------------------------


def gather_fits(whole_bytes: int, free_bytes: int, sharers: int, fraction: float) -> bool:
    """Whether ``sharers`` ranks may each hold the whole model in memory of which ``free_bytes`` is free,
    keeping to ``fraction`` of it (the rest is the safety margin for activations and beams)."""
    return whole_bytes * sharers <= fraction * free_bytes


def _zero3_offload(engine):
    """The ZeRO-3 parameter coordinator that owns the per-module hooks: the optimizer's, or without an
    optimizer DeepSpeed's ``DeepSpeedZeRoOffload`` in its place."""
    return getattr(engine.optimizer, "parameter_offload", engine.optimizer)


@contextmanager
def _hooks_lifted(engine) -> Iterator[None]:
    """ZeRO-3's per-module fetch/release hooks removed (the parameters are already whole), re-registered after."""
    offload = _zero3_offload(engine)
    for param in offload.module.parameters():
        param.ds_active_sub_modules.clear()
    for hook in [*offload.forward_hooks, *offload.backward_hooks]:
        hook.remove()
    offload.forward_hooks, offload.backward_hooks = [], []
    try:
        yield
    finally:
        offload._register_deepspeed_module(offload.module)


@contextmanager
def gathered_for_decoding(engine, device, world: int, fraction: float, log: Callable[[str], None]) -> Iterator[bool]:
    """Context for one evaluation pass of a ZeRO-3 ``engine``; yields whether its module is whole.

    Gathers the full parameters once (collective: every rank decides the same) when they fit: on a GPU
    its free memory, on the CPU the host's available memory shared by every rank on this host, of which
    the model may take ``fraction``. Inside, the module runs with plain full tensors and no ZeRO hooks,
    so the ranks may decode independently; on exit the parameters are partitioned again. When they do not
    fit it yields False: decode in lockstep (``decoding.RankSync``) with per-module gathers."""
    import deepspeed
    import psutil
    import torch

    from biomedgpt.core.hosts import ranks_on_this_host
    from biomedgpt.engine.distributed import process_group as dist_utils

    module = engine.module
    whole = whole_param_bytes(module)
    if device.type == "cuda":
        free, sharers, where = torch.cuda.mem_get_info(device)[0], 1, f"free on {device}"
    else:
        free, sharers = psutil.virtual_memory().available, ranks_on_this_host(world)
        where = f"host memory available to {sharers} rank(s) on this host"
    fits = gather_fits(whole, free, sharers, fraction)
    anyone_short = dist_utils.all_reduce(torch.tensor([0.0 if fits else 1.0]), "max")[0] > 0
    sizes = (f"{whole / 2**30:.2f} GiB of parameters per rank, {free / 2**30:.1f} GiB {where}, "
             f"gather_memory_fraction {fraction:g}")
    if anyone_short:
        log(f"ZeRO-3 decoding per module in lockstep across ranks: the whole model does not fit on every rank "
            f"({sizes})")
        yield False
        return
    log(f"ZeRO-3 decoding on the whole model, gathered once for this pass, ranks independent ({sizes})")
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None), _hooks_lifted(engine):
        if any(p.numel() != p.ds_numel for p in module.parameters()):
            raise RuntimeError("ZeRO-3 parameters are still partitioned after GatheredParameters")
        yield True
