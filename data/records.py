"""The one row schema of our MDS shards, and parsing of the original BiomedGPT/OFA field encodings.

Every shard row is ``{"id": str, "kind": str, "image": bytes, "meta": json}``: ``image`` holds the encoded
image (PNG/JPEG as found in the source; b"" for text rows) and ``meta`` the kind's fields below. One
schema for every task keeps converters, readers and mixing simple; tasks read fields by name.
"""
from __future__ import annotations

import re
from typing import Any, Literal

MDS_COLUMNS = {"id": "str", "kind": "str", "image": "bytes", "meta": "json"}
NUM_CODES = 8192

ImageUse = Literal["required", "optional", "none"]
#: kind -> (meta fields that must be present, whether the row has an image)
KINDS: dict[str, tuple[tuple[str, ...], ImageUse]] = {
    "caption": (("captions",), "required"),  # captions: list of references
    "vqa": (("question", "answers"), "required"),  # answers: {answer: confidence}; optional answer_type
    "grounding": (("caption", "box"), "required"),  # box: [x0, y0, x1, y1] in source pixels
    "text": (("text",), "none"),
    "image_codes": (("codes",), "required"),  # 256 VQGAN codes of the image's centre
    "detection": (("boxes", "labels"), "required"),
    "classification": (("label", "label_name"), "required"),
    "nli": (("s1", "s2", "label"), "none"),  # label: entailment | neutral | contradiction
    "summarization": (("source", "summary"), "none"),
    "instruction": (("instruction", "response"), "optional"),  # one instruction / response turn
}
#: VQA question types as SLAKE / VQA-RAD annotate them (``answer_type``: OPEN / CLOSED)
ANSWER_TYPES = ("open", "closed")
NLI_LABELS = ("entailment", "neutral", "contradiction")
MEDNLI_LABEL_INDEX = {0: "neutral", 1: "entailment", 2: "contradiction"}  # the MedNLI TSV's ints


class BadRecord(ValueError):
    """A row that cannot become a training example; the message says why (file/line added by callers).

    ``reason`` is the short category the conversion summary counts.
    """

    def __init__(self, message: str, reason: str = "malformed row") -> None:
        super().__init__(message)
        self.reason = reason


def make_record(uid: str, kind: str, meta: dict[str, Any], image: bytes = b"") -> dict[str, Any]:
    """Validated shard row; raises BadRecord naming the missing / malformed field."""
    if kind not in KINDS:
        raise BadRecord(f"unknown record kind {kind!r}; known: {sorted(KINDS)}")
    required, image_use = KINDS[kind]
    missing = [k for k in required if meta.get(k) in (None, "", [], {})]
    if missing:
        raise BadRecord(f"{kind} row {uid!r} lacks {missing}", "missing field")
    if image_use == "required" and not image:
        raise BadRecord(f"{kind} row {uid!r} has no image", "missing image")
    if not str(uid):
        raise BadRecord(f"{kind} row has an empty id")
    if kind == "nli" and meta["label"] not in NLI_LABELS:
        raise BadRecord(f"nli row {uid!r}: label {meta['label']!r} is not one of {NLI_LABELS}")
    if kind == "vqa" and meta.get("answer_type") not in (None, *ANSWER_TYPES):
        raise BadRecord(f"vqa row {uid!r}: answer_type {meta['answer_type']!r} is not one of {ANSWER_TYPES}")
    if kind == "image_codes":
        codes = meta["codes"]
        if len(codes) != 256 or not all(0 <= c < NUM_CODES for c in codes):
            raise BadRecord(f"row {uid!r}: expected 256 codes in [0, {NUM_CODES}), got {len(codes)}")
    if kind == "grounding":
        check_box(meta["box"], uid)
    if kind == "detection":
        if len(meta["boxes"]) != len(meta["labels"]):
            raise BadRecord(f"row {uid!r}: {len(meta['boxes'])} boxes but {len(meta['labels'])} labels")
        for box in meta["boxes"]:
            check_box(box, uid)
    return {"id": str(uid), "kind": kind, "image": bytes(image), "meta": meta}


