"""Every downstream task end to end on CPU: real packaged data -> biomedgpt.tools.prepare_data -> fine-tuning with the
task's recipe (tiny-shaped model, a few steps) -> python -m biomedgpt.tools.evaluate -> results JSON.

VQA and captioning use real clinical DICOMs (pydicom-data, answers from their headers), summarisation and
NLI real IU X-ray reports (torchxrayvision's data folder), classification the DICOMs' modalities.
"""
from __future__ import annotations

import functools
import io
import json
import random
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from biomedgpt.tools import evaluate as downstream
from biomedgpt.tools import train
from biomedgpt.data.convert import PrepareConfig, convert

TINY = ("{d_model: 64, ffn_dim: 128, encoder_layers: 1, decoder_layers: 1, heads: 2, resnet_layers: [1, 1, 1], "
        "dropout: 0.0}")
MODALITY_NAMES = {"CR": "x ray", "DX": "x ray", "CT": "ct", "MR": "mri", "US": "ultrasound", "NM": "nuclear medicine",
                  "PT": "pet", "OT": "other", "RTDOSE": "dose map", "XA": "angiography", "RG": "x ray"}


#: Uncompressed packaged DICOMs of several modalities (listing the package with get_testdata_files is slow:
#: it tries to download what is missing).
DICOM_FILES = ("CT_small.dcm", "693_UNCI.dcm", "MR_small.dcm", "MR2_UNCI.dcm", "US1_UNCR.dcm", "OBXXXX1A.dcm",
               "RG1_UNCI.dcm", "RG3_UNCI.dcm", "JPEG2000_UNC.dcm", "SC_rgb.dcm")


@functools.lru_cache(maxsize=1)
def _readable_dicoms() -> list[tuple[Path, str, str]]:
    """(file, modality, body part) of the packaged DICOMs, read from their headers."""
    import pydicom
    from pydicom.data import get_testdata_file

    out = []
    for name in DICOM_FILES:
        path = Path(get_testdata_file(name))
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        out.append((path, MODALITY_NAMES[str(ds.Modality)], str(getattr(ds, "BodyPartExamined", "") or "").lower()))
    return out


def _iu_reports(limit: int) -> list[tuple[str, str, str]]:
    """(id, findings, impression) of real IU X-ray reports."""
    import importlib.util

    spec = importlib.util.find_spec("torchxrayvision")
    archive = Path(spec.submodule_search_locations[0]) / "data" / "NLMCXR_reports.tgz"
    out = []
    with tarfile.open(archive) as tar:
        for member in tar:
            if not member.name.endswith(".xml"):
                continue
            root = ET.fromstring(tar.extractfile(member).read())
            parts = {t.get("Label"): (t.text or "").strip() for t in root.iter("AbstractText")}
            if parts.get("FINDINGS") and parts.get("IMPRESSION"):
                out.append((Path(member.name).stem, parts["FINDINGS"], parts["IMPRESSION"]))
            if len(out) == limit:
                break
    return out


def _rows(task: str) -> tuple[str, list[dict]]:
    """(record kind, JSONL rows) of one task's small real dataset."""
    if task in ("vqa", "caption", "classification"):
        dicoms = _readable_dicoms()
        assert len(dicoms) >= 6, "pydicom-data should give several readable DICOMs"
        names = sorted({m for _, m, _ in dicoms})
        rows = []
        for i, (path, modality, part) in enumerate(dicoms):
            if task == "vqa":
                rows.append({"id": f"q{i}a", "image": str(path), "question": "what modality is this image?",
                             "answer": modality})
                other = names[(names.index(modality) + 1) % len(names)]
                shown, reply = (modality, "yes") if i % 2 else (other, "no")
                rows.append({"id": f"q{i}b", "image": str(path), "question": f"is this a {shown} image?",
                             "answer": reply})
            elif task == "caption":
                where = f" of the {part}" if part else ""
                rows.append({"id": f"c{i}", "image": str(path), "captions": [f"{modality} image{where}"]})
            else:
                rows.append({"id": f"m{i}", "image": str(path), "label": names.index(modality),
                             "label_name": modality})
        return task, rows
    reports = _iu_reports(24)
    if task == "summarization":
        return task, [{"id": rid, "source": findings, "summary": impression} for rid, findings, impression in reports]
    rng = random.Random(0)
    rows = []
    for i, (rid, findings, impression) in enumerate(reports):
        if i % 2:  # a report's findings imply its own impression; another report's is neutral
            rows.append({"id": rid, "s1": findings, "s2": impression, "label": "entailment"})
        else:
            other = reports[(i + rng.randrange(1, len(reports))) % len(reports)][2]
            rows.append({"id": rid, "s1": findings, "s2": other, "label": "neutral"})
    return "nli", rows


