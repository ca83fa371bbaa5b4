"""Records with named fields: Parquet (read a batch at a time), JSONL and CSV, their images as bytes or
paths. ``field_record`` turns a mapping of source columns into our record (``columns=`` renames; the
``kind=`` decides how each field is parsed); the DICOM reader builds its rows with it too."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator

from biomedgpt.data.convert.config import PrepareConfig
from biomedgpt.data.convert.rows import Row, field_image, image_base, nli_label, not_utf8, utf8_problem
from biomedgpt.data.records import (KINDS, BadRecord, make_record, parse_answer_type, parse_answers, parse_codes,
                                    parse_detections, parse_floats, split_objects)


def field_record(cfg: PrepareConfig, values: dict[str, Any], fallback_id: str, base: Path) -> dict:
    """Our row from a mapping of source columns; ``cfg.columns`` renames, the kind decides the parsing."""
    def get(name: str, default: Any = None) -> Any:
        return values.get(cfg.columns.get(name, name), default)

    kind = cfg.kind
    meta: dict[str, Any] = {}
    for name in KINDS[kind][0]:
        meta[name] = get(name)
    if kind == "caption":
        captions = meta["captions"] if meta["captions"] is not None else get("caption")
        meta["captions"] = [c for c in (captions.split("&&") if isinstance(captions, str) else list(captions or []))
                            if str(c).strip()]
    elif kind == "vqa":
        answers = meta["answers"] if meta["answers"] is not None else get("answer")
        if isinstance(answers, dict):
            meta["answers"] = {str(a): float(c) for a, c in answers.items()}
        elif isinstance(answers, (list, tuple)):
            meta["answers"] = {str(a): 1.0 for a in answers}
        elif answers is not None:
            meta["answers"] = parse_answers(str(answers))
        meta["objects"] = split_objects(get("objects"))
        answer_type = parse_answer_type(get("answer_type"))
        if answer_type is not None:
            meta["answer_type"] = answer_type
    elif kind == "grounding" and isinstance(meta["box"], str):
        meta["box"] = parse_floats(meta["box"], 4, "box")
    elif kind == "image_codes" and isinstance(meta["codes"], str):
        meta["codes"] = parse_codes(meta["codes"])
    elif kind == "detection" and isinstance(meta["boxes"], str):
        meta["boxes"], meta["category_ids"], meta["labels"] = parse_detections(meta["boxes"])
    elif kind == "nli" and meta["label"] is not None:
        meta["label"] = nli_label(meta["label"])
    elif kind == "classification" and meta["label"] is not None:
        meta["label"] = int(meta["label"])
    meta = {k: (list(v) if isinstance(v, tuple) else v) for k, v in meta.items()}
    image = field_image(get("image"), base) if KINDS[kind][1] != "none" else b""
    uid = get("id")
    return make_record(str(uid) if uid not in (None, "") else fallback_id, kind, _jsonable(meta), image)


def _jsonable(value: Any) -> Any:
    """numpy / pyarrow scalars and arrays -> plain JSON values."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
        value = value.tolist() if hasattr(value, "tolist") else value
        return [_jsonable(v) for v in value] if isinstance(value, list) else value
    return value


def jsonl_rows(path: Path, cfg: PrepareConfig) -> Iterator[Row]:
    base = image_base(cfg.image_root, path)
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            problem = utf8_problem(line)
            if problem is not None:
                yield f"{path}:{line_no}", not_utf8(problem)
                continue
            yield f"{path}:{line_no}", (lambda text=line, n=line_no: field_record(
                cfg, _json_object(text), f"{path.stem}-{n}", base))


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRecord(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadRecord("a JSONL line must be an object")
    return value


def csv_rows(path: Path, cfg: PrepareConfig) -> Iterator[Row]:
    base = image_base(cfg.image_root, path)
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            line_no = reader.line_num
            problem = next((p for v in row.values() if isinstance(v, str) for p in [utf8_problem(v)] if p), None)
            if problem is not None:
                yield f"{path}:{line_no}", not_utf8(problem)
                continue
            yield f"{path}:{line_no}", (lambda r=row, n=line_no: field_record(cfg, r, f"{path.stem}-{n}", base))


def parquet_rows(path: Path, cfg: PrepareConfig) -> Iterator[Row]:
    """Rows of a Parquet file, read a batch at a time; "line" is the row number (1-based)."""
    import pyarrow.parquet as pq

    base = image_base(cfg.image_root, path)
    row_no = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=cfg.parquet_batch_rows):
        for values in batch.to_pylist():
            row_no += 1
            yield f"{path}:row {row_no}", (lambda v=values, n=row_no: field_record(cfg, v, f"{path.stem}-{n}", base))
