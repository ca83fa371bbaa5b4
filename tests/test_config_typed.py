"""One typed config path: every model field is a checked setting (a plain typed dataclass; the size's row
fills the fields a config does not set), a bad one fails before any rank starts, a moved setting names its
new place, required settings are fields without defaults, loading a run config imports no torch, and one
map turns precision names into torch dtypes."""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time
import typing

import pytest

from biomedgpt.core.config import PACKAGE_ROOT, ConfigError, from_dict, load, to_dict
from biomedgpt.engine.run_config import RunConfig
from biomedgpt.models.config import (DATA_FIELDS, SIZE_FIELDS, ModelConfig, ModelSpec, model_config,
                                     spec_from_saved)


def _biomedgpt(args: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "biomedgpt.tools.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("setting, message", [
    ("model.attention_backend=sdpaa", "model.attention_backend: 'sdpaa' is not one of"),
    ("model.heads=4.0", "model.heads: expected an integer, got 4.0"),
    ("model.d_model=30", "d_model 30 is not divisible by heads 4"),
])
def test_a_bad_model_setting_fails_in_seconds_before_any_rank_starts(tmp_path, setting, message):
    start = time.perf_counter()
    result = _biomedgpt(["train", "-n", "2", setting], tmp_path)
    elapsed = time.perf_counter() - start
    lines = result.stderr.strip().splitlines()  # one line, exit 1: as every user error
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("biomedgpt train: error: "), lines
    assert message in lines[0], result.stderr
    assert elapsed < 3.0, f"{elapsed:.2f} s"
    assert not (tmp_path / "runs").exists()  # no rank ran: nothing was built or written
    assert "local.sh" not in result.stderr and "Traceback" not in result.stderr


def test_every_model_field_is_a_listed_typed_setting(tmp_path):
    result = _biomedgpt(["train", "--help"], tmp_path)
    listed = " ".join(result.stdout.split())
    for f in dataclasses.fields(ModelConfig):  # the image normalisation is the data's setting, the model keeps it
        assert f"{'data' if f.name in DATA_FIELDS else 'model'}.{f.name}" in listed, f.name
    cfg = load(RunConfig, "finetune/vqa_rad", ["model.size=base", "model.heads=16", "model.attention_backend=sdpa",
                                               "model={dropout: 0.0}"])  # a mapping merges into the section
    assert cfg.model.build() == model_config("base", heads=16, attention_backend="sdpa", dropout=0.0,
                                             encoder_drop_path_rate=0.1, decoder_drop_path_rate=0.1)


def test_help_gives_each_setting_its_type_default_and_description():
    from biomedgpt.core.config import field_paths, packaged_configs, settings_help

    text = settings_help(RunConfig)
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ")}
    for key in field_paths(RunConfig):
        assert key in lines, key
    assert "  optim.lr  (float, 5e-05)" in text
    assert "  data.streams[].remote  (PathStr, required)  a local or shared folder" in text
    assert "  deepspeed.precision  (Literal['fp32', 'fp16', 'bf16'], 'fp32')" in text
    undescribed = [key for key, line in lines.items() if ")  " not in line]  # ModelSpec: from ModelConfig's source
    assert not undescribed, f"settings without a description in --help: {undescribed}"
    assert "stratified" not in lines["data.predownload"] and "fetches ahead" in lines["data.predownload"]
    result = _biomedgpt(["train", "--help"], ".")
    assert "finetune/vqa_rad" in result.stdout.split("Packaged configs (--config NAME):")[1]
    assert set(packaged_configs()) >= {"demo", "finetune/meqsum", "pretrain_base"}


@dataclasses.dataclass
class _Described:
    # the block: both fields under it
    first: int = 1
    second: int = 2
    third: int = 3  # its own
    fourth: int = 4


def test_a_comment_block_describes_the_fields_under_it_up_to_one_with_its_own():
    from biomedgpt.core.config import settings_help

    lines = {line.split()[0]: line for line in settings_help(_Described).splitlines() if line.startswith("  ")}
    assert lines["first"].endswith("the block: both fields under it") and lines["second"].endswith("under it")
    assert lines["third"].endswith("its own") and lines["fourth"].endswith("(int, 4)"), lines["fourth"]