def _shards(tmp: Path, task: str) -> Path:
    kind, rows = _rows(task)
    source = tmp / f"{task}.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp / "shards" / task
    summary = convert(PrepareConfig(input=str(source), format="jsonl", kind=kind, output=str(out), progress=False))
    assert summary.written == len(rows), summary.text()
    return out


#: Rank layout that the evaluation loader puts into the environment (streaming reads it from there).
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _finetune_and_evaluate(recipe: str, task: str, shards: Path, tmp_path: Path, repo_root: Path, vocab_dir: Path,
                           data_overrides: list[str], eval_overrides: list[str]) -> tuple[dict, list[dict]]:
    """A few fine-tuning steps of ``recipe`` on ``shards`` (tiny model), then python -m biomedgpt.tools.evaluate on the
    same shards: (results JSON, per-sample predictions)."""
    stream = f"[{{name: {task}, task: {task}, remote: {shards}}}]"
    run_dir = tmp_path / "run"
    # the train command's main in this process (one rank): the same code as ``python -m biomedgpt.tools.train``
    # without a second start of torch, DeepSpeed and streaming (~10 s of a core); the launched path has its
    # own tests (test_engine_distributed.py, test_packaging.py, the README commands)
    train.main(["--config", str(repo_root / "configs" / "finetune" / recipe), f"model={TINY}",
          f"data.streams={stream}", f"data.eval_streams={stream}", "data.batch_size=4", "data.eval_batch_size=8",
          "data.patch_image_size=64", "data.num_workers=0", f"data.cache_dir={tmp_path / 'cache'}",
          "optim.max_steps=4", "optim.max_epochs=null", "optim.grad_accum=1", "optim.lr=0.001",
          "deepspeed.precision=fp32", "checkpoint.init_from=null", "checkpoint.interval=0", "eval.interval=0",
          "eval.interval_epochs=0", "data.answer_set=null", "log.interval=1", "log.progress_bar=false", "log.wandb_mode=disabled", f"bpe_dir={vocab_dir}",
          f"output_dir={run_dir}", *data_overrides, *[f"eval.{o}" for o in eval_overrides]])
    assert (run_dir / "best" / "model.safetensors").is_file()
    # In-training evaluation scored the recipe's task metric by generation and picked the best model by it.
    metric = yaml.safe_load((run_dir / "config.yaml").read_text())["eval"]["metric"]
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(f"eval/{metric}" in row for row in logged), (metric, logged[-1])
    out = tmp_path / "eval"
    downstream.main([f"model_dir={run_dir / 'best'}", f"recipe={run_dir / 'config.yaml'}", f"output_dir={out}",
                     f"bpe_dir={vocab_dir}", *eval_overrides])
    results = json.loads((out / "results.json").read_text())
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return results, predictions


# recipe, task, data overrides, evaluation overrides, the metric keys the results must hold
CASES = {
    "vqa": ("vqa_rad.yaml", [], ["downstream.tasks.vqa.answers=null"],
            ["vqa/accuracy", "vqa/closed_accuracy", "vqa/open_accuracy"]),
    "caption": ("iu_xray_caption.yaml", [], ["downstream.tasks.caption.generation.max_len=8",
                                             "downstream.valid_tasks.caption.generation.max_len=8"],
                ["caption/bleu_4", "caption/meteor", "caption/rouge_l", "caption/cider", "caption/cider_d"]),
    "summarization": ("meqsum.yaml", ["data.max_src_tokens=128", "data.max_tgt_tokens=32"],
                      ["downstream.tasks.summarization.generation.max_len=8",
                       "downstream.valid_tasks.summarization.generation.max_len=8"],
                      ["summarization/rouge1", "summarization/rouge2", "summarization/rougeL"]),
    "nli": ("mednli.yaml", ["data.max_src_tokens=128"], [], ["nli/accuracy"]),
    "classification": ("medmnist_pneumonia.yaml", [], ["downstream.tasks.classification.answers=null"],
                       ["classification/accuracy"]),
}


@pytest.mark.parametrize("task", list(CASES))
def test_finetune_then_evaluate(task, tmp_path, repo_root, vocab_dir, monkeypatch, one_thread):
    recipe, data_overrides, eval_overrides, keys = CASES[task]
    for name in RANK_VARIABLES:  # restored after the test: the in-process evaluation sets them
        monkeypatch.delenv(name, raising=False)
    results, predictions = _finetune_and_evaluate(recipe, task, _shards(tmp_path, task), tmp_path, repo_root,
                                                  vocab_dir, data_overrides, eval_overrides)
    for key in keys:
        assert key in results["metrics"], (key, results["metrics"])
    assert results["samples"] == len({p["id"] for p in predictions}) == len(_rows(task)[1])
    if task in ("vqa", "nli", "classification"):  # closed answer sets: every prediction is one of them
        allowed = {a for p in predictions for a in p["references"]} if task != "nli" else {"yes", "no", "maybe"}
        assert {p["prediction"] for p in predictions} <= allowed
    print(json.dumps({task: results["metrics"]}))


