"""Known library noise is dropped by exact message; every other warning, log line and print still shows."""
from __future__ import annotations

import io
import logging
import sys
import warnings

from biomedgpt.engine.library_noise import quiet_known_noise, without_shm_build_line


def test_known_noise_is_dropped_and_everything_else_kept(capsys):
    quiet_known_noise()
    logger = logging.getLogger("torch.utils.cpp_extension")
    seen = io.StringIO()
    handler = logging.StreamHandler(seen)
    logger.addHandler(handler)
    try:
        logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
        logger.warning("Error building extension 'x'")
    finally:
        logger.removeHandler(handler)
    assert seen.getvalue() == "Error building extension 'x'\n"

    with warnings.catch_warnings(record=True) as caught:
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
        warnings.warn("`torch.distributed.reduce_scatter_tensor` is deprecated. Please use ...", FutureWarning)
        warnings.warn("`torch.distributed.broadcast_object` is deprecated", FutureWarning)
    assert [str(w.message) for w in caught] == ["`torch.distributed.broadcast_object` is deprecated"]

    with without_shm_build_line():
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("rank 0 ready")
        sys.stdout.write("no newline")
    assert capsys.readouterr().out == "rank 0 ready\nno newline"
