"""EMA of the trained weights, kept in fp32 next to this rank's share of the parameters.

Under ZeRO-3 a rank holds only its partition of each parameter (``param.ds_tensor``), so the EMA is
kept per partition: no gather per step. At stages 0-2 every rank holds full parameters and the EMA is
a plain name -> tensor dict that any world size can load.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def _local(param: nn.Parameter) -> torch.Tensor:
    """This rank's values of a parameter: its ZeRO-3 partition, or the parameter itself."""
    return param.ds_tensor if hasattr(param, "ds_tensor") else param.data


class EMA:
    def __init__(self, module: nn.Module, decay: float, start_step: int = 0):
        self.decay, self.start_step = decay, start_step
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        params = dict(module.named_parameters())
        self.shadow = {n: _local(params[n]).detach().float().clone() for n in self.names}
        self.partitioned = any(hasattr(p, "ds_tensor") for p in params.values())

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        decay = 0.0 if step < self.start_step else self.decay
        params = dict(module.named_parameters())
        for name in self.names:
            self.shadow[name].lerp_(_local(params[name]).float(), 1.0 - decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "partitioned": self.partitioned, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        if state["partitioned"] != self.partitioned:
            raise ValueError("EMA state was saved with a different parameter partitioning")
        missing = set(self.names) - set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state lacks {sorted(missing)[:5]}")
        for name in self.names:
            saved = state["shadow"][name]
            if saved.shape != self.shadow[name].shape:
                raise ValueError(f"EMA state of {name} has shape {tuple(saved.shape)}, "
                                 f"expected {tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(saved)

    @contextmanager
    def swapped_in(self, module: nn.Module) -> Iterator[None]:
        """Temporarily put the EMA weights into ``module`` (evaluation, export), then restore.

        Collective under ZeRO-3: a parameter ZeRO-3 keeps gathered between steps (the small ones, below
        ``stage3_param_persistence_threshold``) holds its full values in ``param.data`` beside its
        partition, and a forward uses those; they are re-gathered from the EMA partitions too."""
        params = dict(module.named_parameters())
        backup = {}
        with torch.no_grad():
            for name in self.names:
                local = _local(params[name])
                backup[name] = local.detach().clone()
                local.copy_(self.shadow[name].to(local.dtype))
            _refresh_gathered(params[name] for name in self.names)
        try:
            yield
        finally:
            with torch.no_grad():
                for name in self.names:
                    _local(params[name]).copy_(backup[name])
                # whatever is gathered now (kept from before, or gathered inside the block from the EMA
                # partitions) is rebuilt from the restored partitions
                _refresh_gathered(params[name] for name in self.names)


def _refresh_gathered(params) -> None:
    for param in params:
        if _gathered_now(param):
            _regather(param)


def _gathered_now(param: nn.Parameter) -> bool:
    """A ZeRO-3 parameter whose full values are in ``param.data`` right now (persistent ones, between steps)."""
    if not hasattr(param, "ds_tensor"):
        return False
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return param.ds_status == ZeroParamStatus.AVAILABLE and param.data.numel() == param.ds_numel


def _regather(param: nn.Parameter) -> None:
    """``param.data`` rebuilt from every rank's partition (``ds_tensor``)."""
    import torch.distributed as dist

    group = getattr(param, "ds_process_group", None)
    parts = [torch.empty_like(param.ds_tensor) for _ in range(dist.get_world_size(group=group))]
    dist.all_gather(parts, param.ds_tensor.detach().contiguous(), group=group)
    full = torch.cat([p.reshape(-1) for p in parts])[:param.ds_numel]
    param.data.copy_(full.view(param.ds_shape).to(param.data.dtype))