SKIMAGE_DESCRIPTIONS = {  # what the scikit-image data docs say each packaged image shows
    "immunohistochemistry": "Immunohistochemical staining of colonic glands.",
    "microaneurysms": "Retinal microaneurysms seen in a fundus image.",
    "cell": "A cell imaged by phase contrast microscopy.",
}
TEXT_ONLY = [("What does CT stand for?", "CT stands for computed tomography."),
             ("What does MRI measure?", "MRI measures the magnetic resonance signal of hydrogen nuclei.")]


def _llava_med_json(tmp: Path) -> tuple[Path, dict[str, tuple[str, str, bool]]]:
    """A LLaVA-Med style conversation file over real images (packaged DICOMs as PNG, scikit-image samples) with
    turns from the DICOM headers, two text-only conversations and one malformed entry; returns it and the
    expected rows {id: (instruction, response, has image)}."""
    import numpy as np
    import pydicom
    import skimage.data
    from PIL import Image

    from biomedgpt.data.images import dicom_to_uint8

    images = tmp / "images"
    images.mkdir()
    entries, expected = [], {}

    def add(uid: str, image: str | None, turns: list[tuple[str, str]]) -> None:
        conversation = []
        for k, (question, answer) in enumerate(turns):
            shown = f"<image>\n{question}" if image and k == 0 else question
            conversation += [{"from": "human", "value": shown}, {"from": "gpt", "value": answer}]
            expected[f"{uid}-{k}"] = (question, answer, image is not None)
        entries.append({"id": uid, **({"image": image} if image else {}), "conversations": conversation})

    def save(name: str, pixels: np.ndarray) -> str:
        image = Image.fromarray(pixels)
        image.thumbnail((96, 96))
        image.save(images / name)
        return name

    for path, modality, part in _readable_dicoms()[:6]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        turns = [("What imaging modality was used?", f"This is a {modality} image.")]
        if part:
            turns.append(("Which part of the body was examined?", f"The {part} was examined."))
        elif str(ds.get("PatientSex", "")) in ("M", "F"):
            sex = "male" if ds.PatientSex == "M" else "female"
            turns.append(("Is the patient male or female?", f"The patient is {sex}."))
        add(path.stem, save(f"{path.stem}.png", dicom_to_uint8(str(path))), turns)
    for name, text in SKIMAGE_DESCRIPTIONS.items():
        add(name, save(f"{name}.png", getattr(skimage.data, name)()), [("Describe this image.", text)])
    for i, (question, answer) in enumerate(TEXT_ONLY):
        add(f"text{i}", None, [(question, answer)])
    entries.append({"id": "bad", "conversations": [{"from": "gpt", "value": "an answer without a question"}]})
    source = tmp / "llava_med.json"
    source.write_text(json.dumps(entries, indent=1))
    return source, expected


def test_instruction_tuning_end_to_end(tmp_path, repo_root, vocab_dir, monkeypatch, one_thread):
    """LLaVA-Med style JSON -> biomedgpt.tools.prepare_data -> a few fine-tuning steps of the instruction recipe -> free
    generation -> ROUGE in the results JSON."""
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    source, expected = _llava_med_json(tmp_path)
    shards, log = tmp_path / "shards" / "instruction", io.StringIO()
    summary = convert(PrepareConfig(input=str(source), format="llava_json", image_root=str(tmp_path / "images"),
                                    output=str(shards), progress=False, max_bad_fraction=0.1), log=log)
    assert summary.written == len(expected) and dict(summary.skipped) == {"malformed row": 1}, summary.text()
    assert f"{source}:entry {len(json.loads(source.read_text()))}, turn 1: malformed row" in log.getvalue()

    results, predictions = _finetune_and_evaluate(
        "instruction.yaml", "instruction", shards, tmp_path, repo_root, vocab_dir,
        ["data.max_src_tokens=48", "data.max_tgt_tokens=24", "optim.max_steps=30"],
        ["downstream.tasks.instruction.generation.max_len=8", "downstream.tasks.instruction.generation.beam_size=2"])
    for key in ("instruction/rouge1", "instruction/rouge2", "instruction/rougeL"):
        assert 0.0 <= results["metrics"][key] <= 1.0
    assert results["metrics"]["instruction/rouge1"] > 0.05  # it learnt some of the responses' words (untrained: 0)
    assert results["samples"] == len(predictions) == len(expected)
    assert results["downstream"]["instruction"]["inference"] == "generate"
    assert {p["id"]: p["references"] for p in predictions} == {uid: [resp] for uid, (_, resp, _) in expected.items()}
    print(json.dumps({"instruction": results["metrics"]}))
