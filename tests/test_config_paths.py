"""Where a config's paths point: relative to the config file's folder; packaged recipes by name, relative to
the current directory; the command-line overrides relative to the current directory."""
from __future__ import annotations

import pytest
import yaml

from biomedgpt.core.config import ConfigError, load, packaged_configs
from biomedgpt.engine.run_config import RunConfig


def test_relative_paths_in_a_config_file_resolve_against_its_folder(tmp_path, monkeypatch):
    folder = tmp_path / "experiments"
    folder.mkdir()
    (folder / "run.yaml").write_text(yaml.safe_dump({
        "output_dir": "out/run1", "bpe_dir": "../vocab",
        "data": {"streams": [{"name": "a", "task": "caption", "remote": "shards/a"},
                             {"name": "b", "task": "caption", "remote": "s3://bucket/b", "local": "cache/b"}]},
        "checkpoint": {"init_from": "/abs/model"}}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load(RunConfig, folder / "run.yaml", ["log.wandb_run_name=out/not-a-path", "seed=3"])
    assert cfg.output_dir == str(folder / "out/run1")
    assert cfg.bpe_dir == str(folder / "../vocab")
    assert cfg.data.streams[0].remote == str(folder / "shards/a")
    assert cfg.data.streams[1].remote == "s3://bucket/b"  # URLs are left alone
    assert cfg.data.streams[1].local == str(folder / "cache/b")
    assert cfg.checkpoint.init_from == "/abs/model"
    assert cfg.log.wandb_run_name == "out/not-a-path"  # not a path setting


def test_packaged_recipes_by_name_resolve_against_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert {"demo", "pretrain_base", "finetune/vqa_rad"} <= set(packaged_configs())
    demo = load(RunConfig, "demo")
    assert demo.output_dir == str(tmp_path / "runs/demo")
    assert demo.data.streams[0].remote.startswith(str(tmp_path / "runs/demo-data"))
    vqa = load(RunConfig, "finetune/vqa_rad", ["output_dir=here"])
    assert vqa.output_dir == "here" and vqa.eval.metric == "vqa/accuracy"
    assert load(RunConfig, "configs/finetune/vqa_rad.yaml").eval.metric == "vqa/accuracy"


def test_an_unknown_recipe_name_lists_the_packaged_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"finetune/vqa_radd.*neither a file nor a packaged recipe.*pretrain_base"):
        load(RunConfig, "finetune/vqa_radd")
