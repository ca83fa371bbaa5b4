"""Live EMA evaluation under ZeRO-3 against stage 0, on real 2-rank DeepSpeed (gloo, CPU).

ZeRO-3 keeps small parameters gathered between steps (``stage3_param_persistence_threshold``): their
full values live in ``param.data`` beside the rank's partition ``ds_tensor``. ``EMA.swapped_in`` must put
the EMA into both, or an evaluation "with EMA" runs those parameters with the trained weights. ``worker``
runs in the shared 2-rank job (rank_jobs.py).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def worker(out: Path) -> None:
    """One rank of the shared 2-rank job (rank_jobs.py)."""
    import contextlib

    import deepspeed

    from biomedgpt.engine.distributed.process_group import init_distributed
    from biomedgpt.engine.train.ema import EMA
    from biomedgpt.models.config import ModelSpec
    from biomedgpt.models.ofa import BiomedGPT
    from biomedgpt.engine.checkpoint.verify import sample_batch
    from test_checkpoint_tools import MODEL, _engine, _train_step

    info = init_distributed("gloo")
    cfg = ModelSpec(**MODEL).build()
    batch = {k: v for k, v in sample_batch(cfg).items() if k in ("src_tokens", "prev_output_tokens")}
    result = {}
    for stage in (0, 3):
        torch.manual_seed(0)
        engine = _engine(BiomedGPT(cfg).init_weights(), stage, info.world_size)
        ema = EMA(engine.module, decay=0.5, buffers=True)  # BatchNorm buffers stay whole under ZeRO-3

        def full_weights() -> dict[str, torch.Tensor]:
            gather = (deepspeed.zero.GatheredParameters(list(engine.module.parameters())) if stage == 3
                      else contextlib.nullcontext())
            with gather:
                return {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}

        reference_ema = full_weights()  # the same average, kept on full (gathered) weights
        for step in range(3):
            _train_step(engine, step, cfg, info.rank, info.world_size, images=False)
            ema.update(engine.module, step + 1)
            for name, value in full_weights().items():
                reference_ema[name].lerp_(value, 0.5)
        trained = full_weights()
        engine.eval()
        with torch.no_grad():
            live = engine(**batch)
            with ema.swapped_in(engine.module):
                with_ema = engine(**batch)
            after = engine(**batch)
        reference = BiomedGPT(cfg).init_weights().eval()
        reference.load_state_dict({**reference.state_dict(), **reference_ema}, strict=False)
        with torch.no_grad():
            expected = reference(**batch)
        restored = all(torch.equal(trained[n], v) for n, v in full_weights().items())
        result[stage] = {"live": live, "ema": with_ema, "after": after, "expected": expected, "restored": restored}
    if info.rank == 0:
        torch.save(result, out / "ema.pt")


def test_zero3_live_ema_evaluation_matches_stage0(rank_jobs):
    result = torch.load(rank_jobs("ema_zero3") / "ema.pt")
    for stage in (0, 3):
        r = result[stage]
        assert (r["ema"] - r["live"]).abs().max() > 1e-3, stage  # the EMA really differs from the weights
        torch.testing.assert_close(r["ema"], r["expected"], rtol=0, atol=1e-5, msg=f"stage {stage}")
        torch.testing.assert_close(r["after"], r["live"], rtol=0, atol=0, msg=f"stage {stage}: not restored")
        assert r["restored"], f"stage {stage}: the trained weights were not restored"
    torch.testing.assert_close(result[3]["ema"], result[0]["ema"], rtol=0, atol=1e-4)

