"""A checkpoint tag's consolidation index, and consolidation by it without torch.

When a tag is complete, rank 0 writes ``consolidation_index.json`` (``layout.CONSOLIDATION_INDEX_FILE``)
before ``meta.json`` (``CheckpointManager``, from ``consolidate.consolidation_index``): what
``consolidate.weight_sources`` finds for the default output (fp32, no EMA, no LoRA merge) - every output
tensor in order with its shape, dtype and the byte ranges of the tag's files that hold its values - with
the model config, the run's tokenizer settings and the size of each file it names. A consolidation that
asks for that output (``biomedgpt consolidate`` with ``dtype=fp32``, no ``ema``/``merge_lora``/``verify``, no
other model) copies those ranges into the safetensors files (``pread`` into one reused buffer, hashed,
written), with the header, report and files the torch path writes (the same functions below), and
imports no torch: importing torch alone costs seconds, the copy about one.

The index comes from a folder anyone may have changed: it is checked in full before a byte is copied
(schema and types, file names inside the tag folder, each file's size, every range inside a stored member
of the file's zip archive, sizes that add up, ``meta.json`` agreeing). A tag whose index fails a check is
consolidated by the torch path after one note naming the file and the problem; a tag without an index
(older, plain DeepSpeed, universal) takes the torch path as it is.
"""
from __future__ import annotations

import bisect
import json
import math
import os
import re
import struct
import sys
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from biomedgpt.core.durable import atomic_write_text
from biomedgpt.engine.checkpoint.layout import CONSOLIDATION_INDEX_FILE, META_FILE, REPORT_FILE
from biomedgpt.models.config import ModelConfig
from biomedgpt.models.model_dir import (CheckpointError, plan_shards, write_config, write_dir_atomically,
                                        write_shard_index)

#: The checksum of every written tensor in ``consolidation.json`` (integrity, not authenticity: the data
#: layer's shard hashes are xxhash too); reports of earlier versions hold sha256, which ``verify`` reads.
CHECKSUM = "xxh3_128"
#: bytes written between two requests to start their writeback
WRITEBACK_BYTES = 64 << 20
#: safetensors' dtype names and their sizes in bytes
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1}
#: what the default output (fp32) holds: fp32 values and the buffers' integers, copied as they are stored
INDEX_DTYPES = ("F32", "I64", "I32", "I16", "I8", "U8", "BOOL")
INDEX_FORMAT, INDEX_VERSION = "biomedgpt-consolidation-index", 1
#: bytes copied per read: the one buffer of an indexed consolidation
COPY_CHUNK = 8 << 20
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # a file directly in the tag folder
_DATA_MEMBER = re.compile(r"(^|/)data/\d+$")  # a torch.save archive's storage
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # a zip local file header: signature, ..., name and extra lengths


def checksum(data, algorithm: str = CHECKSUM) -> str:
    if algorithm == "sha256":
        import hashlib

        return hashlib.sha256(data).hexdigest()
    import xxhash

    return xxhash.xxh3_128_hexdigest(data)


# ----------------------------------------------------------------------------------------------
# What both consolidation paths write
# ----------------------------------------------------------------------------------------------


def safetensors_header(entries: list[tuple[str, tuple[int, ...], str]]) -> bytes:
    """A safetensors file's header (its length, then the JSON padded to 8 bytes) for tensors (name, shape,
    dtype name) whose bytes follow in that order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


def write_all(f, data: memoryview) -> None:
    """All of ``data`` into an unbuffered file (whose writes may be partial)."""
    while len(data):
        data = data[f.write(data):]


def start_writeback(f, written: int) -> int:
    """Past ``WRITEBACK_BYTES`` since ``written``: start writing those pages to disk now (Linux: DONTNEED
    begins their writeback), so the fsync when the directory is published waits for the last ones only.
    Returns the new mark."""
    if hasattr(os, "posix_fadvise") and f.tell() - written >= WRITEBACK_BYTES:
        os.posix_fadvise(f.fileno(), written, f.tell() - written, os.POSIX_FADV_DONTNEED)
        return f.tell()
    return written


def write_model_metadata(directory: Path, plan, cfg: ModelConfig, report: dict) -> None:
    """The files beside the weights: the shard index, ``config.json``, ``consolidation.json``."""
    write_shard_index(directory, plan)
    write_config(directory, cfg)
    (directory / REPORT_FILE).write_text(json.dumps(report, indent=2))


def consolidation_report(source: Path, tag: str, step: int | None, stage: int, world_size: int, universal: bool,
                         dtype: str, ema: bool, merge_lora: bool, digests: dict[str, str]) -> dict:
    """``consolidation.json``: where the directory comes from, how it was made, each tensor's checksum."""
    return {"source": str(source.resolve()), "tag": tag, "step": step, "zero_stage": stage, "world_size": world_size,
            "universal": universal, "dtype": dtype, "ema": ema, "merge_lora": merge_lora, CHECKSUM: digests}


