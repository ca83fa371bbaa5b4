"""Where this process's ranks run: how many share its host. Below every package because the data loader
(streaming's shared memory is per host) and the engine (host memory budgets) both need it; torch is imported
only when a process group is up to ask."""
from __future__ import annotations

import os
import socket


def ranks_on_this_host(world_size: int) -> int:
    """``LOCAL_WORLD_SIZE`` where the launcher set it (the DeepSpeed launcher does not), else the ranks whose
    host name is this one's (all-gathered: collective; 1 for a single process or without a process group)."""
    if int(os.environ.get("LOCAL_WORLD_SIZE", 0)):
        return int(os.environ["LOCAL_WORLD_SIZE"])
    import torch.distributed as dist

    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return 1
    hosts: list = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    return hosts.count(socket.gethostname())
