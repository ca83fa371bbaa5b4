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
when complete (``biomedgpt.data.mds``). The converters are the library's (``biomedgpt.data.convert``).
"""
from __future__ import annotations

import signal
import sys

from biomedgpt.core.config import parse_cli
from biomedgpt.data.convert import ConversionError, PrepareConfig, convert
from biomedgpt.data.mds import OutputExistsError, StoreError


def main(argv: list[str] | None = None) -> int:
    """Exit status 1 with one line on stderr for what the user must fix (input, output); no traceback."""
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
