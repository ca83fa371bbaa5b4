"""ZeRO-3 gathers each table around its own use, on real 2-rank DeepSpeed (gloo, CPU).

The model reads the token embedding (also the output projection), the position tables and the relative
tables through calls of their modules, so nothing is registered as an external parameter of the root
module (which kept every table gathered for the whole step). Measured: the parameters resident (gathered)
while a middle layer's ``fc1`` runs, over two training steps built the trainer's way (``build_model``
under zero.Init), with DeepSpeed's own keep-gathered choices off (prefetching, persistence of small
parameters, and keeping parameters that are used again soon: ``stage3_max_reuse_distance``). ``worker`` runs in the shared 2-rank job
(rank_jobs.py).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

MODEL = {"size": "tiny", "d_model": 64, "ffn_dim": 128, "encoder_layers": 3, "decoder_layers": 3, "heads": 2,
         "resnet_layers": [1, 1, 1], "vocab_size": 1000, "dropout": 0.0}
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def resident_during_steps(model_spec: dict, steps: int = 2) -> dict:
    """Per rank: resident parameter counts at each middle-layer ``fc1`` call, the tables resident then,
    the model's total and the ``fc1`` size (every count in elements, each shared parameter once)."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from biomedgpt.engine.distributed.process_group import init_distributed
    from biomedgpt.engine.distributed.parallelize import build_model
    from biomedgpt.models.config import ModelSpec
    from test_checkpoint_tools import _batch

    info = init_distributed("gloo")
    cfg = ModelSpec(**model_spec).build()
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                       "stage3_prefetch_bucket_size": 0, "stage3_max_reuse_distance": 0},
                 "zero_allow_untested_optimizer": True}
    torch.manual_seed(0)
    model = build_model(cfg, ds_config, zero_init=True, init_state=None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    params = dict(engine.module.named_parameters())  # each shared parameter once
    tables = {name for name, module in engine.module.named_modules() if isinstance(module, torch.nn.Embedding)}
    record: dict = {"resident": [], "tables": set()}

    def measure(*_):
        live = [n for n, p in params.items() if p.ds_status == ZeroParamStatus.AVAILABLE and p.numel() > 0]
        record["resident"].append(sum(params[n].ds_numel for n in live))
        record["tables"] |= {n.rsplit(".", 1)[0] for n in live} & tables

    fc1 = [engine.module.encoder.layers[1].fc1, engine.module.decoder.layers[1].fc1]
    for module in fc1:
        module.register_forward_pre_hook(measure)
    for step in range(steps):
        batch = _batch(step, cfg, info.rank, info.world_size, images=True)
        target = batch.pop("target")
        logits = engine(**batch)
        engine.backward(torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten()))
        engine.step()
    record.update(total=sum(p.ds_numel for p in params.values()), fc1=fc1[0].weight.ds_numel + fc1[0].bias.ds_numel)
    return record


def worker(out: Path) -> None:
    """One rank of the shared 2-rank job (rank_jobs.py)."""
    record = resident_during_steps(MODEL)
    if int(os.environ["RANK"]) == 0:
        torch.save(record, out / "resident.pt")


def test_zero3_gathers_tables_per_use_not_for_the_whole_step(rank_jobs):
    record = torch.load(rank_jobs("zero3_gather") / "resident.pt")
    print(f"\nresident during a middle layer's fc1: {max(record['resident'])} of {record['total']} parameters "
          f"(fc1: {record['fc1']})")
    assert len(record["resident"]) == 4  # encoder and decoder, two steps
    assert not record["tables"], f"tables gathered outside their use: {sorted(record['tables'])}"
    # the running layer's weights and what DeepSpeed has not released yet (a ResNet conv, from the backward)
    assert max(record["resident"]) < 0.05 * record["total"]

