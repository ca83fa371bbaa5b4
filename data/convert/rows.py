"""What every reader of a source format shares: a row is (where, build) so that a bad one is reported as
``file:line: reason: message`` and skipped without stopping the conversion; UTF-8 checks; images found in
a field (bytes, a path, a Hugging Face ``{"bytes", "path"}`` struct) checked against the conversion's
pixel limit; NLI labels by name or by MedNLI's index."""
from __future__ import annotations

from contextvars import ContextVar
from pathlib import Path
from typing import Any, Callable, Optional

from biomedgpt.data.images import MAX_IMAGE_PIXELS, storable_image
from biomedgpt.data.records import MEDNLI_LABEL_INDEX, BadRecord

Row = tuple[str, Callable[[], dict]]  # (file:line, builds the record or raises BadRecord)
#: the running conversion's max_image_pixels (the row builders are called inside convert())
image_pixel_limit: ContextVar[int] = ContextVar("max_image_pixels", default=MAX_IMAGE_PIXELS)


class ConversionError(ValueError):
    """The conversion cannot run (input missing or empty, output store unreachable): one line, exit status 1."""


class InputMissing(ConversionError):
    """No input file at the given path or pattern."""


def utf8_problem(text: str) -> Optional[str]:
    """Where a line read with ``errors="surrogateescape"`` held bytes that are not UTF-8, or None."""
    for column, char in enumerate(text, start=1):
        if "\udc80" <= char <= "\udcff":
            return f"byte 0x{ord(char) - 0xDC00:02x} at column {column}"
    return None


def bad_row(message: str, reason: str = "malformed row") -> Callable[[], dict]:
    """A row's builder that reports it bad (found before the row could be parsed)."""
    def build() -> dict:
        raise BadRecord(message, reason)
    return build


def not_utf8(problem: str) -> Callable[[], dict]:
    return bad_row(problem, "not UTF-8")


def image_base(image_root: str, path: Path) -> Path:
    """Where relative image paths of ``path``'s rows start: ``image_root``, else the input file's folder."""
    return Path(image_root) if image_root else path.parent


def field_image(value: Any, base: Path) -> bytes:
    """Image column: bytes, a {"bytes", "path"} struct (HF datasets), or a path (relative to image_root)."""
    if value is None or value == "":
        return b""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
        if not value:
            return b""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return storable_image(bytes(value), max_pixels=image_pixel_limit.get())
    path = Path(str(value))
    path = path if path.is_absolute() else base / path
    try:
        return storable_image(path.read_bytes(), str(path), image_pixel_limit.get())
    except FileNotFoundError:
        raise BadRecord(f"image file {path} not found", "missing image") from None


def nli_label(value: Any) -> str:
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        if int(text) not in MEDNLI_LABEL_INDEX:
            raise BadRecord(f"NLI label {text} is not 0 (neutral), 1 (entailment) or 2 (contradiction)")
        return MEDNLI_LABEL_INDEX[int(text)]
    return text.lower()
