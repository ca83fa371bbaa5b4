"""LoRA fine-tuning through peft (issue 26): adapters on the named Linear layers, everything else frozen, the
merge into plain weights, and 2 DeepSpeed ranks (gloo, CPU; ``worker`` runs in the shared 2-rank job,
rank_jobs.py) that train, checkpoint and resume at ZeRO-2 and ZeRO-3.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from biomedgpt.engine.train.lora import apply_lora, merged_state
from biomedgpt.engine.run_config import LoraConfig

SETTINGS = dict(enabled=True, r=4, alpha=8.0, target_modules=["q_proj", "v_proj", "fc1"],
                modules_to_save=["image_proj"])


def _batch(cfg, seed: int = 0) -> dict:
    from biomedgpt.engine.checkpoint.verify import sample_batch

    return sample_batch(cfg, seed=seed)


def _adapter_model():
    """The small test model with adapters whose B is not zero (peft starts it at zero: no change yet)."""
    from small_models import build

    model = build()
    apply_lora(model, LoraConfig(**SETTINGS))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name or ".modules_to_save." in name:
                param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def test_only_adapters_and_listed_modules_are_trainable():
    model = _adapter_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n or ".modules_to_save." in n for n in trainable)
    assert any("encoder.image_proj.modules_to_save" in n for n in trainable)
    assert any("self_attn.q_proj.lora_A" in n for n in trainable) and any("fc1.lora_B" in n for n in trainable)
    assert not any("k_proj.lora" in n or "fc2.lora" in n for n in model.state_dict())  # not listed: no adapter


def test_merged_model_gives_the_adapter_models_logits(tmp_path):
    from small_models import build

    model = _adapter_model()
    batch = _batch(model.cfg)
    with torch.no_grad():
        adapted = model(**batch)
    plain = build().eval()
    plain.load_state_dict(merged_state(model.state_dict(), LoraConfig(**SETTINGS)), strict=True)
    with torch.no_grad():
        merged = plain(**batch)
    assert (merged - adapted).abs().max() <= 1e-5
    # the run's best-model export writes the same merged weights as a plain model directory
    from biomedgpt.engine.train.lora import write_merged_lora
    from biomedgpt.models.checkpoint import load_into, read_model_weights

    write_merged_lora(model, tmp_path / "best", None, LoraConfig(**SETTINGS))
    exported = build().eval()
    load_into(exported, read_model_weights(tmp_path / "best"))
    with torch.no_grad():
        assert (exported(**batch) - adapted).abs().max() <= 1e-5
    untouched = build().eval()
    with torch.no_grad():
        assert (untouched(**batch) - adapted).abs().max() > 1e-3  # the adapters really change the output


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="lora.r"):
        LoraConfig(r=0)
    with pytest.raises(ValueError, match="target_modules"):
        LoraConfig(enabled=True, target_modules=[])
    from small_models import build

    with pytest.raises(ValueError, match="no_such_layer.*not found"):
        apply_lora(build(), LoraConfig(**{**SETTINGS, "target_modules": ["no_such_layer"], "modules_to_save": []}))


# -- on 2 DeepSpeed ranks ----------------------------------------------------------------------------------

STEPS, STOP_AFTER = 4, 2


def _trainer(out: Path, rank: int, stage: int, **checkpoint):
    from biomedgpt.core.config import from_dict
    from biomedgpt.engine.run_config import RunConfig
    from biomedgpt.engine.train.trainer import Trainer
    from test_train_features import MODEL, _Batches, _micro_batch

    cfg = from_dict(RunConfig, {
        "model": {**MODEL, "dropout": 0.1}, "optim": {"lr": 1e-2, "max_steps": STEPS, "warmup_steps": 1},
        "deepspeed": {"zero_stage": stage}, "log": {"wandb_mode": "disabled", "progress_bar": False, "interval": 1},
        "lora": {**SETTINGS, "modules_to_save": ["decoder.layer_norm"]},
        "checkpoint": {"interval": 0, "at_end": True, "background": False, **checkpoint}, "output_dir": str(out)})
    # STOP_AFTER batches per pass: the resumed run (which restarts the list) sees what the straight one sees
    return Trainer(cfg, train_loader=_Batches([_micro_batch(rank, i) for i in range(STOP_AFTER)]))


def _full_state(trainer) -> dict[str, torch.Tensor]:
    module = trainer.engine.module
    with trainer.plan.gathered(module):
        return {n: p.detach().float().clone() for n, p in module.named_parameters()}


def optimizer_state_bytes(optimizer) -> int:
    """This rank's optimizer state (AdamW's moments of its partition), through DeepSpeed's wrapper."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return sum(t.numel() * t.element_size() for state in inner.state.values() for t in state.values()
               if torch.is_tensor(t) and t.dim() > 0)


