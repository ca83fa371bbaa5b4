"""Every decision that depends on the ZeRO stage, made once from the run config; the trainer, the model
set-up, checkpointing and evaluation ask this object instead of testing the stage themselves.

- stage 0: DeepSpeed's plain data-parallel path (its fp32 path records no gradient norm: ours is used);
  its optimizer state is not partitioned, so a checkpoint loads on any world size.
- stages 1-2: the optimizer state (and from 2 the gradients) are partitioned: a checkpoint saved by
  another world size or stage goes through DeepSpeed's universal format.
- stage 3: the parameters are partitioned too: optional construction under zero.Init, embedding tables
  registered as external parameters, whole-model gathers for export. Generation gathers the whole model
  once per evaluation pass when it fits the device (``decoding_model``: DeepSpeed's GatheredParameters,
  with ZeRO-3's per-module hooks lifted as TRL's ``unwrap_model_for_generation`` does), and the ranks
  decode independently as at stage 0; otherwise in lockstep across ranks through the root module (every
  module call is a collective).
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator

from biomedgpt.engine.run_config import DeepSpeedConfig


@dataclass(frozen=True)
class ZeroPlan:
    stage: int
    world: int
    precision: str

    @classmethod
    def from_config(cls, ds: DeepSpeedConfig, world: int) -> "ZeroPlan":
        return cls(ds.zero_stage, world, ds.precision)

    @property
    def partitions_params(self) -> bool:
        """Each rank holds a slice of every parameter; module calls gather them collectively."""
        return self.stage == 3

    @property
    def own_grad_norm(self) -> bool:
        """DeepSpeed reports no gradient norm on its plain fp32 path: the trainer computes it before the step."""
        return self.stage == 0 and self.precision == "fp32"

    @property
    def lockstep_decoding(self) -> bool:
        """Generation must make the same module calls on every rank (``RankSync``)."""
        return self.partitions_params and self.world > 1

    def optimizer_state_elements(self, local_params: int) -> int:
        """Elements of fp32 optimizer state per moment on this rank, given its local parameter elements
        (under ZeRO-3 those are already its partition)."""
        if self.stage in (1, 2):
            return local_params // self.world
        return local_params

    def needs_universal(self, saved_stage: int, saved_world: int) -> bool:
        """A checkpoint with partitioned optimizer state loads directly only into the same layout."""
        if saved_stage == 0:
            return False
        return saved_world != self.world or saved_stage != self.stage

    def gathered(self, module):
        """Context in which every parameter of ``module`` is whole (read-only) on every rank."""
        if not self.partitions_params:
            return nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)


def whole_param_bytes(module) -> int:
    """Bytes of every parameter of ``module`` at full size (a ZeRO-3 partition counts as the whole tensor)."""
    return sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in module.parameters())


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
def decoding_model(engine, device, world: int, fraction: float, log: Callable[[str], None]) -> Iterator[bool]:
    """Context for one evaluation pass of a ZeRO-3 ``engine``; yields whether its module is whole.

    Gathers the full parameters once (collective: every rank decides the same) when they fit: on a GPU
    its free memory, on the CPU the host's available memory shared by every rank on this host, of which
    the model may take ``fraction``. Inside, the module runs with plain full tensors and no ZeRO hooks,
    so the ranks may decode independently; on exit the parameters are partitioned again. When they do not
    fit it yields False: decode in lockstep (``downstream.RankSync``) with per-module gathers."""
    import deepspeed
    import psutil
    import torch

    from biomedgpt.engine.distributed import process_group as dist_utils

    module = engine.module
    whole = whole_param_bytes(module)
    if device.type == "cuda":
        free, sharers, where = torch.cuda.mem_get_info(device)[0], 1, f"free on {device}"
    else:
        free, sharers = psutil.virtual_memory().available, dist_utils.ranks_on_this_host(world)
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