@dataclass
class ConsolidationResult:
    output: Path
    tensors: int
    bytes: int
    config: ModelConfig
    tokenizer: bool  # whether the directory holds a tokenizer


class TokenizerJob:
    """A consolidation's tokenizer, made and saved on a thread while the tensors stream (parsing a BPE is
    Python work). ``tokenizer``: a tokenizer, None, or a function returning one of those (run at once on
    the thread). Its errors stop the consolidation before the directory appears, and come first, as if it
    had been made first (``with`` re-raises them in place of what they caused)."""

    def __init__(self, tokenizer) -> None:
        self._pool = ThreadPoolExecutor(1)
        self._made = self._pool.submit(tokenizer) if callable(tokenizer) else None
        self._given = None if callable(tokenizer) else tokenizer

    def save_into(self, directory: Path) -> Future:
        """Saves the tokenizer into ``directory`` on the thread; the future's result: whether there was one."""
        def save() -> bool:
            tokenizer = self._made.result() if self._made is not None else self._given
            if tokenizer is not None:
                tokenizer.save(directory)
            return tokenizer is not None

        return self._pool.submit(save)

    def __enter__(self) -> "TokenizerJob":
        return self

    def __exit__(self, kind, error, trace) -> None:
        self._pool.shutdown(wait=True)
        if isinstance(error, Exception) and self._made is not None and self._made.exception() is not None:
            raise self._made.exception() from None


def write_model_directory(output: str | Path, plan, cfg: ModelConfig, job: TokenizerJob, tag: str,
                          write_file: Callable[[Path, list[str], Callable[[int], None]], dict[str, str]],
                          report: Callable[[dict[str, str]], dict], tensors: int, overwrite: bool, progress: bool,
                          before_publish: Callable[[Path], None] | None = None) -> ConsolidationResult:
    """The model directory both consolidation paths publish (atomically, fsynced): the safetensors files of
    ``plan``, each by ``write_file(path, tensor names, on_bytes)`` (returns their checksums), the tokenizer
    (saved on ``job``'s thread meanwhile), the shard index, ``config.json`` and ``report(checksums)``;
    ``before_publish(folder)`` runs last, before the directory appears."""
    from tqdm import tqdm

    with_tokenizer: list[bool] = []

    def write(directory: Path) -> None:
        saved = job.save_into(directory / "tokenizer")  # the tokenizer's files (Python work) while tensors stream
        digests: dict[str, str] = {}
        with tqdm(total=plan.metadata["total_size"], unit="B", unit_scale=True, desc=f"consolidating {tag}",
                  disable=not progress) as bar:
            for filename, names in plan.filename_to_tensors.items():
                digests.update(write_file(directory / filename, names, bar.update))
        with_tokenizer.append(saved.result())
        write_model_metadata(directory, plan, cfg, report(digests))
        if before_publish is not None:
            before_publish(directory)

    out = write_dir_atomically(Path(output), write, overwrite)
    return ConsolidationResult(out, tensors, plan.metadata["total_size"], cfg, with_tokenizer[-1])


# ----------------------------------------------------------------------------------------------
# The index
# ----------------------------------------------------------------------------------------------


class IndexProblem(ValueError):
    """A consolidation index that does not describe its tag (the message says what)."""


