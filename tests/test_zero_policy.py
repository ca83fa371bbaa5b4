"""The ZeRO policy lives in engine/distributed/ only: ``models/`` names no DeepSpeed concept, no other module
tests the ZeRO stage or DeepSpeed's parameter attributes (both by grep over the source), ``ZeroPlan`` makes
the decisions the trainer and evaluation used to make themselves, and importing the model or the
process-group module leaves the environment alone (``configure_environment`` sets it, explicitly)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from biomedgpt.engine.distributed.modality_passes import forward_by_modality
from biomedgpt.engine.distributed.zero import ZeroPlan, check_stage_settings, local_param_elements
from small_models import SMALL

PACKAGE = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")

#: DeepSpeed concepts that plain PyTorch model code has no business naming
DEEPSPEED_WORDS = re.compile(r"(?i:deepspeed)|\bZeRO\b|zero\.Init|zero_init|zero_stage|\bds_[a-z_]+|same_calls"
                             r"|GatheredParameters")
#: a test of the ZeRO stage (``stage == 3``, ``ds.zero_stage >= 1``, ``meta["zero_stage"] != ...``, ``stage in ...``;
#: a ``for stage in`` loop is no test) or of DeepSpeed's partitioned-parameter attributes (``ds_tensor``, ...)
STAGE_TEST = re.compile(
    r"(?<!for )\b(?:zero_)?stage\b[\"']?\]?\s*(?:==|!=|<=|>=|<|>|\bnot\s+in\b|\bin\b)"
    r"|(?:==|!=|<=|>=|<|>)\s*[\w.]*\b(?:zero_)?stage\b"
    r"|\bds_(?:tensor|id|status|numel|shape|process_group|active_sub_modules)\b")
#: modules that read a checkpoint's files, whose layout is that of the stage that wrote them (the file
#: format, not a decision of this run)
CHECKPOINT_FORMAT_READERS = {"engine/checkpoint/zero_reader.py"}
SOURCE_FOLDERS = ("core", "data", "engine", "launchers", "models", "tools")


def _python_files(*folders: str):
    for folder in folders:
        for path in sorted((PACKAGE / folder).rglob("*.py")):
            yield path.relative_to(PACKAGE).as_posix(), path.read_text(encoding="utf-8")


def _hits(pattern: re.Pattern, files) -> list[str]:
    return [f"{name}:{number}: {line.strip()}" for name, text in files
            for number, line in enumerate(text.splitlines(), 1) if pattern.search(line)]


def test_models_name_no_deepspeed_concept():
    assert _hits(DEEPSPEED_WORDS, _python_files("models")) == []


def test_only_engine_distributed_tests_the_zero_stage_or_partitioned_parameters():
    files = [(name, text) for name, text in _python_files(*SOURCE_FOLDERS)
             if not name.startswith("engine/distributed/") and name not in CHECKPOINT_FORMAT_READERS]
    assert _hits(STAGE_TEST, files) == []
    assert _hits(re.compile(r"\.same_calls_every_batch\s*=(?!=)"), files) == []  # the policy's rule, not a flag
    # the pattern finds what it is meant to find
    assert _hits(STAGE_TEST, [("x.py", "if ds.zero_stage == 3:\nelif 3 == cfg.zero_stage:\nif meta['zero_stage'] != 0:\n"
                                       "if plan.stage in (1, 2):\nhasattr(p, 'ds_tensor')\nfor stage in stages:\n")]) \
        == ["x.py:1: if ds.zero_stage == 3:", "x.py:2: elif 3 == cfg.zero_stage:",
            "x.py:3: if meta['zero_stage'] != 0:", "x.py:4: if plan.stage in (1, 2):", "x.py:5: hasattr(p, 'ds_tensor')"]


ENVIRONMENT_PROBE = r"""
import json, os, sys
import torch
before = dict(os.environ)
import biomedgpt.models.checkpoint, biomedgpt.models.config, biomedgpt.models.generation, biomedgpt.models.ofa
import biomedgpt.engine.distributed.process_group as process_group
changed = {k: os.environ.get(k) for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}
process_group.configure_environment()
print(json.dumps({"on_import": changed, "configured": {k: os.environ.get(k) for k in
                                                        ("DS_ACCELERATOR", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")},
                  "deepspeed_imported": "deepspeed" in sys.modules}))
"""


def test_importing_the_model_and_the_process_group_module_sets_no_environment_variable():
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")}
    out = subprocess.run([sys.executable, "-c", ENVIRONMENT_PROBE], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["on_import"] == {}
    assert not result["deepspeed_imported"]  # it must still be possible to choose DeepSpeed's accelerator
    if not torch.cuda.is_available():  # the explicit call sets what DeepSpeed and oneDNN read at start-up
        assert result["configured"] == {"DS_ACCELERATOR": "cpu", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64"}


def _tiny_config():
    from biomedgpt.models.config import model_config

    return model_config("tiny", **SMALL)


def test_the_plan_makes_the_stage_and_world_decisions():
    cfg = _tiny_config()  # far below the zero.Init default threshold
    assert not ZeroPlan(3, 2).builds_partitioned(cfg)
    assert ZeroPlan(3, 2, zero_init=True).builds_partitioned(cfg)
    assert not ZeroPlan(2, 2, zero_init=True).builds_partitioned(cfg)  # only partitioned parameters
    assert [ZeroPlan(0, w).same_calls_every_batch for w in (1, 2)] == [False, True]
    assert [ZeroPlan(s, w).joins_ranks for s, w in ((0, 1), (0, 2), (3, 1))] == [False, True, True]
    assert [ZeroPlan(s, 4).partitions_optimizer_state for s in range(4)] == [False, True, True, True]
    assert [ZeroPlan(s, 4).partitions_gradients for s in range(4)] == [False, False, True, True]
    cuda = torch.device("cuda")
    assert ZeroPlan(2, 1).compiles(cfg, cuda) and not ZeroPlan(3, 1).compiles(cfg, cuda)
    with pytest.raises(ValueError, match="offload_param needs zero_stage 3"):
        check_stage_settings(2, "none", "cpu")
    with pytest.raises(ValueError, match="offload_optimizer needs zero_stage >= 1"):
        check_stage_settings(0, "cpu", "none")


def test_evaluation_config_comes_from_ds_config():
    from biomedgpt.engine.distributed.ds_config import evaluation_ds_config

    assert evaluation_ds_config(3) == {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}


def test_the_built_model_makes_the_same_calls_on_every_rank_only_with_peers():
    """``ZeroPlan.build_model`` gives the model the train step's forward: one rank runs an all-image batch as
    one pass, several ranks add the (stand-in) text pass every batch; the logits are the plain model's."""
    g = torch.Generator().manual_seed(0)
    batch = dict(src_tokens=torch.randint(4, 300, (2, 7), generator=g),
                 prev_output_tokens=torch.randint(4, 300, (2, 5), generator=g),
                 patch_images=torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8),
                 patch_masks=torch.tensor([True, True]))
    passes, logits = {}, {}
    for world in (1, 2):
        torch.manual_seed(0)
        model = ZeroPlan(0, world).build_model(_tiny_config(), {}, None).eval()
        calls = []
        model.decoder.register_forward_hook(lambda *_: calls.append(1))
        with torch.no_grad():
            logits[world] = model(**batch)
            passes[world] = len(calls)
            plain = forward_by_modality(model, **batch, same_calls=False)  # one rank, all images: one pass
        torch.testing.assert_close(logits[world], plain, rtol=0, atol=1e-5)
        assert local_param_elements(model) == sum(p.numel() for p in model.parameters())
    assert passes == {1: 1, 2: 2}
