"""Which model settings a resumed run may change (issue 27, acceptance 1), in-process on the real engine
(DeepSpeed ZeRO-0, one rank, CPU): ``models.config.RUNTIME_FIELDS`` (dropout, attention backend, ...) take
this run's value; any architecture field is refused by ``engine/checkpoint/resume_checks.py`` - the one
place that decides - with one line naming it, before a model is built or DeepSpeed reads a file.
"""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from biomedgpt.core.config import from_dict
from biomedgpt.engine.checkpoint.manager import ResumeError
from biomedgpt.engine.run_config import RunConfig
from biomedgpt.engine.train import builders
from biomedgpt.engine.train.trainer import Trainer
from test_train_features import MODEL, _Batches, _micro_batch

BATCHES = 2


def config(out: Path, model: dict | None = None, **optim) -> RunConfig:
    return from_dict(RunConfig, {
        "model": {**MODEL, "dropout": 0.1, "vocab_size": 2048, **(model or {})},
        "optim": {"lr": 2e-3, "max_steps": 2, "schedule": "constant", "warmup_steps": 0, **optim},
        "log": {"interval": 1, "wandb_mode": "disabled", "progress_bar": False, "peak_tflops": 1.0},
        "checkpoint": {"interval": 0, "at_end": True, "background": False}, "watchdog": {"timeout_s": 0},
        "output_dir": str(out)})


def build(cfg: RunConfig, engines: list) -> Trainer:
    """The default builders (the real DeepSpeed engine), with a list of batches as the loader; every engine
    built is recorded."""

    def engine(run: RunConfig, inputs):
        engines.append(inputs)
        return builders.build_engine(run, inputs)

    spec = replace(builders.TrainSpec(), tokenizer=lambda cfg: None, eval_loader=lambda *_: None, engine=engine,
                   train_loader=lambda *_: _Batches([_micro_batch(0, i) for i in range(BATCHES)]))
    return Trainer(cfg, builders.build_parts(cfg, spec))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread) -> Path:
    """Two steps with dropout 0.1, checkpointed at the end."""
    out = tmp_path_factory.mktemp("resume_fields") / "run"
    build(config(out), []).train()
    return out


def lrs(out: Path) -> dict[int, float]:
    return {m["step"]: m["lr"] for m in map(yaml.safe_load, (out / "metrics.jsonl").read_text().splitlines())
            if "lr" in m}


def test_a_runtime_field_changed_resumes_with_the_new_value(trained, tmp_path, capsys, one_thread):
    """``model.dropout=0.0`` (with a new lr) resumes: DeepSpeed loads the weights into a model built with
    dropout 0, the new lr applies from step 3, config.yaml records the new values."""
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    engines: list = []
    resumed = build(config(out, {"dropout": 0.0}, lr=5e-4, max_steps=4), engines)
    assert resumed.step == 2 and engines[0].model_cfg.dropout == 0.0
    layer_dropouts = [m.dropout for m in resumed.engine.module.modules() if hasattr(m, "activation_dropout")]
    assert layer_dropouts and set(layer_dropouts) == {0.0}  # the model runs with this run's dropout
    resumed.train()
    console = capsys.readouterr().out
    assert "resumed from step_00000002 at step 2" in console
    assert "changed optimizer settings, applied: optim.lr 0.002 -> 0.0005; optim.max_steps 2 -> 4" in console
    assert lrs(out) == {1: 2e-3, 2: 2e-3, 3: 5e-4, 4: 5e-4}
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["dropout"] == 0.0 and saved["optim"]["lr"] == 5e-4


@pytest.mark.parametrize("field,value,named", [
    ("encoder_layers", 2, "model.encoder_layers: checkpoint 1, this run 2"),
    ("d_model", 64, "model.d_model: checkpoint 32, this run 64"),
    ("position_scheme", "rope", "model.position_scheme: checkpoint 'ofa', this run 'rope'"),
])
def test_an_architecture_field_changed_is_refused_before_deepspeed_loads(trained, field, value, named):
    engines: list = []
    with pytest.raises(ResumeError) as refused:
        build(config(trained, {field: value}, max_steps=3), engines)
    assert engines == []  # no model was built, no checkpoint file went to DeepSpeed
    line = str(refused.value)
    assert len(line.splitlines()) == 1 and line.count("model.") == 1 and named in line, line
    assert "step_00000002" in line and "new output_dir" in line and "checkpoint.resume=never" in line, line
