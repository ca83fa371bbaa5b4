"""Conversion of datasets into MDS shards of our row schema (``biomedgpt.data.records``), locally or straight
to s3:// (the library behind ``biomedgpt prepare-data``, ``tools/prepare_data.py``).

One reader per source: the original BiomedGPT/OFA TSVs (``tsv``), Parquet / JSONL / CSV records with image
bytes or paths (``tabular``), DICOM folders (``dicom``), LLaVA(-Med) conversations (``llava``); what they
share (rows reported by file and line, UTF-8 checks, images from a field) is in ``rows``; ``pipeline``
writes the shards (``convert``), the settings are ``config.PrepareConfig``.
"""
from biomedgpt.data.convert.config import Format, PrepareConfig, format_of
from biomedgpt.data.convert.pipeline import Summary, convert
from biomedgpt.data.convert.rows import ConversionError, InputMissing

__all__ = ["ConversionError", "Format", "InputMissing", "PrepareConfig", "Summary", "convert", "format_of"]
