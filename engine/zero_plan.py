"""Every decision that depends on the ZeRO stage, made once from the run config; the trainer, the model
set-up, checkpointing and evaluation ask this object instead of testing the stage themselves.

- stage 0: DeepSpeed's plain data-parallel path (its fp32 path records no gradient norm: ours is used);
  its optimizer state is not partitioned, so a checkpoint loads on any world size.
- stages 1-2: the optimizer state (and from 2 the gradients) are partitioned: a checkpoint saved by
  another world size or stage goes through DeepSpeed's universal format.
- stage 3: the parameters are partitioned too: optional construction under zero.Init, embedding tables
  registered as external parameters, whole-model gathers for export, and generation in lockstep
  across ranks through the root module (every module call is a collective).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

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
