"""biomedgpt.tools.infer on real packaged images (a question about a clinical DICOM, a folder in batch mode) and
on text for the text tasks (summarization, nli, instruction); VQA with an answer set answers as evaluate does."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from biomedgpt.data.config import DataConfig
from biomedgpt.core.config import load
from biomedgpt.models.checkpoint import save_pretrained
from biomedgpt.models.config import model_config
from biomedgpt.models.generation import GenerationConfig
from biomedgpt.models.ofa import BiomedGPT
from biomedgpt.models.tokenizer import Tokenizer
from biomedgpt.tools import infer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, vocab_dir):
    torch.manual_seed(0)
    tokenizer = Tokenizer.from_gpt2_files(vocab_dir)
    cfg = model_config("tiny", d_model=64, ffn_dim=128, encoder_layers=1, decoder_layers=1, heads=2,
                       resnet_layers=[1, 1, 1], vocab_size=tokenizer.vocab_size)
    return save_pretrained(BiomedGPT(cfg).init_weights(), tmp_path_factory.mktemp("model") / "tiny", tokenizer)


@pytest.fixture(scope="module")
def chest_dicom():
    from pydicom.data import get_testdata_file

    return get_testdata_file("RG1_UNCR.dcm")  # a real CR chest radiograph


def test_answers_a_question_about_a_real_dicom(model_dir, chest_dicom, tmp_path, vocab_dir):
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(["x ray", "ct", "mri", "ultrasound"]))
    rows = infer.run(infer.InferConfig(model_dir=str(model_dir), image=chest_dicom, task="vqa",
                                       question="what modality is this image?", answers=str(answers),
                                       image_size=64, device="cpu", bpe_dir=str(vocab_dir)))
    assert len(rows) == 1 and rows[0]["prediction"] in {"x ray", "ct", "mri", "ultrasound"}
    assert rows[0]["question"] == "what modality is this image?" and rows[0]["score"] <= 0.0


def test_batch_mode_over_a_folder_with_an_unreadable_file(model_dir, chest_dicom, tmp_path, capsys):
    from skimage import data as skdata
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(chest_dicom, folder / "chest.dcm")
    Image.fromarray(skdata.retina()[::8, ::8]).save(folder / "retina.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "out" / "boxes.jsonl"
    with pytest.raises(SystemExit, match="1 of 3 images"):
        infer.main([f"model_dir={model_dir}", f"images_dir={folder}", "task=grounding", "text=the left lung",
                    "image_size=64", "device=cpu", f"output={out}"])
    rows = {json.loads(line)["image"].split("/")[-1]: json.loads(line) for line in out.read_text().splitlines()}
    assert set(rows) == {"broken.jpg", "chest.dcm", "retina.png"}
    assert "error" in rows["broken.jpg"]
    for name in ("chest.dcm", "retina.png"):
        box = rows[name]["prediction"]
        assert box is not None and len(box) == 4 and all(v >= 0 for v in box)


def test_bad_arguments_are_clear(model_dir):
    with pytest.raises(ValueError, match="exactly one of image= or images_dir="):
        infer.InferConfig(model_dir=str(model_dir), task="caption")
    with pytest.raises(ValueError, match="needs question="):
        infer.InferConfig(model_dir=str(model_dir), image="x.png", task="vqa")


def test_zero3_infer_across_two_ranks_matches_one_process(model_dir, chest_dicom, tmp_path, repo_root, vocab_dir):
    """``biomedgpt infer -n 2 zero_stage=3``: images dealt out to 2 ranks of a partitioned model, decoded per module
    in lockstep (gather_memory_fraction=0; trie answers of different lengths), rows in input order; the same rows as
    one process at stage 0. Rank 1's second batch holds only an unreadable file, so it keeps step on the blank image."""
    from skimage import data as skdata
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    retina = skdata.retina()
    for i, name in enumerate(("a.png", "b.png", "d.png", "e.png")):
        Image.fromarray(retina[i * 100:i * 100 + 400:4, i * 50:i * 50 + 400:4]).save(folder / name)
    shutil.copy(chest_dicom, folder / "c.dcm")
    (folder / "f.jpg").write_bytes(b"not an image")
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(["x ray", "ct", "no", "ultrasound of the left lower lobe", "mri scan"]))
    common = [f"model_dir={model_dir}", f"images_dir={folder}", "task=vqa", "question=what is this?",
              f"answers={answers}", "image_size=64", "batch_size=2", "device=cpu", f"bpe_dir={vocab_dir}",
              "generation.beam_size=2"]
    with pytest.raises(SystemExit, match="1 of 6 images"):
        infer.main([*common, f"output={tmp_path / 'alone.jsonl'}"])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    done = subprocess.run([sys.executable, "-m", "biomedgpt.tools.cli", "infer", "-n", "2", *common, "zero_stage=3",
                           "gather_memory_fraction=0", f"output={tmp_path / 'zero3.jsonl'}"], cwd=repo_root,
                          capture_output=True, text=True,
                          env={**env, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}, timeout=400)
    assert done.returncode != 0 and "1 of 6 images" in done.stderr, done.stdout[-3000:] + done.stderr[-5000:]
    assert "synced decoding on 2 ranks: 2 rounds" in done.stderr
    rows = {name: [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
            for name in ("alone", "zero3")}
    assert [r["image"].split("/")[-1] for r in rows["zero3"]] == ["a.png", "b.png", "c.dcm", "d.png", "e.png", "f.jpg"]
    for mine, reference in zip(rows["zero3"], rows["alone"], strict=True):
        if "score" in reference:  # batches are made up differently: scores agree to float rounding
            assert mine.pop("score") == pytest.approx(reference.pop("score"), rel=1e-5)
        else:  # the error names a BytesIO object by its address
            assert mine.pop("error").split(" <")[0] == reference.pop("error").split(" <")[0]
        assert mine == reference


def _cli_rows(capsys, argv: list[str]) -> list[dict]:
    infer.main(argv)
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_summarization_of_a_raw_text_with_colons(model_dir, vocab_dir, capsys):
    """MeQSum style text-only input: ``text=SUBJECT: a: b`` is taken as written (no YAML), no image needed."""
    rows = _cli_rows(capsys, [f"model_dir={model_dir}", "task=summarization", "text=SUBJECT: a: b",
                              "device=cpu", f"bpe_dir={vocab_dir}", "generation.beam_size=2", "generation.max_len=6"])
    assert len(rows) == 1 and rows[0]["task"] == "summarization" and "image" not in rows[0]
    assert rows[0]["text"] == "SUBJECT: a: b" and isinstance(rows[0]["prediction"], str)


def test_nli_answers_from_its_closed_set(model_dir, vocab_dir, capsys):
    rows = _cli_rows(capsys, [f"model_dir={model_dir}", "task=nli", "text=the patient has a fever: 39 C",
                              "hypothesis=the patient is febrile", "device=cpu", f"bpe_dir={vocab_dir}"])
    assert len(rows) == 1 and rows[0]["prediction"] in {"yes", "no", "maybe"}
    assert rows[0]["hypothesis"] == "the patient is febrile" and rows[0]["score"] <= 0.0


def test_instruction_with_and_without_an_image(model_dir, chest_dicom, vocab_dir):
    common = dict(model_dir=str(model_dir), task="instruction", text="list the findings", image_size=64,
                  device="cpu", bpe_dir=str(vocab_dir), generation=GenerationConfig(beam_size=2, max_len=5))
    text_only = infer.run(infer.InferConfig(**common))
    with_image = infer.run(infer.InferConfig(**common, image=chest_dicom))
    assert "image" not in text_only[0] and with_image[0]["image"] == chest_dicom
    assert text_only[0]["score"] != with_image[0]["score"]  # the image reaches the model


def test_text_tasks_refuse_images_and_need_their_texts(model_dir):
    with pytest.raises(ValueError, match="text-only"):
        infer.InferConfig(model_dir=str(model_dir), task="nli", image="x.png", text="a", hypothesis="b")
    with pytest.raises(ValueError, match="needs hypothesis="):
        infer.InferConfig(model_dir=str(model_dir), task="nli", text="a")
    with pytest.raises(ValueError, match="needs text="):
        infer.InferConfig(model_dir=str(model_dir), task="summarization")


def test_vqa_with_an_answer_set_equals_evaluate(model_dir, chest_dicom, tmp_path, vocab_dir, monkeypatch):
    """The same model, image, question and answer set: ``infer``'s answer is ``evaluate``'s (its decoding
    function on a one-row VQA evaluation shard written by prepare-data); without the set, rows say the
    decoding is unconstrained and how to constrain it."""
    from biomedgpt.data.config import StreamConfig
    from biomedgpt.data.loader import build_eval_loader
    from biomedgpt.engine.eval.decoding import load_model_and_tokenizer
    from biomedgpt.engine.eval.config import DownstreamConfig
    from biomedgpt.engine.eval.evaluator import evaluate_model
    from biomedgpt.data.convert import PrepareConfig, convert

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(key, "1" if "SIZE" in key else "0")
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(["x ray", "ct", "no", "ultrasound of the left lower lobe", "mri scan"]))
    question = "what: modality is this image?"
    shutil.copy(chest_dicom, tmp_path / "chest.dcm")
    (tmp_path / "vqa.jsonl").write_text(json.dumps({"id": "q0", "image": "chest.dcm", "question": question,
                                                    "answers": ["ct"]}) + "\n")
    convert(PrepareConfig(input=str(tmp_path / "vqa.jsonl"), format="jsonl", kind="vqa", image_root=str(tmp_path),
                          output=str(tmp_path / "shard"), progress=False))
    data = DataConfig(eval_streams=[StreamConfig(name="vqa", remote=str(tmp_path / "shard"), task="vqa")],
                      patch_image_size=64, eval_batch_size=1, cache_dir=str(tmp_path / "cache"))
    model, tokenizer = load_model_and_tokenizer(model_dir, vocab_dir, torch.device("cpu"))
    downstream = DownstreamConfig(tasks={"vqa": {"answers": str(answers)}})
    _, records = evaluate_model(model, tokenizer, build_eval_loader(data, tokenizer), downstream, torch.device("cpu"))

    common = [f"model_dir={model_dir}", f"image={tmp_path / 'chest.dcm'}", "task=vqa", f"question={question}",
              "image_size=64", "device=cpu", f"bpe_dir={vocab_dir}"]
    [row] = infer.run(load(infer.InferConfig, None, [*common, f"answers={answers}"]))
    assert [r["prediction"] for r in records] == [row["prediction"]]
    assert row["score"] == pytest.approx(records[0]["score"], rel=1e-5)
    assert row["decoding"] == "inside the answer set (5 answers)"
    [free] = infer.run(load(infer.InferConfig, None, [*common, "generation.max_len=3"]))
    assert free["decoding"].startswith("unconstrained") and "answers=trainval_ans2label.json" in free["decoding"]
    from biomedgpt.core.config import settings_help

    assert "answers=trainval_ans2label.json; without it unconstrained" in settings_help(infer.InferConfig)  # --help