def test_saved_configs_of_either_form_give_the_same_model():
    old = {"size": "tiny", "overrides": {"d_model": 64, "heads": 2}}
    new = {"size": "tiny", "d_model": 64, "heads": 2}
    assert spec_from_saved(old).build() == spec_from_saved(new).build() == model_config("tiny", d_model=64, heads=2)
    with pytest.raises(ConfigError, match="model.heads: expected an integer"):
        spec_from_saved({"size": "tiny", "heads": "2"})


def test_model_settings_are_typed_and_the_size_fills_the_fields_not_set(tmp_path):
    hints = typing.get_type_hints(ModelSpec)
    assert not [name for name, tp in hints.items() if type(None) in typing.get_args(tp)]  # real types, no None
    assert ModelSpec() == ModelSpec.of("tiny") and ModelSpec.of("base").build() == model_config("base")
    cfg = load(RunConfig, overrides=["model.size=base", "model.encoder_layers=4"])
    assert cfg.model.build() == model_config("base", encoder_layers=4)
    (tmp_path / "run.yaml").write_text("model: {size: tiny, d_model: 64, heads: 2}\n")
    cfg = load(RunConfig, tmp_path / "run.yaml", ["model.size=base"])  # the file's own fields stay
    assert cfg.model.build() == model_config("base", d_model=64, heads=2)
    assert cfg.model.custom_fields() == {"d_model": 64, "heads": 2}
    assert from_dict(RunConfig, to_dict(cfg)) == cfg  # a saved config.yaml (every field written) loads back
    with pytest.raises(ConfigError, match=r"model.size: 'huge' is not one of \['tiny', 'medium', 'base'"):
        load(RunConfig, overrides=["model.size=huge"])
    with pytest.raises(ConfigError, match="model.d_model: expected an integer, got None"):
        load(RunConfig, overrides=["model.d_model=null"])  # no null stand-in for "the size's value"
    written_before = {**{name: None for name in SIZE_FIELDS}, "size": "base", "encoder_layers": 4}
    assert spec_from_saved(written_before) == ModelSpec.of("base", encoder_layers=4)  # runs saved with nulls


def test_a_moved_setting_names_its_new_place():
    with pytest.raises(ConfigError) as raised:
        load(RunConfig, overrides=["sample_patch_num=196"])
    assert str(raised.value) == ("sample_patch_num is now data.sample_patch_num: rename it in the config file or "
                                 "override")
    assert load(RunConfig, "pretrain_base").data.sample_patch_num == 196


def test_run_configs_saved_by_earlier_versions_still_read():
    """A sweep manifest / config.yaml written before the model fields were typed (null: the size's value) and
    before ``sample_patch_num`` moved into ``data`` reads as the run it was."""
    from biomedgpt.engine.run_config import saved_run_config

    run = load(RunConfig, "pretrain_base", ["model.encoder_layers=4"])
    old = to_dict(run)
    old["model"].update({name: None for name in SIZE_FIELDS if name != "encoder_layers"})  # not set: the size's
    old["sample_patch_num"] = old["data"].pop("sample_patch_num")
    assert saved_run_config(old) == run == saved_run_config(to_dict(run))