def index_document(tag: str, step: int, stage: int, world_size: int, model_config: dict, run_tokenizer: dict | None,
                   files: dict[str, int], tensors: list[tuple[str, tuple[int, ...], str, list[tuple[str, int, int]]]]
                   ) -> dict:
    """The index's JSON: ``tensors`` as (name, shape, dtype name, segments (file name, byte offset, bytes))."""
    return {"format": INDEX_FORMAT, "version": INDEX_VERSION, "tag": tag, "step": step, "zero_stage": stage,
            "world_size": world_size, "model_config": model_config, "run_tokenizer": run_tokenizer, "files": files,
            "tensors": [{"name": n, "shape": list(s), "dtype": d, "segments": [list(g) for g in seg]}
                        for n, s, d, seg in tensors]}


def write_index(tag_dir: Path, document: dict) -> None:
    atomic_write_text(tag_dir / CONSOLIDATION_INDEX_FILE, json.dumps(document, separators=(",", ":")))


@dataclass(frozen=True)
class IndexedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str
    segments: tuple[tuple[str, int, int], ...]  # (file name, byte offset, byte count)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


@dataclass
class ConsolidationIndex:
    """A checked index, with its files open (the checks and the copy read the same files)."""

    directory: Path
    tag: str
    step: int
    zero_stage: int
    world_size: int
    model_config: ModelConfig
    run_tokenizer: dict | None  # the run's ``tokenizer`` / ``bpe_dir`` settings (None: no saved run config)
    tensors: list[IndexedTensor]
    fds: dict[str, int] = field(default_factory=dict)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _is_int(value: Any, low: int = 0, high: float = math.inf) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _expect(condition: bool, problem: str) -> None:
    if not condition:
        raise IndexProblem(problem)


def read_index(tag_dir: Path) -> ConsolidationIndex:
    """The tag's index, checked against the tag's files (``IndexProblem`` names the first mismatch)."""
    try:
        return _read_index(tag_dir)
    except (TypeError, KeyError, AttributeError, OverflowError, RecursionError) as exc:  # a shape no check foresaw
        raise IndexProblem(f"malformed ({type(exc).__name__}: {str(exc)[:100]})") from None


def _read_index(tag_dir: Path) -> ConsolidationIndex:
    path = tag_dir / CONSOLIDATION_INDEX_FILE
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise IndexProblem(f"not readable JSON ({reason})") from None
    expected_keys = {"format", "version", "tag", "step", "zero_stage", "world_size", "model_config", "run_tokenizer",
                     "files", "tensors"}
    _expect(isinstance(doc, dict) and set(doc) == expected_keys,
            f"not an index (keys: expected {sorted(expected_keys)})")
    _expect(doc["format"] == INDEX_FORMAT and doc["version"] == INDEX_VERSION,
            f"format {doc['format']!r} version {doc['version']!r}, not {INDEX_FORMAT!r} {INDEX_VERSION}")
    _expect(doc["tag"] == tag_dir.name, f"names tag {doc['tag']!r}, but lies in {tag_dir.name!r}")
    _expect(_is_int(doc["step"]) and _is_int(doc["zero_stage"], 0, 3)
            and _is_int(doc["world_size"], 1), "step, zero_stage or world_size is not a count")
    config = _model_config(doc["model_config"])
    run_tokenizer = doc["run_tokenizer"]
    _expect(run_tokenizer is None or (isinstance(run_tokenizer, dict) and set(run_tokenizer) == {"tokenizer", "bpe_dir"}
                                      and all(v is None or isinstance(v, str) for v in run_tokenizer.values())),
            "run_tokenizer is not {tokenizer, bpe_dir}")
    _check_meta(tag_dir, doc)
    tensors = _tensors(doc["tensors"], doc["files"])
    index = ConsolidationIndex(tag_dir, doc["tag"], doc["step"], doc["zero_stage"], doc["world_size"], config,
                               run_tokenizer, tensors)
    try:
        _check_files(index, doc["files"])
    except BaseException:
        index.close()
        raise
    return index


