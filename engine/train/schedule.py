"""How long a run trains and how its learning rate moves: the optimizer steps of the run, the steps of one
epoch, and the LR multiplier per optimizer step (``lr_lambda``, handed to DeepSpeed as a ``LambdaLR``)."""
from __future__ import annotations

from typing import Callable

from biomedgpt.engine.run_config import OptimConfig


def steps_per_epoch(loader_batches: int, grad_accum: int) -> int:
    """Optimizer steps in one pass over a loader of ``loader_batches`` micro-batches (at least 1)."""
    return max(1, loader_batches // grad_accum)


def total_steps(optim: OptimConfig, train_loader) -> int:
    """The run's optimizer steps: ``optim.max_steps``, or ``optim.max_epochs`` passes over ``train_loader``,
    whichever ends first (the loader's length is read only for ``max_epochs``)."""
    limits = []
    if optim.max_steps is not None:
        limits.append(optim.max_steps)
    if optim.max_epochs is not None:
        limits.append(optim.max_epochs * steps_per_epoch(len(train_loader), optim.grad_accum))
    return min(limits)


def lr_lambda(optim: OptimConfig, total_steps: int) -> Callable[[int], float]:
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
