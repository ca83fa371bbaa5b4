"""Convert datasets into MDS shards of our row schema (``biomedgpt.data.records``), locally or straight to s3://.

    python -m biomedgpt.tools.prepare_data input=vision_language.tsv format=vision_language_tsv output=s3://bucket/vl
    python -m biomedgpt.tools.prepare_data input=vqa.parquet format=parquet kind=vqa output=shards/vqa \
        'columns={answers: answer, image: image}'
    python -m biomedgpt.tools.prepare_data input=reports.jsonl format=jsonl kind=caption image_root=images/ output=...
    python -m biomedgpt.tools.prepare_data input=dicoms/ format=dicom kind=caption 'columns={captions: StudyDescription}'
    python -m biomedgpt.tools.prepare_data input=llava_med_instruct.json format=llava_json image_root=images/ output=...

Formats: the original BiomedGPT/OFA TSVs (no header, url-safe base64 images; see
docs/tasks-and-data.md), Parquet (read in batches), JSONL / CSV records with image paths,
DICOM folders, LLaVA(-Med) instruction conversations (JSON). Images are stored encoded as found
(JPEG/PNG are not re-encoded; DICOM is windowed and written as PNG once), or with ``max_image_side``
pre-resized to what training resamples from (JPEG q95 / PNG, boxes scaled along; counted in the
summary). A malformed row or corrupt
image is reported as ``file:line: reason: message`` and skipped; the run exits non-zero, publishing
nothing, when more than ``max_bad_fraction`` of the rows were bad. The output becomes visible only
when complete (``biomedgpt.data.mds``).
"""
from __future__ import annotations

import base64
import binascii
import csv
import functools
import glob
import json
import signal
import sys
import typing
from collections import Counter
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional

from biomedgpt.data.images import (MAX_IMAGE_PIXELS, check_image_pixels, dicom_to_uint8, encode_png, pre_resized,
                                   storable_image)
from biomedgpt.data.mds import OutputExistsError, ShardWriter, StoreError
from biomedgpt.core.config import PathStr
from biomedgpt.data.records import (KINDS, MEDNLI_LABEL_INDEX, BadRecord, make_record, parse_answer_type, parse_answers,
                          parse_codes, parse_detections, parse_floats, split_objects)

Format = Literal["vision_language_tsv", "text_tsv", "image_tsv", "detection_tsv", "vqa_tsv", "caption_tsv",
                 "medmnist_tsv", "mednli_tsv", "meqsum_tsv", "parquet", "jsonl", "csv", "dicom", "llava_json"]


@dataclass
class PrepareConfig:
    """Convert INPUT (file, directory or glob) in FORMAT into MDS shards at OUTPUT (path or s3://…)."""

    input: PathStr
    output: PathStr  # a folder, or s3://bucket/prefix
    # the input's format (listed above); None: from the input's suffix (.parquet, .jsonl, .csv, .json for
    # LLaVA, .dcm or a folder for DICOM); a .tsv names its original layout (vision_language_tsv, vqa_tsv, ...)
    format: Optional[Format] = None
    # what each row is, for parquet / jsonl / csv / dicom input: caption, classification, detection, grounding,
    # image_codes, instruction, nli, summarization, text or vqa (biomedgpt.data.records.KINDS); others imply it
    kind: str = ""
    columns: dict[str, str] = field(default_factory=dict)  # our field -> source column (or DICOM keyword)
    image_root: str = ""  # base of relative image paths in jsonl / csv
    compression: Optional[str] = None  # e.g. zstd; None keeps shards directly readable
    shard_size: str = "64mb"
    max_bad_fraction: float = 0.01
    overwrite: bool = False
    progress: bool = True
    parquet_batch_rows: int = 1024
    max_reported: int = 50  # bad rows printed one by one; the rest are only counted
    store_timeout: float = 3.0  # s3:// output: seconds per connection / request attempt
    store_attempts: int = 2  # s3:// output: attempts before the store counts as unreachable
    # Pre-resize stored images (aspect kept): longest side <= max_image_side unless that takes the shortest
    # below min_image_side; 0 = off (stored as found). The bounds a run's transform needs, so that it still
    # resamples from at least as many pixels: biomedgpt.data.images.training_image_sides(patch, train_transform),
    # e.g. 672 / 480 for ofa_augment at any patch size up to 480, 256 / 256 for resize at 256 px.
    max_image_side: int = 0
    min_image_side: int = 0
    # A small file can hold a huge image (a 13,000 x 13,000 PNG of 190 KB); training applies data.max_image_pixels.
    max_image_pixels: int = MAX_IMAGE_PIXELS  # images above width x height (read from the header) are bad rows

    def __post_init__(self) -> None:
        if self.max_image_pixels < 1:
            raise ValueError(f"max_image_pixels must be positive, got {self.max_image_pixels}")
        if self.format is None:
            self.format = format_of(self.input)