def check_box(box: Any, uid: str) -> None:
    if len(box) != 4 or not (box[0] <= box[2] and box[1] <= box[3]) or min(box) < 0:
        raise BadRecord(f"row {uid!r}: box {box} is not x0,y0,x1,y1 with x0<=x1, y0<=y1, >= 0")


def parse_answers(text: str) -> dict[str, float]:
    """``conf|!+answer&&conf|!+answer`` (or a bare answer, confidence 1) -> {answer: confidence}."""
    answers: dict[str, float] = {}
    for item in str(text).split("&&"):
        item = item.strip()
        if not item:
            continue
        if "|!+" in item:
            conf, answer = item.split("|!+", 1)
            try:
                answers[answer] = float(conf)
            except ValueError:
                raise BadRecord(f"answer confidence {conf!r} in {item!r} is not a number") from None
        else:
            answers[item] = 1.0
    if not answers:
        raise BadRecord(f"no answer in {text!r}")
    return answers


def parse_answer_type(value: Any) -> str | None:
    """SLAKE / VQA-RAD ``answer_type`` (OPEN / CLOSED, any case) -> "open" / "closed"; None when absent."""
    if value is None or not str(value).strip():
        return None
    kind = str(value).strip().lower()
    if kind not in ANSWER_TYPES:
        raise BadRecord(f"answer_type {value!r} is not one of {ANSWER_TYPES}")
    return kind


def parse_floats(text: str, count: int, what: str) -> list[float]:
    parts = str(text).strip().split(",")
    if len(parts) != count:
        raise BadRecord(f"{what} {text!r}: expected {count} comma-separated numbers")
    try:
        return [float(p) for p in parts]
    except ValueError:
        raise BadRecord(f"{what} {text!r} has a non-number") from None


def parse_detections(text: str) -> tuple[list[list[float]], list[int], list[str]]:
    """``x0,y0,x1,y1,cat_id,cat_name&&…`` -> boxes, category ids, label names."""
    boxes, ids, labels = [], [], []
    for item in str(text).split("&&"):
        if not item.strip():
            continue
        parts = item.split(",", 5)
        if len(parts) != 6:
            raise BadRecord(f"detection {item!r} is not x0,y0,x1,y1,cat_id,cat_name")
        boxes.append(parse_floats(",".join(parts[:4]), 4, "box"))
        try:
            ids.append(int(parts[4]))
        except ValueError:
            raise BadRecord(f"detection {item!r}: category id {parts[4]!r} is not an integer") from None
        labels.append(parts[5].strip())
    return boxes, ids, labels


def parse_codes(text: str) -> list[int]:
    try:
        return [int(c) for c in str(text).split()]
    except ValueError:
        raise BadRecord(f"image codes {str(text)[:40]!r}… are not integers") from None


def split_objects(text: Any) -> list[str]:
    if isinstance(text, (list, tuple)):
        return [str(t) for t in text if str(t)]
    return [t for t in str(text or "").split("&&") if t]


def clean_caption(text: str, max_words: int | None = None) -> str:
    """OFA's pre_caption: lower-case, strip leading ``,.!?*#:;~``, ``-`` and ``/`` -> space, cut words."""
    text = text.lower().lstrip(",.!?*#:;~").replace("-", " ").replace("/", " ").replace("<person>", "person")
    return _squash(text, max_words)


def clean_question(text: str, max_words: int | None = None) -> str:
    """OFA's pre_question (as pre_caption, without the ``<person>`` rewrite)."""
    text = text.lower().lstrip(",.!?*#:;~").replace("-", " ").replace("/", " ")
    return _squash(text, max_words)


def _squash(text: str, max_words: int | None) -> str:
    text = re.sub(r"\s{2,}", " ", text).rstrip("\n").strip(" ")
    words = text.split(" ")
    if max_words is not None and len(words) > max_words:
        text = " ".join(words[:max_words])
    return text
