"""biomedgpt.tools.infer on real packaged images: a question about a clinical DICOM, a folder in batch mode."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from biomedgpt.models.checkpoint import save_pretrained
from biomedgpt.models.config import model_config
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