#: input suffix -> format, where the suffix alone says it
SUFFIX_FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".csv": "csv", ".json": "llava_json", ".dcm": "dicom",
                  ".dicom": "dicom"}


def format_of(path: str) -> str:
    """The format of an input given without ``format=``, from its suffix (a folder: DICOM files)."""
    suffix = Path(path.rstrip("/")).suffix.lower()
    if suffix in SUFFIX_FORMATS:
        return SUFFIX_FORMATS[suffix]
    tsv = [f for f in typing.get_args(Format) if f.endswith("_tsv")]
    if suffix == ".tsv":
        raise ValueError(f"{path}: a .tsv input needs format= naming its original layout: {', '.join(tsv)}")
    if "://" not in path and Path(path).is_dir():  # a folder: its files' one known suffix, else DICOM files
        found = {SUFFIX_FORMATS.get(p.suffix.lower()) for p in Path(path).rglob("*") if p.is_file()} - {None}
        return found.pop() if len(found) == 1 else "dicom"
    raise ValueError(f"{path}: give format= (one of {', '.join(typing.get_args(Format))}); the suffix "
                     f"{suffix or '(none)'} does not say it")


class ConversionError(ValueError):
    """The conversion cannot run (input missing or empty, output store unreachable): one line, exit status 1."""


class InputMissing(ConversionError):
    """No input file at the given path or pattern."""


@dataclass
class Summary:
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    images: int = 0  # written rows with an image
    resized: int = 0  # of which pre-resized (max_image_side)
    resize_note: str = ""

    @property
    def total(self) -> int:
        return self.written + sum(self.skipped.values())

    @property
    def bad_fraction(self) -> float:
        return sum(self.skipped.values()) / max(self.total, 1)

    def text(self) -> str:
        lines = [f"rows read: {self.total}, written: {self.written}, skipped: {sum(self.skipped.values())}"]
        lines += [f"  skipped ({reason}): {n}" for reason, n in self.skipped.most_common()]
        if self.resize_note:
            lines.append(f"images pre-resized ({self.resize_note}): {self.resized} of {self.images}")
        return "\n".join(lines)


Row = tuple[str, Callable[[], dict]]  # (file:line, builds the record or raises BadRecord)
#: the running conversion's max_image_pixels (the row builders are called inside convert())
_max_pixels: ContextVar[int] = ContextVar("max_image_pixels", default=MAX_IMAGE_PIXELS)


# ----- the original TSV formats ----------------------------------------------------------------------

def _b64_image(text: str) -> bytes:
    text = text.strip()
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise BadRecord(f"image column is not url-safe base64: {exc}", "corrupt image") from None
    return storable_image(data, max_pixels=_max_pixels.get())


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
    return make_record(f"row{line}", "nli", {"s1": s1, "s2": s2, "label": _nli_label(label)})


def _meqsum(p: list[str], line: int) -> dict:
    source, summary = _columns(p, 2)
    return make_record(f"row{line}", "summarization", {"source": source, "summary": summary})


def _nli_label(value: Any) -> str:
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        if int(text) not in MEDNLI_LABEL_INDEX:
            raise BadRecord(f"NLI label {text} is not 0 (neutral), 1 (entailment) or 2 (contradiction)")
        return MEDNLI_LABEL_INDEX[int(text)]
    return text.lower()