def worker(out: Path) -> None:
    """One rank of the shared 2-rank job (rank_jobs.py)."""
    from biomedgpt.engine.train.trainer import TrainingStopped

    rank = int(os.environ["RANK"])
    result = {}
    for stage in (2, 3):
        straight = _trainer(out / f"straight{stage}", rank, stage)
        before = _full_state(straight)
        straight.train()
        after = _full_state(straight)
        optimizer_state = optimizer_state_bytes(straight.engine.optimizer)
        first = _trainer(out / f"split{stage}", rank, stage, stop_after=STOP_AFTER)
        try:
            first.train()
        except TrainingStopped:
            pass
        resumed = _trainer(out / f"split{stage}", rank, stage)
        resumed.train()
        numel = {n: getattr(p, "ds_numel", p.numel()) for n, p in straight.engine.module.named_parameters()}
        result[stage] = {"trainable_numel": sum(numel[n] for n, p in straight.engine.module.named_parameters()
                                                if p.requires_grad),
                         "total_numel": sum(numel.values()),
                         "changed": sorted(n for n in before if not torch.equal(before[n], after[n])),
                         "trainable": sorted(n for n, p in straight.engine.module.named_parameters() if p.requires_grad),
                         "resumed_equal": all(torch.equal(v, after[n]) for n, v in _full_state(resumed).items()),
                         "optimizer_state_bytes": optimizer_state}
    if rank == 0:
        (out / "result.json").write_text(json.dumps(result))


def _losses(out: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["loss"] for m in lines if "loss" in m}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_ranks_train_checkpoint_resume_and_merge(rank_jobs, tmp_path):
    from biomedgpt.engine.checkpoint.consolidate import consolidate
    from biomedgpt.engine.checkpoint.verify import reference_state
    from biomedgpt.engine.checkpoint.zero_reader import open_checkpoint
    from biomedgpt.models.checkpoint import load_into, read_model_config, read_model_weights
    from biomedgpt.models.ofa import BiomedGPT

    job = rank_jobs("lora")
    result = json.loads((job / "result.json").read_text())
    for stage in ("2", "3"):
        r = result[stage]
        a, b = _losses(job / f"straight{stage}"), _losses(job / f"split{stage}")
        assert sorted(a) == sorted(b) == list(range(1, STEPS + 1)), stage
        for step in a:
            assert b[step] == pytest.approx(a[step], abs=1e-6), (stage, step)
        assert r["resumed_equal"], stage
        assert r["changed"] and set(r["changed"]) <= set(r["trainable"]), stage
        assert all(".lora_" in n or ".modules_to_save." in n for n in r["trainable"]), stage
        assert any(".lora_B." in n for n in r["changed"]), stage
        # AdamW's two fp32 moments for this rank's share of the trainable parameters, none for the frozen ones
        print(f"ZeRO-{stage}: {r['trainable_numel']:,} of {r['total_numel']:,} parameters trainable, optimizer "
              f"state {r['optimizer_state_bytes']:,} bytes on rank 0")
        assert 0 < r["optimizer_state_bytes"] <= 8 * r["trainable_numel"] + 1024, stage

        # The checkpoint holds the adapters; consolidate merges them into a plain model directory.
        ckpt = open_checkpoint(job / f"split{stage}")
        adapters = reference_state(ckpt)
        assert any(".lora_A." in k for k in adapters) and any(".modules_to_save." in k for k in adapters)
        merged_dir = consolidate(ckpt, tmp_path / f"merged{stage}", read_model_config_from(ckpt), progress=False,
                                 merge_lora=True).output
        merged = BiomedGPT(read_model_config(merged_dir)).eval()
        load_into(merged, read_model_weights(merged_dir))
        adapter_model = BiomedGPT(read_model_config(merged_dir))
        apply_lora(adapter_model, LoraConfig(**{**SETTINGS, "modules_to_save": ["decoder.layer_norm"]}))
        adapter_model.load_state_dict(adapters, strict=False)
        adapter_model.eval()
        batch = _batch(merged.cfg)
        with torch.no_grad():
            assert (merged(**batch) - adapter_model(**batch)).abs().max() <= 1e-5, stage


def read_model_config_from(ckpt):
    from biomedgpt.engine.checkpoint.zero_reader import checkpoint_model_config

    return checkpoint_model_config(ckpt)

