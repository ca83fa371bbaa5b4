"""Build a small REAL biomedical demo dataset as MDS shards, from data that installs with packages.

    python -m biomedgpt.data.demo output_dir=demo_data

Sources (docs/tasks-and-data.md, "Real data that installs offline"; read from the installed packages, nothing downloaded):
- pydicom-data's clinical DICOMs -> ``dicom_vqa`` (modality / body-part questions with exact answers
  from the headers) and ``image_caption`` (a caption from the same headers), plus scikit-image's
  fundus, microaneurysm, immunohistochemistry and cell images with captions of what they show;
- torchxrayvision's Indiana University chest X-ray reports -> ``iu_summarization`` (findings ->
  impression) and ``iu_text`` (report text for text infilling).
Each dataset gets ``train`` and ``val``; the reports are split 95 / 5, the ~25 images are too few to
split, so their ``val`` repeats ``train`` (a smoke check of the evaluation path, not a held-out score).
A data config for these streams is written to ``OUTPUT_DIR/data_config.yaml``. The report data is
CC BY-NC-ND: keep the output out of the repository.
"""
from __future__ import annotations

import importlib.util
import re
import sys
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import yaml

from biomedgpt.data.images import dicom_to_uint8, encode_png
from biomedgpt.data.mds import ShardWriter
from biomedgpt.data.records import make_record

MODALITY_NAMES = {"CT": "ct", "MR": "mri", "CR": "x ray", "DX": "x ray", "US": "ultrasound",
                  "NM": "nuclear medicine", "PT": "pet", "RF": "fluoroscopy", "XA": "angiography",
                  "MG": "mammography"}
DEMO_MAX_SIDE = 512
SKIMAGE_CAPTIONS = {
    "retina": "a colour fundus photograph of the retina",
    "microaneurysms": "a fundus image with retinal microaneurysms",
    "immunohistochemistry": "immunohistochemistry staining of colon glands",
    "cell": "a phase contrast microscopy image of a cell",
}


@dataclass
class DemoConfig:
    """Write the demo shards under OUTPUT_DIR."""

    output_dir: str = "demo_data"
    overwrite: bool = True
    val_fraction: float = 0.05
    max_reports: int = 0  # 0: every report that has both findings and impression


def dicom_rows() -> tuple[list[dict], list[dict]]:
    """VQA and caption rows from the packaged DICOMs (those whose pixels decode and whose modality we name)."""
    import pydicom
    from pydicom.data import get_testdata_files

    vqa, captions = [], []
    for path in sorted(get_testdata_files("*.dcm")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            modality = MODALITY_NAMES.get(str(getattr(ds, "Modality", "")))
            if modality is None:
                continue
            image = encode_png(_thumbnail(dicom_to_uint8(path)))
        except Exception:  # pydicom's test files include deliberately odd encodings and broken files
            continue
        name = Path(path).stem
        body = str(getattr(ds, "BodyPartExamined", "") or "").strip().lower()
        questions = {"what modality is used to take this image?": modality,
                     f"is this a {modality} image?": "yes",
                     f"is this a {'ct' if modality != 'ct' else 'mri'} image?": "no"}
        if body:
            questions["which part of the body is shown?"] = body
        for k, (question, answer) in enumerate(questions.items()):
            vqa.append(make_record(f"{name}-q{k}", "vqa", {"question": question, "answers": {answer: 1.0}}, image))
        caption = f"{modality} image of the {body}" if body else f"{modality} image"
        captions.append(make_record(name, "caption", {"captions": [caption]}, image))
    return vqa, captions


def _thumbnail(pixels) -> "Image.Image":
    """At most DEMO_MAX_SIDE pixels a side: the model sees <= 480 px, and the demo stays small and fast."""
    from PIL import Image

    image = Image.fromarray(pixels)
    image.thumbnail((DEMO_MAX_SIDE, DEMO_MAX_SIDE), Image.BICUBIC)
    return image


def skimage_rows() -> list[dict]:
    from skimage import data as skdata

    return [make_record(f"skimage-{name}", "caption", {"captions": [caption]},
                        encode_png(_thumbnail(getattr(skdata, name)())))
            for name, caption in SKIMAGE_CAPTIONS.items()]


def iu_reports(limit: int = 0) -> list[tuple[str, str, str]]:
    """(id, findings, impression) of the IU X-ray reports; the corpus masks some words as XXXX."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("torchxrayvision is not installed (pip install --no-deps torchxrayvision)")
    archive = Path(spec.origin).parent / "data" / "NLMCXR_reports.tgz"
    out = []
    with tarfile.open(archive) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if not member.isfile() or not member.name.endswith(".xml"):
                continue
            root = ET.fromstring(tar.extractfile(member).read())
            parts = {node.get("Label"): (node.text or "").strip() for node in root.iter("AbstractText")}
            findings, impression = parts.get("FINDINGS", ""), parts.get("IMPRESSION", "")
            if findings and impression:
                out.append((f"iu-{Path(member.name).stem}", _tidy(findings), _tidy(impression)))
                if limit and len(out) >= limit:
                    break
    return out


def _tidy(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def write(rows: list[dict], out: Path, overwrite: bool) -> None:
    writer = ShardWriter(str(out), overwrite=overwrite, size_limit="16mb")
    try:
        for row in rows:
            writer.write(row)
        writer.commit()
    except BaseException:
        writer.abort()
        raise


def build(cfg: DemoConfig) -> dict[str, int]:
    """Write every dataset (train + val) and the data config; returns rows per dataset split."""
    root = Path(cfg.output_dir)
    vqa, captions = dicom_rows()
    captions += skimage_rows()
    reports = iu_reports(cfg.max_reports)
    n_val = max(1, int(len(reports) * cfg.val_fraction))
    summaries = [make_record(uid, "summarization", {"source": f, "summary": i}) for uid, f, i in reports]
    texts = [make_record(uid, "text", {"text": f"{f} {i}"}) for uid, f, i in reports]
    splits = {
        "dicom_vqa": (vqa, vqa),
        "image_caption": (captions, captions),
        "iu_summarization": (summaries[n_val:], summaries[:n_val]),
        "iu_text": (texts[n_val:], texts[:n_val]),
    }
    counts = {}
    for name, (train, val) in splits.items():
        for split, rows in (("train", train), ("val", val)):
            write(rows, root / name / split, cfg.overwrite)
            counts[f"{name}/{split}"] = len(rows)
    tasks = {"dicom_vqa": "vqa", "image_caption": "caption", "iu_summarization": "summarization",
             "iu_text": "text_infilling"}
    proportions = {"dicom_vqa": 0.3, "image_caption": 0.2, "iu_summarization": 0.3, "iu_text": 0.2}
    config = {
        "streams": [{"name": n, "task": t, "remote": str((root / n / "train").resolve()),
                     "proportion": proportions[n]} for n, t in tasks.items()],
        "eval_streams": [{"name": n, "task": t, "remote": str((root / n / "val").resolve())}
                         for n, t in tasks.items() if n != "iu_text"],
    }
    (root / "data_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return counts


def main(argv: list[str] | None = None) -> None:
    from biomedgpt.core.config import parse_cli

    cfg = parse_cli(DemoConfig, argv)
    for name, count in build(cfg).items():
        print(f"{name}: {count} rows", file=sys.stderr)
    print(f"data config: {Path(cfg.output_dir) / 'data_config.yaml'}", file=sys.stderr)


if __name__ == "__main__":
    main()