TSV_PARSERS: dict[str, Callable[[list[str], int], dict]] = {
    "vision_language_tsv": _vision_language, "text_tsv": _text, "image_tsv": _image_codes,
    "detection_tsv": _detection, "vqa_tsv": _vqa, "caption_tsv": _caption, "medmnist_tsv": _medmnist,
    "mednli_tsv": _mednli, "meqsum_tsv": _meqsum,
}


def _utf8_problem(text: str) -> Optional[str]:
    """Where a line read with ``errors="surrogateescape"`` held bytes that are not UTF-8, or None."""
    for column, char in enumerate(text, start=1):
        if "\udc80" <= char <= "\udcff":
            return f"byte 0x{ord(char) - 0xDC00:02x} at column {column}"
    return None


def _not_utf8(problem: str) -> Callable[[], dict]:
    def build() -> dict:
        raise BadRecord(problem, "not UTF-8")
    return build


def tsv_rows(path: Path, parse: Callable[[list[str], int], dict]) -> Iterator[Row]:
    with open(path, encoding="utf-8", errors="surrogateescape", newline="\n") as f:
        for line_no, line in enumerate(f, start=1):
            problem = _utf8_problem(line)
            if problem is not None:
                yield f"{path}:{line_no}", _not_utf8(problem)
                continue
            parts = line.rstrip("\r\n").split("\t")
            yield f"{path}:{line_no}", (lambda p=parts, n=line_no: parse(p, n))


# ----- records with named fields: Parquet, JSONL, CSV, DICOM -----------------------------------------

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
        meta["label"] = _nli_label(meta["label"])
    elif kind == "classification" and meta["label"] is not None:
        meta["label"] = int(meta["label"])
    meta = {k: (list(v) if isinstance(v, tuple) else v) for k, v in meta.items()}
    image = _field_image(get("image"), base) if KINDS[kind][1] != "none" else b""
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


def _field_image(value: Any, base: Path) -> bytes:
    """Image column: bytes, a {"bytes", "path"} struct (HF datasets), or a path (relative to image_root)."""
    if value is None or value == "":
        return b""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
        if not value:
            return b""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return storable_image(bytes(value), max_pixels=_max_pixels.get())
    path = Path(str(value))
    path = path if path.is_absolute() else base / path
    try:
        return storable_image(path.read_bytes(), str(path), _max_pixels.get())
    except FileNotFoundError:
        raise BadRecord(f"image file {path} not found", "missing image") from None


def jsonl_rows(path: Path, cfg: PrepareConfig) -> Iterator[Row]:
    base = Path(cfg.image_root) if cfg.image_root else path.parent
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            problem = _utf8_problem(line)
            if problem is not None:
                yield f"{path}:{line_no}", _not_utf8(problem)
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
    base = Path(cfg.image_root) if cfg.image_root else path.parent
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            line_no = reader.line_num
            problem = next((p for v in row.values() if isinstance(v, str) for p in [_utf8_problem(v)] if p), None)
            if problem is not None:
                yield f"{path}:{line_no}", _not_utf8(problem)
                continue
            yield f"{path}:{line_no}", (lambda r=row, n=line_no: field_record(cfg, r, f"{path.stem}-{n}", base))


def parquet_rows(path: Path, cfg: PrepareConfig) -> Iterator[Row]:
    """Rows of a Parquet file, read a batch at a time; "line" is the row number (1-based)."""
    import pyarrow.parquet as pq

    base = Path(cfg.image_root) if cfg.image_root else path.parent
    row_no = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=cfg.parquet_batch_rows):
        for values in batch.to_pylist():
            row_no += 1
            yield f"{path}:row {row_no}", (lambda v=values, n=row_no: field_record(cfg, v, f"{path.stem}-{n}", base))


