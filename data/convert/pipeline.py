"""One conversion: find the input files, read their rows with the format's reader, pre-resize images when
asked, write the good rows into shards (``data.mds.ShardWriter``: local or s3://, published only when
complete) and count the bad ones; too many bad rows publish nothing."""
from __future__ import annotations

import glob
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from biomedgpt.data.convert.config import PrepareConfig
from biomedgpt.data.convert.dicom import dicom_rows
from biomedgpt.data.convert.llava import llava_rows
from biomedgpt.data.convert.rows import ConversionError, InputMissing, Row, image_pixel_limit
from biomedgpt.data.convert.tabular import csv_rows, jsonl_rows, parquet_rows
from biomedgpt.data.convert.tsv import TSV_PARSERS, tsv_rows
from biomedgpt.data.images import pre_resized
from biomedgpt.data.mds import ShardWriter, StoreError
from biomedgpt.data.records import KINDS, BadRecord


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


def source_rows(cfg: PrepareConfig, files: Optional[list[Path]] = None) -> Iterator[Row]:
    """Every row of the input files, read by the reader of ``cfg.format``."""
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
    """Write every good row; returns the summary. Raises ``ConversionError`` (nothing published) when more than
    ``max_bad_fraction`` of the rows were bad."""
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
    limit = image_pixel_limit.set(cfg.max_image_pixels)
    try:
        return _convert(cfg, files, summary, log)
    finally:
        image_pixel_limit.reset(limit)


def _convert(cfg: PrepareConfig, files: list[Path], summary: Summary, log) -> Summary:
    from tqdm import tqdm

    try:
        writer = ShardWriter(cfg.output, overwrite=cfg.overwrite, compression=cfg.compression,
                             size_limit=cfg.shard_size, store_timeout=cfg.store_timeout,
                             store_attempts=cfg.store_attempts)
    except StoreError as exc:
        raise ConversionError(str(exc)) from None
    try:
        for where, build in tqdm(source_rows(cfg, files), desc=f"converting {cfg.input}", unit="row",
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
            raise ConversionError(f"{summary.bad_fraction:.1%} of the rows were bad (max_bad_fraction "
                                  f"{cfg.max_bad_fraction:.1%}); nothing published at {cfg.output}")
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    print(f"published {summary.written} rows at {cfg.output}", file=log)
    return summary