def _model_config(data: Any) -> ModelConfig:
    from biomedgpt.core.config import ConfigError, from_dict

    _expect(isinstance(data, dict), "model_config is not an object")
    try:
        cfg = from_dict(ModelConfig, data)
    except (ConfigError, TypeError, ValueError) as exc:
        raise IndexProblem(f"model_config: {str(exc).splitlines()[0]}") from None
    return cfg


def _check_meta(tag_dir: Path, doc: dict) -> None:
    """``meta.json`` (written after the index) agrees with it: the tag was not mixed with another."""
    try:
        meta = json.loads((tag_dir / META_FILE).read_bytes())
    except (OSError, ValueError) as exc:
        raise IndexProblem(f"{META_FILE} is not readable JSON ({type(exc).__name__})") from None
    _expect(isinstance(meta, dict) and all(meta.get(k) == doc[k] for k in ("step", "world_size", "zero_stage")),
            f"says step {doc['step']} world size {doc['world_size']} stage {doc['zero_stage']}, {META_FILE} "
            f"says otherwise")


def _tensors(items: Any, files: Any) -> list[IndexedTensor]:
    _expect(isinstance(files, dict) and all(isinstance(n, str) and _FILE_NAME.match(n) and _is_int(s)
                                            for n, s in files.items()),
            "files is not {name in the tag folder: size}")
    _expect(isinstance(items, list) and items, "tensors is not a list of tensors")
    tensors, names = [], set()
    for item in items:
        _expect(isinstance(item, dict) and set(item) == {"name", "shape", "dtype", "segments"},
                f"tensor entry {str(item)[:80]} is not {{name, shape, dtype, segments}}")
        name, shape, dtype, segments = item["name"], item["shape"], item["dtype"], item["segments"]
        _expect(isinstance(name, str) and name and name not in names and not name.startswith("__"),
                f"tensor name {name!r} is empty, repeated or reserved")
        names.add(name)
        _expect(isinstance(shape, list) and all(_is_int(d) for d in shape), f"{name}: shape {shape!r}")
        _expect(dtype in INDEX_DTYPES, f"{name}: dtype {dtype!r} (known: {', '.join(INDEX_DTYPES)})")
        _expect(isinstance(segments, list) and all(
            isinstance(s, list) and len(s) == 3 and isinstance(s[0], str) and s[0] in files and _is_int(s[1])
            and _is_int(s[2], 1)
            for s in segments), f"{name}: segments are not [file of files, offset, bytes]")
        tensor = IndexedTensor(name, tuple(shape), dtype, tuple(tuple(s) for s in segments))
        held = sum(s[2] for s in segments)
        _expect(held == tensor.nbytes, f"{name}: segments hold {held} bytes, shape {shape} {dtype} needs {tensor.nbytes}")
        tensors.append(tensor)
    return tensors


def _check_files(index: ConsolidationIndex, sizes: dict[str, int]) -> None:
    """Each named file is a regular file of the tag folder of the recorded size (opened here, read from
    these descriptors), and every segment lies inside one stored member of its zip archive."""
    used: dict[str, list[tuple[int, int]]] = {}
    for tensor in index.tensors:
        for name, offset, count in tensor.segments:
            used.setdefault(name, []).append((offset, count))
    for name, segments in used.items():
        path = index.directory / name
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError as exc:
            raise IndexProblem(f"{name}: {exc.strerror}") from None
        index.fds[name] = fd
        size = os.fstat(fd).st_size
        _expect(size == sizes[name], f"{name}: {size} bytes, the index recorded {sizes[name]}")
        members = _stored_members(fd, name)
        starts = [start for start, _ in members]
        for offset, count in segments:
            i = bisect.bisect_right(starts, offset) - 1
            _expect(i >= 0 and offset + count <= members[i][1],
                    f"{name}: bytes {offset}..{offset + count} lie outside its stored tensors")