def test_training_batches_carry_data_sample_patch_num(tmp_path, canonical_tokenizer, monkeypatch):
    """The training loader puts ``data.sample_patch_num`` into every batch (the trainer passes the batch's value
    to the model), evaluation batches have none, and cutting a batch to its first rows keeps it."""
    from biomedgpt.data.collate import first_rows
    from biomedgpt.data.config import DataConfig, StreamConfig
    from biomedgpt.data.loader import build_eval_loader, build_train_loader
    from biomedgpt.tools.prepare_data import PrepareConfig, convert

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(key, "1" if "SIZE" in key else "0")
    (tmp_path / "text.tsv").write_text("".join(f"t{i}\tthe lungs are clear in study {i}\n" for i in range(8)))
    convert(PrepareConfig(input=str(tmp_path / "text.tsv"), format="text_tsv", output=str(tmp_path / "text"),
                          progress=False))
    stream = StreamConfig(name="text", task="text_infilling", remote=str(tmp_path / "text"))
    cfg = DataConfig(streams=[stream], eval_streams=[stream], batch_size=4, eval_batch_size=4, num_workers=0,
                     patch_image_size=16, cache_dir=str(tmp_path / "cache"), sample_patch_num=5)
    tok = canonical_tokenizer
    train = list(build_train_loader(cfg, tok))
    assert train and all(batch["sample_patch_num"] == 5 for batch in train)
    assert first_rows(train[0], 1)["sample_patch_num"] == 5
    assert all("sample_patch_num" not in batch for batch in build_eval_loader(cfg, tok))


def test_one_map_from_precision_names_to_torch_dtypes():
    import torch

    from biomedgpt.models.precision import torch_dtype

    assert [torch_dtype(name) for name in ("fp32", "bf16", "fp16")] == [torch.float32, torch.bfloat16, torch.float16]
    with pytest.raises(ValueError, match="unknown precision 'float8'; known: fp32, bf16, fp16"):
        torch_dtype("float8")
    name_to_dtype = re.compile(r"""["'](?:fp32|bf16|fp16|float32|bfloat16|float16)["']\s*:\s*torch\.|"""
                               r"""torch\.(?:bfloat16|float16|float32)\s+if\s+[\w.]+\s*==\s*["']""")
    maps = sorted(str(path.relative_to(PACKAGE_ROOT)) for folder in ("core", "models", "data", "engine", "tools",
                                                                      "launchers")
                  for path in (PACKAGE_ROOT / folder).rglob("*.py") if name_to_dtype.search(path.read_text()))
    assert maps == ["models/precision.py"], maps


def test_text_settings_take_the_override_as_written():
    """A str / PathStr setting (Optional or not) takes the text after ``=`` as is: ``text=SUBJECT: a: b`` is not
    YAML; ``null`` still clears an Optional one; every other type keeps YAML scalars."""
    from biomedgpt.tools.infer import InferConfig

    cfg = load(InferConfig, overrides=["model_dir=m: 1", "task=nli", "text=SUBJECT: a: b", "hypothesis=[not, a list]",
                                       "image=null", "answers=yes", "output=~", "batch_size=3",
                                       "generation.len_penalty=0.5"])
    assert (cfg.model_dir.endswith("m: 1"), cfg.text, cfg.hypothesis) == (True, "SUBJECT: a: b", "[not, a list]")
    assert (cfg.image, cfg.answers, cfg.output, cfg.batch_size) == (None, "yes", None, 3)
    assert cfg.generation.len_penalty == 0.5
    run = load(RunConfig, overrides=["checkpoint.init_from=null", "data.cache_dir=a: b", "eval.max_batches=2"])
    assert (run.checkpoint.init_from, run.data.cache_dir.endswith("a: b"), run.eval.max_batches) == (None, True, 2)
    with pytest.raises(ConfigError, match="batch_size: expected an integer"):
        load(InferConfig, overrides=["model_dir=m", "task=nli", "text=a", "hypothesis=b", "batch_size=a: b"])


def test_required_settings_are_fields_without_defaults():
    from biomedgpt.tools.consolidate import ConsolidateConfig

    with pytest.raises(ConfigError, match=r"missing required setting\(s\) \['checkpoint', 'output'\]"):
        from_dict(ConsolidateConfig, {})
    assert from_dict(ConsolidateConfig, {"checkpoint": "runs/x", "output": "model"}).output == "model"


def test_loading_a_run_config_imports_no_torch():
    code = ("import sys; from biomedgpt.core.config import load; from biomedgpt.engine.run_config import RunConfig; "
            "load(RunConfig, 'finetune/vqa_rad'); print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'deepspeed', 'streaming', 'numpy') or m in ('biomedgpt.models.ofa', 'biomedgpt.data.tasks')))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout
