"""What ``biomedgpt prepare-data`` converts: the input, its format and kind, the output store and the limits
on bad rows and images (``PrepareConfig``); the format of an input given without one (``format_of``)."""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from biomedgpt.core.config import PathStr
from biomedgpt.data.images import MAX_IMAGE_PIXELS

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
    shard_size: str = "64mb"  # a shard closes at this size (MDS size_limit)
    max_bad_fraction: float = 0.01  # bad rows tolerated, as a share of the rows read; above it nothing is published
    overwrite: bool = False  # replace a dataset already at output (else refused)
    progress: bool = True  # a progress bar (on a terminal only)
    parquet_batch_rows: int = 1024  # Parquet rows read per batch
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
