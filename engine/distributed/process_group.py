"""Process-group setup for GPUs (NCCL) and CPUs (DeepSpeed's CPU accelerator with gloo) from one code path.

Every entry point that may import ``deepspeed`` calls ``configure_environment()`` first: DeepSpeed picks its
accelerator at import time, so the CPU choice has to be in the environment before. Importing this module
changes nothing.
"""
from __future__ import annotations

import datetime
import os
import signal
import socket
from dataclasses import dataclass

import torch

from biomedgpt.engine.library_noise import quiet_known_noise, without_shm_build_line


def configure_environment() -> None:
    """The process settings a command needs before it imports ``deepspeed`` or builds a model (idempotent;
    a value already in the environment is kept): known third-party noise filtered (``deepspeed``'s import logs
    the first of it), and without CUDA DeepSpeed's CPU accelerator and a bounded oneDNN primitive cache."""
    quiet_known_noise()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # oneDNN keeps a primitive per convolution shape (1024 by default). Batches split by modality give the
        # ResNet a different number of images nearly every step; at the default the cached primitives pinned
        # ~30 MB of heap per step (the demo's ranks grew from 1.6 to 4 GiB in 150 steps). 64 keeps a fixed-shape
        # run's primitives and measured no slower. Read when oneDNN builds its first primitive: set it before.
        os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str = "auto", timeout_s: int = 600) -> DistInfo:
    """Join the job's process group (a single-process group when no launcher set RANK/WORLD_SIZE).

    ``timeout_s`` bounds every collective: a rank whose peer died fails with an error instead of
    waiting forever, so the launcher sees a non-zero exit and tears the job down. Calls
    ``configure_environment`` (for a caller that has not yet imported ``deepspeed``).
    """
    configure_environment()
    import deepspeed

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # One process: fill in whatever a launcher would have set (some may be there already).
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                           ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(_free_port())
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but the launcher did not set {missing}: "
                           "start ranks with launchers/local.sh, the SLURM scripts, torchrun or deepspeed")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        # NCCL honours the process-group timeout only with async error handling on.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    else:
        device = torch.device("cpu")
    if not torch.distributed.is_initialized():
        with without_shm_build_line():
            deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                       auto_mpi_discovery=False, verbose=False)
    return DistInfo(rank, local_rank, world, device, backend)


def collective_device() -> torch.device:
    """Where the default group's collectives take tensors: NCCL has no CPU backend (a CPU tensor fails
    with "No backend type associated with device type cpu"), gloo takes CPU tensors."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce across the job (a no-op on one rank); ``op`` is sum or max. The tensor may live
    on any device: it travels through the group's device and back."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        reduce_op = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}[op]
        moved = tensor.to(collective_device())
        torch.distributed.all_reduce(moved, op=reduce_op)
        if moved is not tensor:
            tensor.copy_(moved)
    return tensor


def gather_lists(part: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank (the list itself on one rank)."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return part
    parts: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, part)
    return [item for p in parts for item in p]


def barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


class StopRequest:
    """SIGTERM / SIGUSR1 (SLURM's pre-emption warning) ask for a checkpoint at the next step boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous = {}

    def install(self) -> "StopRequest":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signal is not None
