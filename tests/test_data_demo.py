"""The demo dataset builder: real packaged data -> shards + a data config the loaders accept."""
from __future__ import annotations

import pytest
import yaml

from biomedgpt.data.config import DataConfig
from biomedgpt.data.tasks import TASK_NAMES
from biomedgpt.core.config import from_dict

pytestmark = pytest.mark.timeout(180)


def test_demo_data_builds_and_loads(tmp_path, vocab_dir, monkeypatch):
    from biomedgpt.data.loader import build_eval_loader, build_train_loader
    from biomedgpt.models.tokenizer import Tokenizer
    from biomedgpt.data.demo import DemoConfig, build

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(key, "1" if "SIZE" in key else "0")
    counts = build(DemoConfig(output_dir=str(tmp_path / "demo"), max_reports=40))
    assert counts["iu_summarization/train"] + counts["iu_summarization/val"] == 40
    assert counts["dicom_vqa/train"] >= 40 and counts["image_caption/train"] >= 14
    data = yaml.safe_load((tmp_path / "demo" / "data_config.yaml").read_text())
    cfg = from_dict(DataConfig, {**data, "batch_size": 8, "eval_batch_size": 8, "num_workers": 0,
                                 "patch_image_size": 64, "cache_dir": str(tmp_path / "cache")})
    tok = Tokenizer.from_gpt2_files(vocab_dir)
    train = build_train_loader(cfg, tok)
    tasks = set()
    for step, batch in enumerate(train):
        tasks.update(TASK_NAMES[i] for i in batch["task_ids"].tolist())
        if step == 9:
            break
    assert tasks == {"vqa", "caption", "summarization", "text_infilling"}
    batch = next(iter(build_eval_loader(cfg, tok)))
    assert len(batch["references"]) == len(batch["ids"]) and all(batch["references"])
    vqa = [i for i, t in enumerate(batch["task_ids"].tolist()) if TASK_NAMES[t] == "vqa"]
    assert vqa and batch["patch_masks"][vqa].all()
