"""DICOM files, one row each: header keywords (named through ``columns=``) give the fields; the pixels,
windowed to 8 bits (``data.images.dicom_to_uint8``, as ``biomedgpt infer`` reads a DICOM), are stored once
as PNG."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from biomedgpt.data.convert.config import PrepareConfig
from biomedgpt.data.convert.rows import Row
from biomedgpt.data.convert.tabular import field_record
from biomedgpt.data.images import check_image_pixels, dicom_to_uint8, encode_png
from biomedgpt.data.records import KINDS, BadRecord


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