def _stored_members(fd: int, name: str) -> list[tuple[int, int]]:
    """The (start, end) byte ranges of a torch.save archive's stored (uncompressed) storages, sorted."""
    ranges = []
    try:
        with os.fdopen(os.dup(fd), "rb") as f, zipfile.ZipFile(f) as archive:
            for info in archive.infolist():
                if not _DATA_MEMBER.search(info.filename) or info.compress_type != zipfile.ZIP_STORED:
                    continue
                head = os.pread(fd, _LOCAL_HEADER.size, info.header_offset)
                _expect(len(head) == _LOCAL_HEADER.size, f"{name}: a member's header lies past the end")
                signature, name_length, extra_length = _LOCAL_HEADER.unpack(head)
                _expect(signature == b"PK\x03\x04", f"{name}: a member's header is not a zip header")
                start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
                ranges.append((start, start + info.file_size))
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        if isinstance(exc, IndexProblem):
            raise
        raise IndexProblem(f"{name}: not a readable torch.save archive ({exc})") from None
    return sorted(ranges)


# ----------------------------------------------------------------------------------------------
# Consolidation by the index
# ----------------------------------------------------------------------------------------------


def indexed_request(tag_dir: Path, dtype: str, ema: bool, merge_lora: bool, verify: bool,
                    model: ModelConfig | None) -> ConsolidationIndex | None:
    """The tag's checked index when it makes the requested output (fp32, no EMA, no merge, no verification
    against DeepSpeed, the saved model); None for the torch path (after one note when the index is there
    but does not describe the tag: the folder was altered, and the torch path says how, if it matters)."""
    path = tag_dir / CONSOLIDATION_INDEX_FILE
    if dtype != "fp32" or ema or merge_lora or verify or not os.path.lexists(path):
        return None
    if not (tag_dir / META_FILE).exists():
        return None  # an incomplete tag (its save stopped between the two files)
    try:
        index = read_index(tag_dir)
    except IndexProblem as exc:
        print(f"note: {path}: {exc}; consolidating without the index", file=sys.stderr, flush=True)
        return None
    if model is not None and model != index.model_config:
        index.close()
        return None
    return index


def consolidate_indexed(index: ConsolidationIndex, output: str | Path, tokenizer=None, max_shard_bytes: int = 2 << 30,
                        overwrite: bool = False, progress: bool = True) -> ConsolidationResult:
    """The model directory of ``index``'s tag, byte for byte what ``consolidate.consolidate`` writes for its
    default output, from the stored bytes: each tensor's ranges read into one buffer, hashed, written.
    ``tokenizer``: as ``TokenizerJob`` takes it. Closes the index's files."""
    tensors = {t.name: t for t in index.tensors}
    plan = plan_shards({name: t.nbytes for name, t in tensors.items()}, max_shard_bytes)
    buffer = memoryview(bytearray(min(COPY_CHUNK, max(t.nbytes for t in index.tensors) or 1)))
    try:
        with TokenizerJob(tokenizer) as job:
            return write_model_directory(
                output, plan, index.model_config, job, index.tag,
                lambda path, names, on_bytes: _copy_tensors(path, [tensors[n] for n in names], index, buffer, on_bytes),
                lambda digests: consolidation_report(index.directory, index.tag, index.step, index.zero_stage,
                                                     index.world_size, False, "fp32", False, False, digests),
                len(tensors), overwrite, progress)
    finally:
        index.close()


def _copy_tensors(path: Path, entries: list[IndexedTensor], index: ConsolidationIndex, buffer: memoryview,
                  on_bytes: Callable[[int], None]) -> dict[str, str]:
    """One safetensors file from the stored bytes; each tensor's checksum (the same as the torch path's:
    xxh3 of the tensor's bytes, fed in pieces)."""
    import xxhash

    digests = {}
    with open(path, "wb", buffering=0) as f:
        write_all(f, memoryview(safetensors_header([(t.name, t.shape, t.dtype) for t in entries])))
        written = f.tell()
        for tensor in entries:
            digest = xxhash.xxh3_128()
            for name, offset, count in tensor.segments:
                while count:
                    got = os.preadv(index.fds[name], [buffer[:min(count, len(buffer))]], offset)
                    if got == 0:
                        raise CheckpointError(f"{index.directory / name}: ends inside a tensor (truncated); copy the "
                                              f"file again")
                    digest.update(buffer[:got])
                    write_all(f, buffer[:got])
                    offset, count = offset + got, count - got
            digests[tensor.name] = digest.hexdigest()
            on_bytes(tensor.nbytes)
            written = start_writeback(f, written)
    return digests