def dicom_rows(path: Path, cfg: PrepareConfig) -> Iterator[Row]:
    """One DICOM file: header keywords (via ``columns``) give the fields, the pixels the image."""
    def build() -> dict:
        import pydicom

        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:
            raise BadRecord(f"unreadable DICOM: {exc}", "corrupt image") from None
        values = {cfg.columns.get(name, name): _dicom_value(ds, cfg.columns.get(name, name))
                  for name in KINDS[cfg.kind][0] + ("id", "objects")}
        data = path.read_bytes()
        check_image_pixels(data, cfg.max_image_pixels, str(path))
        values[cfg.columns.get("image", "image")] = encode_png(dicom_to_uint8(data, str(path)))
        if values[cfg.columns.get("id", "id")] is None:
            values[cfg.columns.get("id", "id")] = str(getattr(ds, "SOPInstanceUID", "") or path.stem)
        return field_record(cfg, values, path.stem, path.parent)

    yield str(path), build


def _dicom_value(ds, keyword: str) -> Any:
    value = getattr(ds, keyword, None)
    return None if value in (None, "") else str(value)


# ----- LLaVA(-Med) instruction conversations ----------------------------------------------------------

def llava_rows(path: Path, cfg: PrepareConfig) -> Iterator[Row]:
    """A JSON list of ``{"id", "image", "conversations": [{"from": "human" | "gpt", "value"}, …]}``.

    Each human turn with the gpt reply after it becomes one ``instruction`` row ``<id>-<pair index>``
    (the ``<image>`` marker dropped); an entry without ``image`` gives text-only rows. Rows are reported
    as ``file:entry N, turn K`` (1-based). A file that is not such a list stops the conversion.
    """
    base = Path(cfg.image_root) if cfg.image_root else path.parent
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{path}: not a JSON file: {exc}") from None
    if not isinstance(entries, list):
        raise ConversionError(f"{path}: expected a JSON list of conversations, got {type(entries).__name__}")
    for n, entry in enumerate(entries, start=1):
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list) or not turns:
            yield f"{path}:entry {n}", _bad("an entry must be an object with a non-empty conversations list")
            continue
        uid = str(entry.get("id") or f"{path.stem}-{n}")
        image = functools.lru_cache(maxsize=1)(lambda e=entry: _field_image(e.get("image"), base))
        for k in range((len(turns) + 1) // 2):
            pair = turns[2 * k: 2 * k + 2]
            yield f"{path}:entry {n}, turn {k + 1}", (lambda u=uid, k=k, p=pair, i=image: _llava_turn(u, k, p, i))


def _llava_turn(uid: str, k: int, pair: list, image: Callable[[], bytes]) -> dict:
    roles = [turn.get("from") if isinstance(turn, dict) else None for turn in pair]
    if roles != ["human", "gpt"]:
        raise BadRecord(f"conversation {uid!r}: turn {k + 1} has roles {roles}, expected ['human', 'gpt']")
    instruction = str(pair[0].get("value") or "").replace("<image>", "").strip()
    meta = {"instruction": instruction, "response": str(pair[1].get("value") or "").strip(), "conversation": uid,
            "turn": k}
    return make_record(f"{uid}-{k}", "instruction", meta, image())


def _bad(message: str) -> Callable[[], dict]:
    def build() -> dict:
        raise BadRecord(message)
    return build


def resized_record(record: dict, cfg: PrepareConfig, summary: Summary) -> dict:
    """The record with its image pre-resized (``max_image_side``) and its boxes (source pixels) scaled along."""
    data, sx, sy = pre_resized(record["image"], cfg.max_image_side, cfg.min_image_side, f"row {record['id']!r}")
    if data is record["image"]:
        return record
    summary.resized += 1
    meta = dict(record["meta"])
    scale = lambda box: [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy, *box[4:]]  # noqa: E731
    if "box" in meta:
        meta["box"] = scale(meta["box"])
    if "boxes" in meta:
        meta["boxes"] = [scale(box) for box in meta["boxes"]]
    return {**record, "image": data, "meta": meta}


def input_files(pattern: str, fmt: str) -> list[Path]:
    path = Path(pattern)
    if path.is_dir():
        suffix = {"dicom": "*.dcm", "parquet": "*.parquet", "jsonl": "*.jsonl", "csv": "*.csv",
                  "llava_json": "*.json"}.get(fmt, "*.tsv")
        files = sorted(path.rglob(suffix))
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
    if not files:
        raise InputMissing(f"no input files at {pattern!r} (format {fmt})")
    return files


def rows(cfg: PrepareConfig, files: Optional[list[Path]] = None) -> Iterator[Row]:
    for path in files if files is not None else input_files(cfg.input, cfg.format):
        if cfg.format in TSV_PARSERS:
            yield from tsv_rows(path, TSV_PARSERS[cfg.format])
        elif cfg.format == "parquet":
            yield from parquet_rows(path, cfg)
        elif cfg.format == "jsonl":
            yield from jsonl_rows(path, cfg)
        elif cfg.format == "csv":
            yield from csv_rows(path, cfg)
        elif cfg.format == "llava_json":
            yield from llava_rows(path, cfg)
        else:
            yield from dicom_rows(path, cfg)


def convert(cfg: PrepareConfig, log=None) -> Summary:
    """Write every good row; returns the summary. Raises SystemExit(1) when too many rows were bad."""
    log = log or sys.stderr
    if cfg.format not in TSV_PARSERS and cfg.format != "llava_json" and cfg.kind not in KINDS:
        raise ConversionError(f"format {cfg.format} needs kind= one of {sorted(KINDS)}")
    summary = Summary()
    if cfg.max_image_side:
        if cfg.max_image_side < 0 or cfg.min_image_side < 0 or cfg.min_image_side > cfg.max_image_side:
            raise ConversionError(f"max_image_side={cfg.max_image_side} / min_image_side={cfg.min_image_side}: "
                                  "need 0 <= min_image_side <= max_image_side")
        summary.resize_note = f"longest side <= {cfg.max_image_side}" + (
            f" unless the shortest would drop below {cfg.min_image_side}" if cfg.min_image_side else "")
    files = input_files(cfg.input, cfg.format)  # before the output is touched
    limit = _max_pixels.set(cfg.max_image_pixels)
    try:
        return _convert(cfg, files, summary, log)
    finally:
        _max_pixels.reset(limit)


def _convert(cfg: PrepareConfig, files: list[Path], summary: Summary, log) -> Summary:
    from tqdm import tqdm

    try:
        writer = ShardWriter(cfg.output, overwrite=cfg.overwrite, compression=cfg.compression,
                             size_limit=cfg.shard_size, store_timeout=cfg.store_timeout,
                             store_attempts=cfg.store_attempts)
    except StoreError as exc:
        raise ConversionError(str(exc)) from None
    try:
        for where, build in tqdm(rows(cfg, files), desc=f"converting {cfg.input}", unit="row",
                                 disable=None if cfg.progress else True, file=log):  # None: no bar off a terminal
            try:
                record = build()
                if record["image"]:
                    summary.images += 1
                    if cfg.max_image_side:
                        record = resized_record(record, cfg, summary)
            except BadRecord as exc:
                summary.skipped[exc.reason] += 1
                if sum(summary.skipped.values()) <= cfg.max_reported:
                    print(f"{where}: {exc.reason}: {exc}", file=log)
                continue
            writer.write(record)
            summary.written += 1
        if summary.total == 0:
            raise ConversionError(f"no rows in {', '.join(map(str, files))}")
        print(summary.text(), file=log)
        if summary.written == 0 or summary.bad_fraction > cfg.max_bad_fraction:
            print(f"error: {summary.bad_fraction:.1%} of the rows were bad (max_bad_fraction "
                  f"{cfg.max_bad_fraction:.1%}); nothing published at {cfg.output}", file=log)
            writer.abort()
            raise SystemExit(1)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    print(f"published {summary.written} rows at {cfg.output}", file=log)
    return summary


def main(argv: list[str] | None = None) -> int:
    """Exit status 1 with one line on stderr for what the user must fix (input, output); no traceback."""
    from biomedgpt.core.config import parse_cli

    cfg = parse_cli(PrepareConfig, argv)
    # SIGTERM (a scheduler's kill) unwinds like an error: convert() drops its temporary files and uploads
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        convert(cfg)
    except (ConversionError, OutputExistsError, StoreError) as exc:
        print(f"prepare-data: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    return 0


if __name__ == "__main__":
    main()
