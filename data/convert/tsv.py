"""The original BiomedGPT / OFA TSVs (no header, tab-separated, url-safe base64 images; the layouts are in
docs/tasks-and-data.md): one parser per layout (``TSV_PARSERS``, the ``format=`` names) from a line's
columns to our record."""
from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Callable, Iterator

from biomedgpt.data.convert.rows import Row, image_pixel_limit, nli_label, not_utf8, utf8_problem
from biomedgpt.data.images import storable_image
from biomedgpt.data.records import (BadRecord, make_record, parse_answers, parse_codes, parse_detections, parse_floats,
                                    split_objects)


def _b64_image(text: str) -> bytes:
    text = text.strip()
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise BadRecord(f"image column is not url-safe base64: {exc}", "corrupt image") from None
    return storable_image(data, max_pixels=image_pixel_limit.get())


def _columns(parts: list[str], count: int) -> list[str]:
    if len(parts) != count:
        raise BadRecord(f"expected {count} tab-separated columns, got {len(parts)}")
    return parts


def _vision_language(p: list[str], _: int) -> dict:
    uid, image, caption, question, refs, objects, dataset, kind = _columns(p, 8)
    common = {"objects": split_objects(objects), "dataset": dataset}
    if kind == "caption":
        return make_record(uid, "caption", {"captions": [caption], **common}, _b64_image(image))
    if kind == "qa":
        return make_record(uid, "vqa", {"question": question, "answers": parse_answers(refs), **common},
                           _b64_image(image))
    if kind == "visual_grounding":
        return make_record(uid, "grounding", {"caption": caption, "box": parse_floats(refs, 4, "region"),
                                              **common}, _b64_image(image))
    raise BadRecord(f"type {kind!r} is not caption, qa or visual_grounding")


def _text(p: list[str], _: int) -> dict:
    uid, text = _columns(p, 2)
    return make_record(uid, "text", {"text": text})


def _image_codes(p: list[str], _: int) -> dict:
    uid, image, codes = _columns(p, 3)
    return make_record(uid, "image_codes", {"codes": parse_codes(codes)}, _b64_image(image))


def _detection(p: list[str], _: int) -> dict:
    uid, image, dets = _columns(p, 3)
    boxes, ids, labels = parse_detections(dets)
    return make_record(uid, "detection", {"boxes": boxes, "labels": labels, "category_ids": ids}, _b64_image(image))


def _vqa(p: list[str], _: int) -> dict:
    qid, image_id, question, answers, objects, image = _columns(p, 6)
    meta = {"question": question, "answers": parse_answers(answers), "objects": split_objects(objects),
            "image_id": image_id}
    return make_record(qid, "vqa", meta, _b64_image(image))


def _caption(p: list[str], _: int) -> dict:
    uid, image_id, captions, _empty, image = _columns(p, 5)
    refs = [c.strip() for c in captions.split("&&") if c.strip()]
    return make_record(uid, "caption", {"captions": refs, "image_id": image_id}, _b64_image(image))


def _medmnist(p: list[str], line: int) -> dict:
    image, label, name = _columns(p, 3)
    try:
        label_index = int(label)
    except ValueError:
        raise BadRecord(f"label {label!r} is not an integer") from None
    return make_record(f"row{line}", "classification", {"label": label_index, "label_name": name},
                       _b64_image(image))


def _mednli(p: list[str], line: int) -> dict:
    # BiomedGPT's preprocessing writes a fourth column (genre:sentence1) that training does not read
    s1, s2, label = _columns(p, 4 if len(p) == 4 else 3)[:3]
    return make_record(f"row{line}", "nli", {"s1": s1, "s2": s2, "label": nli_label(label)})


def _meqsum(p: list[str], line: int) -> dict:
    source, summary = _columns(p, 2)
    return make_record(f"row{line}", "summarization", {"source": source, "summary": summary})


TSV_PARSERS: dict[str, Callable[[list[str], int], dict]] = {
    "vision_language_tsv": _vision_language, "text_tsv": _text, "image_tsv": _image_codes,
    "detection_tsv": _detection, "vqa_tsv": _vqa, "caption_tsv": _caption, "medmnist_tsv": _medmnist,
    "mednli_tsv": _mednli, "meqsum_tsv": _meqsum,
}


def tsv_rows(path: Path, parse: Callable[[list[str], int], dict]) -> Iterator[Row]:
    with open(path, encoding="utf-8", errors="surrogateescape", newline="\n") as f:
        for line_no, line in enumerate(f, start=1):
            problem = utf8_problem(line)
            if problem is not None:
                yield f"{path}:{line_no}", not_utf8(problem)
                continue
            parts = line.rstrip("\r\n").split("\t")
            yield f"{path}:{line_no}", (lambda p=parts, n=line_no: parse(p, n))
