"""A training rank with a hang injected (run through launchers/local.sh -m hang_worker): on rank
``HANG_RANK`` at step ``HANG_STEP`` the forward pass calls ``injected_hang``, which never returns; the time it
started is written to ``HANG_FILE``. Everything else is the real ``biomedgpt.tools.train``."""
from __future__ import annotations

import os
import time

from biomedgpt.engine.train import trainer
from biomedgpt.tools import train


def injected_hang() -> None:
    with open(os.environ["HANG_FILE"], "w") as f:
        f.write(str(time.time()))
    while True:
        time.sleep(0.1)


def install() -> None:
    original = trainer.Trainer._forward_loss
    hang_rank, hang_step = int(os.environ["HANG_RANK"]), int(os.environ["HANG_STEP"])

    def forward_loss(self, batch, train, **kwargs):
        if train and self.rank == hang_rank and self.step >= hang_step:
            injected_hang()
        return original(self, batch, train, **kwargs)

    trainer.Trainer._forward_loss = forward_loss


if __name__ == "__main__":
    install()
    train.main()
