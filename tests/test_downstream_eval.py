"""biomedgpt.engine.eval (decoding, evaluator) and biomedgpt evaluate's settings without training: settings, answer sets, per-task decoding of collated batches, metrics."""
from __future__ import annotations

import json
import random

import pytest
import torch

from biomedgpt.data.collate import collate
from biomedgpt.data.config import DataConfig
from biomedgpt.data.records import make_record
from biomedgpt.data.tasks import TaskContext, process
from biomedgpt.core.config import ConfigError, load
from biomedgpt.data.answers import read_answers
from biomedgpt.engine.eval.config import DownstreamConfig
from biomedgpt.engine.eval.decoding import answer_sets, predict, sets_from_references
from biomedgpt.engine.eval.evaluator import compute_metrics, evaluate_model
from biomedgpt.models.config import model_config
from biomedgpt.models.ofa import BiomedGPT
from biomedgpt.models.tokenizer import Tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


def test_task_settings_merge_over_the_spec_defaults():
    from biomedgpt.tools.evaluate import EvaluateConfig

    cfg = load(DownstreamConfig, overrides=["tasks.summarization.generation.beam_size=2"])
    summary = cfg.task("summarization").generation
    assert (summary.beam_size, summary.len_penalty, summary.max_len, summary.no_repeat_ngram_size) == (2, 0.7, 128, 3)
    assert cfg.task("vqa").inference == "trie" and cfg.task("nli").inference == "candidates"
    with pytest.raises(ConfigError, match="beam_sise"):
        load(DownstreamConfig, overrides=["tasks.caption.generation.beam_sise=2"])
    with pytest.raises(ConfigError, match="no downstream evaluation"):
        load(DownstreamConfig, overrides=["tasks.text_infilling.inference=generate"])
    with pytest.raises(ConfigError, match=r"missing required setting\(s\) \[.model_dir.\] for EvaluateConfig"):
        load(EvaluateConfig)


def test_answer_files_in_every_format(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(["yes", "no", "ct"]))
    (tmp_path / "b.json").write_text(json.dumps({"ct": 1, "yes": 0}))
    (tmp_path / "d.txt").write_text("left\n\nright\nleft\n")
    assert read_answers(tmp_path / "a.json") == ["yes", "no", "ct"]
    assert read_answers(tmp_path / "b.json") == ["yes", "ct"]
    assert read_answers(tmp_path / "d.txt") == ["left", "right"]
    (tmp_path / "e.json").write_text("{}")
    with pytest.raises(ValueError, match="e.json"):
        read_answers(tmp_path / "e.json")
    # bad files: one user error (a line, no traceback) naming the file
    from biomedgpt.core.user_errors import is_user_error

    (tmp_path / "f.json").write_text('{"a": ')
    (tmp_path / "g.txt").write_bytes(b"left\xff\n")
    for name, problem in (("e.json", "expected a non-empty list"), ("f.json", "not JSON"), ("g.txt", "not UTF-8 text"),
                          ("missing.json", "No such file")):
        with pytest.raises(Exception, match=f"{name}.*{problem}") as error:
            read_answers(tmp_path / name)
        assert is_user_error(error.value), name


@pytest.fixture(scope="module")
def tokenizer(vocab_dir):
    return Tokenizer.from_gpt2_files(vocab_dir)


def _batch(tokenizer, rows: list[tuple[str, dict, bool]], prompt: str = "none") -> dict:
    """A collated evaluation batch built by the real task processors from shard-style rows."""
    from PIL import Image
    from skimage import data as skdata

    cfg = DataConfig(patch_image_size=32, train_transform="resize", vqa_prompt_type=prompt)
    png = _png(Image.fromarray(skdata.retina()[::16, ::16]))
    examples = []
    for i, (kind, meta, image) in enumerate(rows):
        record = make_record(f"{kind}{i}", kind, meta, png if image else b"")
        ctx = TaskContext(tokenizer=tokenizer, cfg=cfg, rng=random.Random(0), train=False, other_row=lambda r: record)
        examples.extend(process(kind, record, ctx))
    return collate(examples, 32, [1.0], with_references=True)


def _png(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_mixed_batch_is_decoded_per_task_and_scored(tokenizer):
    torch.manual_seed(0)
    model = BiomedGPT(model_config("tiny", d_model=64, ffn_dim=128, encoder_layers=1, decoder_layers=1, heads=2,
                                   resnet_layers=[1, 1, 1], vocab_size=tokenizer.vocab_size)).init_weights().eval()
    rows = [("vqa", {"question": "is this a fundus photo", "answers": {"yes": 1.0}}, True),  # closed: yes/no
            ("vqa", {"question": "is this the retina or the lung", "answers": {"retina": 1.0},
                     "answer_type": "closed"}, True),  # closed: the dataset says so
            ("nli", {"s1": "the heart is normal", "s2": "no cardiomegaly", "label": "entailment"}, False),
            ("summarization", {"source": "the lungs are clear. no effusion.", "summary": "normal chest"}, False),
            ("caption", {"captions": ["fundus photograph", "retina"]}, True),
            ("classification", {"label": 1, "label_name": "fundus"}, True),
            ("classification", {"label": 0, "label_name": "histology"}, True)]
    batch = _batch(tokenizer, rows, prompt="prev_output")
    cfg = load(DownstreamConfig, overrides=["tasks.caption.generation.max_len=4",
                                            "tasks.summarization.generation.max_len=4"])
    batches = [batch, batch]  # the second repeats every id: each sample must count once
    metrics, records = evaluate_model(model, tokenizer, batches, cfg, torch.device("cpu"))
    by_task = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    assert {r["prediction"] for r in by_task["vqa"]} <= {"yes", "retina"}
    assert {r["prediction"] for r in by_task["nli"]} <= {"yes", "no", "maybe"}
    assert {r["prediction"] for r in by_task["classification"]} <= {"fundus", "histology"}
    assert metrics["vqa/samples"] == 2 and metrics["classification/samples"] == 2
    assert {"caption/cider", "summarization/rougeL", "nli/accuracy", "vqa/closed_accuracy"} <= set(metrics)
    assert metrics["vqa/closed_count"] == 2 and metrics["vqa/open_count"] == 0
    assert [r.get("answer_type") for r in by_task["vqa"][:2]] == [None, "closed"]
    _, seen = predict(model, tokenizer, [batch], cfg, answer_sets(cfg), torch.device("cpu"))
    assert sets_from_references(seen) == {"vqa": ["retina", "yes"], "classification": ["fundus", "histology"]}


def test_metrics_count_each_sample_once():
    records = [{"id": "a", "task": "nli", "prediction": "yes", "references": ["yes"]},
               {"id": "a", "task": "nli", "prediction": "yes", "references": ["yes"]},
               {"id": "b", "task": "nli", "prediction": "no", "references": ["maybe"]}]
    assert compute_metrics(records) == {"nli/accuracy": 0.5, "nli/samples": 2.0}


def test_in_training_task_metrics_are_allowed_at_every_zero_stage():
    from biomedgpt.core.config import load
    from biomedgpt.engine.run_config import RunConfig

    recipe = "configs/finetune/vqa_rad.yaml"
    for stage in range(4):
        assert load(RunConfig, recipe, [f"deepspeed.zero_stage={stage}"]).eval.downstream is not None
