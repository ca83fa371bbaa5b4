"""EMA of the trained weights, kept in fp32 next to this rank's share of the parameters.

Under ZeRO-3 a rank holds only its partition of each parameter (``zero.local_values``), so the EMA is
kept per partition: no gather per step. At stages 0-2 every rank holds full parameters and the EMA is
a plain name -> tensor dict that any world size can load.

With ``buffers`` (fairseq's EMA averages the whole state dict) the persistent buffers are kept too: floating
ones (BatchNorm running mean / var) averaged in fp32, integer ones (``num_batches_tracked``) copied. ZeRO
never partitions buffers, so they are whole on every rank at every stage (each rank's own statistics).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from biomedgpt.engine.distributed.zero import is_partitioned, local_values, refresh_gathered


def persistent_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's buffers that its state dict holds (BatchNorm statistics; not recomputed tables)."""
    return {f"{prefix}.{name}" if prefix else name: buf for prefix, sub in module.named_modules()
            for name, buf in sub.named_buffers(recurse=False) if name not in sub._non_persistent_buffers_set}


def _shadow_of(buffer: torch.Tensor) -> torch.Tensor:
    return buffer.detach().float().clone() if buffer.is_floating_point() else buffer.detach().clone()


class EMA:
    def __init__(self, module: nn.Module, decay: float, start_step: int = 0, buffers: bool = False):
        self.decay, self.start_step = decay, start_step
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        params = dict(module.named_parameters())
        self.shadow = {n: local_values(params[n]).detach().float().clone() for n in self.names}
        self.partitioned = any(is_partitioned(p) for p in params.values())
        self.buffers = {n: _shadow_of(b) for n, b in persistent_buffers(module).items()} if buffers else {}

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        decay = 0.0 if step < self.start_step else self.decay
        params = dict(module.named_parameters())
        for name in self.names:
            self.shadow[name].lerp_(local_values(params[name]).float(), 1.0 - decay)
        if self.buffers:
            live = persistent_buffers(module)
            for name, shadow in self.buffers.items():
                if shadow.is_floating_point():
                    shadow.lerp_(live[name].float(), 1.0 - decay)
                else:
                    shadow.copy_(live[name])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "partitioned": self.partitioned, "shadow": self.shadow,
                "buffers": self.buffers}

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
        saved_buffers = state.get("buffers") or {}
        for name, shadow in self.buffers.items():
            if name in saved_buffers:  # a checkpoint from before buffers were averaged: they start from the live ones
                shadow.copy_(saved_buffers[name])

    @contextmanager
    def swapped_in(self, module: nn.Module) -> Iterator[None]:
        """Temporarily put the EMA weights into ``module`` (evaluation, export), then restore.

        Collective under ZeRO-3: a parameter ZeRO-3 keeps gathered between steps (the small ones, below
        ``stage3_param_persistence_threshold``) holds its full values in ``param.data`` beside its
        partition, and a forward uses those; they are re-gathered from the EMA partitions too."""
        params = dict(module.named_parameters())
        buffers = persistent_buffers(module) if self.buffers else {}
        backup, buffer_backup = {}, {}
        with torch.no_grad():
            for name in self.names:
                local = local_values(params[name])
                backup[name] = local.detach().clone()
                local.copy_(self.shadow[name].to(local.dtype))
            for name, shadow in self.buffers.items():
                buffer_backup[name] = buffers[name].detach().clone()
                buffers[name].copy_(shadow.to(buffers[name].dtype))
            refresh_gathered(params[name] for name in self.names)
        try:
            yield
        finally:
            with torch.no_grad():
                for name in self.names:
                    local_values(params[name]).copy_(backup[name])
                for name, saved in buffer_backup.items():
                    buffers[name].copy_(saved)
                # whatever is gathered now (kept from before, or gathered inside the block from the EMA
                # partitions) is rebuilt from the restored partitions
                refresh_gathered(params[name] for name in self.names)

