"""DeepSpeed ZeRO checkpoints read tensor by tensor: inspection, streaming consolidation, verification.

DeepSpeed's ``zero_to_fp32`` unpickles every rank's optimizer file and concatenates whole flat partitions,
so consolidating needs several copies of the model in host memory. Here every file is read with
``torch.load(weights_only=True, mmap=True)`` under an allow-list of what DeepSpeed writes
(``engine/checkpoint/load.py``: a crafted file is refused, nothing in it runs): tensors stay in the
mapped file, and each output tensor is assembled from slices of the ranks' fp32 master partitions,
converted and written straight into a safetensors file before the next one is read, the pages it
read given back (``CheckpointFile.release``). Peak memory is about the largest tensor, whatever the
model size or the number of ranks.

Layouts understood (DeepSpeed 0.19, cf. ``deepspeed/utils/zero_to_fp32.py``):

- ZeRO 1/2: per parameter group, each rank's ``single_partition_of_fp32_groups[g]`` is a consecutive
  piece of one flat vector holding the group's parameters in ``param_shapes[g]`` order (plus
  ``param_alignment_paddings``).
- ZeRO 3: every parameter is split into ``ceil(numel / world)`` pieces, rank r's piece lying at the
  same offset of its ``fp32_flat_groups[g]``; the last piece is zero-padded.
- stage 0 (no ZeRO optimizer files): the full state dict in rank 0's model-states file.
- a universal checkpoint (``ds_to_universal``): one fp32 file per parameter.

Buffers (BatchNorm statistics) come from rank 0's model-states file; EMA weights from the engine's
per-rank state files (see ``engine/train/ema.py``). The file names: ``engine/checkpoint/layout.py``.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import json
import math
import mmap
import os
import re
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from biomedgpt.engine.checkpoint import layout
from biomedgpt.engine.checkpoint.layout import MODEL_FILE_RE, OPTIM_FILE_RE, REPORT_FILE
from biomedgpt.models.checkpoint import (TIED_ALIASES, TIED_KEY, CheckpointError, write_dir_atomically,
                               read_model_config, read_model_weights)
from biomedgpt.models.config import DATA_FIELDS, ModelConfig, ModelSpec, spec_from_saved
from biomedgpt.models.ofa import BiomedGPT
from biomedgpt.models.precision import torch_dtype

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Top-level keys DeepSpeed itself writes into a model-states file; anything else is the client state.
DS_MODEL_KEYS = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
                 "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
                 "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size",
                 "checkpoint_parallel_dimensions", "ds_config", "ds_version", "universal_checkpoint_info"}
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


# ----------------------------------------------------------------------------------------------
# Checkpoint files: weights-only, tensors mapped from disk
# ----------------------------------------------------------------------------------------------


class CheckpointFile:
    """One ``torch.save`` file of a tag, read by ``engine/checkpoint/load.py`` (weights-only: a file that
    refers to anything else is refused, nothing in it runs) with ``mmap=True``: its tensors are views of
    the file mapped into memory, so opening reads only the pickle and each tensor's bytes are read when
    copied. ``release`` drops pages already copied from this process's resident memory."""

    def __init__(self, path: str | Path):
        from biomedgpt.engine.checkpoint.load import load_checkpoint_file

        self.path = Path(path)
        self.obj = load_checkpoint_file(self.path)
        self._mapped = _mapped_ranges(self.path)

    def populate(self, tensor: Tensor) -> None:
        """Map ``tensor``'s pages in one call before it is copied (instead of one page fault per page)."""
        self._advise(tensor, MADV_POPULATE_READ)

    def release(self, tensor: Tensor) -> None:
        """Give back the resident pages of ``tensor``'s bytes in this file's mapping (clean file pages:
        the kernel re-reads them if they are touched again). Without it a consolidation's resident memory
        would grow by every byte it reads; with it, it stays about one tensor. Linux only (elsewhere
        nothing is given back early)."""
        self._advise(tensor, mmap.MADV_DONTNEED)

    def _advise(self, tensor: Tensor, advice: int) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        begin = tensor.data_ptr()
        for lo, hi in self._mapped:
            if lo <= begin and begin + nbytes <= hi:
                first = begin - begin % mmap.PAGESIZE
                last = min(hi, -(-(begin + nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE)
                _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), advice)  # -1 if unknown: fine
                return


_LIBC = ctypes.CDLL(None, use_errno=True) if hasattr(mmap, "MADV_DONTNEED") else None
MADV_POPULATE_READ = 22  # Linux 5.14+; older kernels refuse it (EINVAL) and pages fault in one by one


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges at which ``path`` is mapped into this process (from ``/proc/self/maps``): pages are
    only given back inside them, so nothing else is ever touched."""
    if _LIBC is None:
        return []
    try:
        info = os.stat(path)
        with open("/proc/self/maps") as maps:
            lines = maps.readlines()
    except OSError:
        return []
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}"
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) >= 5 and fields[3] == device and fields[4] == str(info.st_ino):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


# ----------------------------------------------------------------------------------------------
# A checkpoint tag: its files, ZeRO stage, world size, client state
# ----------------------------------------------------------------------------------------------


def resolve_tag_dir(path: str | Path, tag: str | None = None) -> Path:
    """A tag directory from a tag directory itself, a checkpoints root, or a run's output directory
    (``<output_dir>/checkpoints``); without ``tag`` the engine's pointer to the newest tag picks it."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if tag is None and (_is_tag_dir(path)):
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() and not (path / layout.LATEST_FILE).exists() else path
    if tag is None:
        latest = root / layout.LATEST_FILE
        if not latest.is_file():
            raise CheckpointError(f"{latest}: missing; pass tag=... (tags here: {list_tags(root)})")
        tag = latest.read_text().strip()
    tag_dir = root / tag
    if not tag_dir.is_dir():
        raise CheckpointError(f"{tag_dir}: no such tag (tags here: {list_tags(root)})")
    return tag_dir


def _is_tag_dir(path: Path) -> bool:
    return any(MODEL_FILE_RE.match(p.name) for p in path.iterdir()) or (path / layout.UNIVERSAL_PARAMS_DIR).is_dir()


def list_tags(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _is_tag_dir(p))


@dataclass
class ParamSource:
    """One output tensor: its shape and how to assemble it (fp32 master values, or the saved tensor)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], Tensor]
    origin: str  # the file the values come from, for error messages


#: elements copied out of a mapped file before its pages are given back
COPY_CHUNK = 1 << 20
#: (file, tensor of that file, first element, number of elements): one piece of an output tensor
Segment = tuple[CheckpointFile, Tensor, int, int]


def _read_segments(segments: list[Segment], shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Concatenate the pieces into one tensor of ``shape`` (surplus padding dropped), giving back the
    pages read."""
    numel = math.prod(shape)
    out = torch.empty(numel, dtype=dtype)
    pos = 0
    for source, tensor, start, count in segments:
        count = min(count, numel - pos)
        if count <= 0:
            break
        if start + count > tensor.numel():
            raise CheckpointError(f"{source.path}: read {start}+{count} past a tensor of {tensor.numel()}")
        flat = tensor.reshape(-1)
        for lo in range(start, start + count, COPY_CHUNK):  # in chunks: few mapped pages resident at once
            piece = flat[lo:min(lo + COPY_CHUNK, start + count)]
            source.populate(piece)
            out[pos + lo - start:pos + lo - start + piece.numel()].copy_(piece)
            source.release(piece)
        pos += count
    if pos != numel:
        raise CheckpointError(f"{segments[0][0].path}: only {pos} of {numel} values found")
    return out.view(shape)


def _read_whole(source: CheckpointFile, tensor: Tensor) -> Tensor:
    """A copy of a saved tensor (its pages given back as they are copied)."""
    return _read_segments([(source, tensor, 0, tensor.numel())], tuple(tensor.shape), tensor.dtype)


def _canonical(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
    return TIED_KEY if name in TIED_ALIASES else name


@dataclass
class ZeroCheckpoint:
    """One tag of a DeepSpeed checkpoint, validated; tensors are not read."""

    directory: Path
    stage: int
    world_size: int
    model_files: list[CheckpointFile]
    optim_files: list[CheckpointFile] = field(default_factory=list)
    universal: bool = False

    @property
    def tag(self) -> str:
        return self.directory.name

    @property
    def model_state(self) -> dict:
        return self.model_files[0].obj

    @property
    def client_state(self) -> dict:
        return {k: v for k, v in self.model_state.items() if k not in DS_MODEL_KEYS}

    @property
    def step(self) -> int | None:
        meta = self.engine_meta()
        if meta is not None:
            return meta["step"]
        state = self.client_state
        return state.get("step", self.model_state.get("global_steps"))

    def engine_meta(self) -> dict | None:
        path = self.directory / layout.META_FILE
        return json.loads(path.read_text()) if path.exists() else None

    def param_shapes(self) -> list[dict[str, tuple[int, ...]]]:
        shapes = self.model_state.get("param_shapes")
        if shapes is None and self.stage == 0 and not self.universal:
            return [self._stage0_shapes()]
        if shapes is None:
            raise CheckpointError(f"{self.model_files[0].path}: no param_shapes (not a DeepSpeed model-states file)")
        if isinstance(shapes, dict):
            shapes = [shapes]
        return [{name: tuple(shape) for name, shape in group.items()} for group in shapes]

    def _stage0_shapes(self) -> dict[str, tuple[int, ...]]:
        """Stage 0 saves no param_shapes: the parameters are the full state dict less its buffers (tied
        aliases counted once)."""
        module = self.model_state.get("module")
        if not isinstance(module, dict):
            raise CheckpointError(f"{self.model_files[0].path}: no 'module' state dict (not a DeepSpeed "
                                  f"model-states file)")
        buffers = set(self.model_state.get("buffer_names") or [])
        shapes, seen = {}, set()
        for name, value in module.items():
            if name in buffers or not isinstance(value, Tensor) or _canonical(name) in seen:
                continue
            seen.add(_canonical(name))
            shapes[name] = tuple(value.shape)
        return shapes

    def num_parameters(self) -> int:
        frozen = self.model_state.get("frozen_param_shapes") or {}
        return sum(math.prod(s) for g in self.param_shapes() for s in g.values()) + \
            sum(math.prod(s) for s in frozen.values())

    # -- tensor sources --------------------------------------------------------------------------

    def parameter_sources(self) -> dict[str, ParamSource]:
        """Every parameter (trainable and frozen) by canonical name, from the fp32 master copy."""
        if self.universal:
            sources = self._universal_sources()
        elif self.stage == 0:
            module = self.model_state["module"]
            sources = {_canonical(n): self._whole(module[n], self.model_files[0])
                       for g in self.param_shapes() for n in g}
        elif self.stage <= 2:
            sources = self._zero12_sources()
        else:
            sources = self._zero3_sources()
        sources.update(self._frozen_sources())
        return sources

    def buffer_sources(self) -> dict[str, ParamSource]:
        module = self.model_state.get("module") or {}
        names = self.model_state.get("buffer_names") or []
        missing = [n for n in names if n not in module]
        if missing:
            raise CheckpointError(f"{self.model_files[0].path}: buffers {missing[:5]} listed but not saved")
        return {_canonical(n): self._whole(module[n], self.model_files[0]) for n in names}

    def ema_sources(self) -> dict[str, ParamSource]:
        """The engine's EMA of the trainable parameters (``engine/train/ema.py``), from the per-rank state files."""
        first = self.directory / layout.rank_state_file(0)
        if not first.exists():
            raise CheckpointError(f"{first}: missing, so there are no EMA weights (not an engine checkpoint?)")
        source = CheckpointFile(first)
        state = source.obj
        ema = state.get("ema") if isinstance(state, dict) else None
        if not isinstance(ema, dict) or "shadow" not in ema:
            raise CheckpointError(f"{first}: no EMA state (the run trained with ema.enabled=false)")
        shapes = {_canonical(n): s for g in self.param_shapes() for n, s in g.items()}
        # Partitioned (ZeRO-3): rank r holds piece r of each parameter, as the ZeRO-3 optimizer does.
        shards = [(source, ema["shadow"])]
        if ema["partitioned"]:
            shards += [self._rank_ema(r) for r in range(1, self.world_size)]
        sources = {}
        for name in ema["shadow"]:
            shape = shapes.get(_canonical(name))
            if shape is None:
                raise CheckpointError(f"{first}: EMA of {name!r}, which the checkpoint has no parameter for")
            segments = [(file, shard[name], 0, shard[name].numel()) for file, shard in shards]
            sources[_canonical(name)] = ParamSource(
                shape, torch.float32, lambda seg=segments, s=shape: _read_segments(seg, s, seg[0][1].dtype).float(),
                str(first))
        return sources

    def _rank_ema(self, rank: int) -> tuple[CheckpointFile, dict[str, Tensor]]:
        path = self.directory / layout.rank_state_file(rank)
        source = CheckpointFile(path)
        try:
            return source, source.obj["ema"]["shadow"]
        except (KeyError, TypeError):
            raise CheckpointError(f"{path}: no EMA shard although rank 0 has one") from None

    @staticmethod
    def _whole(tensor: Tensor, source: CheckpointFile) -> ParamSource:
        return ParamSource(tuple(tensor.shape), tensor.dtype, lambda: _read_whole(source, tensor), str(source.path))

    def _optim(self, rank: int) -> dict:
        return self.optim_files[rank].obj["optimizer_state_dict"]

    def _zero12_sources(self) -> dict[str, ParamSource]:
        sources = {}
        paddings = self._optim(0).get("param_alignment_paddings")
        for g, shapes in enumerate(self.param_shapes()):
            parts = [(self.optim_files[r], self._optim(r)["single_partition_of_fp32_groups"][g])
                     for r in range(self.world_size)]
            total = sum(part.numel() for _, part in parts)
            pads = paddings[g] if paddings is not None else [0] * len(shapes)
            offset = 0
            for (name, shape), pad in zip(shapes.items(), pads):
                numel = math.prod(shape)
                segments, base = [], 0
                for file, part in parts:
                    lo, hi = max(offset, base), min(offset + numel, base + part.numel())
                    if lo < hi:
                        segments.append((file, part, lo - base, hi - lo))
                    base += part.numel()
                sources[_canonical(name)] = ParamSource(
                    shape, torch.float32, lambda seg=segments, s=shape: _read_segments(seg, s, torch.float32),
                    str(self.optim_files[0].path))
                offset += numel + pad
            if offset != total:
                raise CheckpointError(f"{self.optim_files[0].path}: parameter group {g} holds {total} values but "
                                      f"the parameters need {offset} (files from different runs or world sizes?)")
        return sources

    def _zero3_sources(self) -> dict[str, ParamSource]:
        sources = {}
        world = self.world_size
        for g, shapes in enumerate(self.param_shapes()):
            flats = [(self.optim_files[r], self._optim(r)["fp32_flat_groups"][g]) for r in range(world)]
            offset = 0
            for name, shape in shapes.items():
                piece = math.ceil(math.prod(shape) / world)
                segments = [(file, flat, offset, piece) for file, flat in flats]
                sources[_canonical(name)] = ParamSource(
                    shape, torch.float32, lambda seg=segments, s=shape: _read_segments(seg, s, torch.float32),
                    str(self.optim_files[0].path))
                offset += piece
            if offset != flats[0][1].numel():
                raise CheckpointError(f"{self.optim_files[0].path}: parameter group {g} holds {flats[0][1].numel()} "
                                      f"values per rank but {world} ranks' pieces need {offset} (world size "
                                      f"mismatch or files from different runs?)")
        return sources

    def _frozen_sources(self) -> dict[str, ParamSource]:
        frozen = self.model_state.get("frozen_param_shapes") or {}
        sources = {}
        for name, shape in frozen.items():
            shape = tuple(shape)
            if self.stage == 3:
                segments = [(mf, mf.obj["frozen_param_fragments"][name], 0,
                             mf.obj["frozen_param_fragments"][name].numel()) for mf in self.model_files]
                dtype = segments[0][1].dtype
                sources[_canonical(name)] = ParamSource(
                    shape, dtype, lambda seg=segments, s=shape, d=dtype: _read_segments(seg, s, d),
                    str(self.model_files[0].path))
            else:
                saved = self.model_state["frozen_param_fragments"][name]
                sources[_canonical(name)] = ParamSource(
                    shape, saved.dtype, lambda t=saved, s=shape: _read_whole(self.model_files[0], t).view(s),
                    str(self.model_files[0].path))
        return sources

    def _universal_sources(self) -> dict[str, ParamSource]:
        sources = {}
        for group in self.param_shapes():
            for name, shape in group.items():
                path = self.directory / layout.UNIVERSAL_PARAMS_DIR / name / layout.UNIVERSAL_PARAM_FILE
                sources[_canonical(name)] = ParamSource(
                    shape, torch.float32, lambda p=path, s=shape: _universal_tensor(p, s), str(path))
        return sources


def _universal_tensor(path: Path, shape: tuple[int, ...]) -> Tensor:
    source = CheckpointFile(path)
    saved = source.obj.get("param") if isinstance(source.obj, dict) else source.obj
    if not isinstance(saved, Tensor) or saved.numel() < math.prod(shape):
        raise CheckpointError(f"{path}: no fp32 tensor of {math.prod(shape)} values")
    return _read_segments([(source, saved, 0, saved.numel())], shape, torch.float32)


def _rank_files(directory: Path, pattern: re.Pattern) -> dict[int, Path]:
    """Data-parallel rank -> file; tensor/pipeline-parallel files (mp_rank > 0) are refused."""
    found: dict[int, Path] = {}
    for path in sorted(directory.iterdir()):
        match = pattern.match(path.name)
        if match:
            if int(match["mp"]) != 0:
                raise CheckpointError(f"{path}: tensor/pipeline-parallel checkpoints are not supported")
            found[int(match["rank"] or 0)] = path
    return found


def open_checkpoint(path: str | Path, tag: str | None = None) -> ZeroCheckpoint:
    """Find, parse (pickles only) and cross-check every rank file of a tag; errors name the file."""
    directory = resolve_tag_dir(path, tag)
    universal = (directory / layout.UNIVERSAL_PARAMS_DIR).is_dir()
    model_paths = _rank_files(directory, MODEL_FILE_RE)
    optim_paths = {} if universal else _rank_files(directory, OPTIM_FILE_RE)
    if 0 not in model_paths:
        raise CheckpointError(f"{directory}: no model-states file of rank 0 ({layout.model_states_file()} or "
                              f"{layout.model_states_file(0)}) - not a DeepSpeed checkpoint tag")
    if not optim_paths:  # stage 0, or a universal checkpoint: the run's own config says which
        state = CheckpointFile(model_paths[0]).obj
        stage = int((state.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0))
        world = int(state.get("dp_world_size", 1))
    else:
        if 0 not in optim_paths:
            name = layout.with_rank(next(iter(optim_paths.values())).name, 0)
            raise CheckpointError(f"{directory / name}: missing (rank 0's optimizer shard)")
        first = CheckpointFile(optim_paths[0])
        state = first.obj.get("optimizer_state_dict") if isinstance(first.obj, dict) else None
        if not isinstance(state, dict):
            raise CheckpointError(f"{first.path}: no optimizer_state_dict (not a ZeRO optimizer shard)")
        stage = int(state.get("zero_stage", 1))
        count = state.get("partition_count")
        world = max(count) if isinstance(count, list) else int(count)
        for rank in range(world):
            if rank not in optim_paths:
                name = layout.with_rank(optim_paths[0].name, rank)
                raise CheckpointError(f"{directory / name}: missing (the checkpoint was written by {world} ranks, "
                                      f"each saves its own optimizer shard)")
        extra = sorted(r for r in optim_paths if r >= world)
        if extra:
            raise CheckpointError(f"{optim_paths[extra[0]]}: rank {extra[0]} shard in a checkpoint that "
                                  f"{first.path.name} says was written by {world} ranks (mixed checkpoints?)")
    if stage == 3:
        for rank in range(world):
            if rank not in model_paths:
                raise CheckpointError(f"{directory / layout.model_states_file(rank)}: missing "
                                      f"(ZeRO-3 writes one model-states file per rank)")
    model_files = [CheckpointFile(model_paths[r]) for r in (range(world) if stage == 3 else [0])]
    optim_files = [first] + [CheckpointFile(optim_paths[r]) for r in range(1, world)] if optim_paths else []
    ckpt = ZeroCheckpoint(directory, stage, world, model_files, optim_files, universal)
    _check_consistent(ckpt)
    # DeepSpeed's tools (zero_to_fp32 for verify, ds_to_universal for reshard) unpickle every file they
    # find: each is read weights-only here first, so a crafted one is refused before they run.
    read = {f.path for f in (*model_files, *optim_files)}
    for path in sorted(directory.glob("*.pt")):
        if path not in read:
            CheckpointFile(path)
    return ckpt


def _check_consistent(ckpt: ZeroCheckpoint) -> None:
    meta = ckpt.engine_meta()
    if meta is not None and not ckpt.universal and (meta["world_size"], meta["zero_stage"]) != (ckpt.world_size,
                                                                                                 ckpt.stage):
        raise CheckpointError(f"{ckpt.directory / layout.META_FILE}: says world size {meta['world_size']} stage "
                              f"{meta['zero_stage']}, the shards say world size {ckpt.world_size} stage {ckpt.stage}")
    if not ckpt.optim_files:
        return
    key = "fp32_flat_groups" if ckpt.stage == 3 else "single_partition_of_fp32_groups"
    reference = ckpt._optim(0)
    for rank, tf in enumerate(ckpt.optim_files):
        state = tf.obj.get("optimizer_state_dict", {})
        if key not in state:
            raise CheckpointError(f"{tf.path}: no {key} (not a ZeRO-{ckpt.stage} optimizer shard)")
        if state.get("partition_count") != reference.get("partition_count") or \
                int(state.get("zero_stage", 1)) != ckpt.stage:
            raise CheckpointError(f"{tf.path}: partition count {state.get('partition_count')} / stage "
                                  f"{state.get('zero_stage')} differ from rank 0's (files from different runs?)")
        sizes, expected = [t.numel() for t in state[key]], [t.numel() for t in reference[key]]
        if ckpt.stage == 3 and sizes != expected:
            raise CheckpointError(f"{tf.path}: partition sizes {sizes} differ from rank 0's {expected} (world size "
                                  f"mismatch?)")


# ----------------------------------------------------------------------------------------------
# The model config of a checkpoint
# ----------------------------------------------------------------------------------------------


def checkpoint_model_config(ckpt: ZeroCheckpoint, spec: ModelSpec | None = None) -> ModelConfig:
    """The architecture: a given spec, else the client state's run config, else ``<run>/config.yaml``."""
    if spec is not None:
        return spec.build()
    client = ckpt.client_state
    if isinstance(client.get("model_config"), dict):
        return ModelConfig(**client["model_config"])
    run_cfg = client.get("config")
    if isinstance(run_cfg, dict) and isinstance(run_cfg.get("model"), dict):
        return _spec_from(run_cfg, f"{ckpt.model_files[0].path} (client state 'config.model')")
    run_yaml = ckpt.directory.parent.parent / "config.yaml"
    if ckpt.directory.parent.name == "checkpoints" and run_yaml.exists():
        import yaml

        data = yaml.safe_load(run_yaml.read_text()) or {}
        if isinstance(data.get("model"), dict):
            return _spec_from(data, f"{run_yaml} (model)")
    raise CheckpointError(f"{ckpt.directory}: no model config in the client state nor a run config.yaml beside "
                          f"it; pass model.size=... [model.d_model=...]")


def _spec_from(run_cfg: dict, where: str) -> ModelConfig:
    """A saved run config's model: its ``model`` section with the image normalisation of its ``data``."""
    from biomedgpt.core.config import ConfigError

    data = run_cfg.get("data") if isinstance(run_cfg.get("data"), dict) else {}
    try:
        cfg = spec_from_saved(run_cfg["model"]).build()
        return dataclasses.replace(cfg, **{k: list(data[k]) for k in DATA_FIELDS if k in data})
    except (ConfigError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{where}: {exc}") from None


def expected_state(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Keys, shapes and dtypes of a model directory for ``cfg`` (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = BiomedGPT(cfg)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items() if k not in TIED_ALIASES}


def weight_sources(ckpt: ZeroCheckpoint, cfg: ModelConfig, ema: bool = False, merge_lora: bool = False
                   ) -> dict[str, ParamSource]:
    """Every tensor of the output, in the model's order; a checkpoint that does not fit ``cfg`` is an error.
    A LoRA run's checkpoint needs ``merge_lora``: its adapters are merged into plain weights as they stream."""
    found = ckpt.parameter_sources()
    if ema:
        found.update(ckpt.ema_sources())
    found.update(ckpt.buffer_sources())
    if merge_lora:
        found = _lora_merged_sources(ckpt, found)
    elif any(".lora_A." in key for key in found):
        raise CheckpointError(f"{ckpt.directory} holds LoRA adapters: pass merge_lora=true to merge them into "
                              f"plain weights")
    expected = expected_state(cfg)
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k}: checkpoint {found[k].shape} vs config {expected[k][0]}" for k in expected
             if k in found and tuple(found[k].shape) != expected[k][0]]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{ckpt.directory} does not fit the model config: missing {missing[:10]}, "
                              f"unexpected {unexpected[:10]}, wrong shapes {wrong[:10]}")
    return {k: dataclasses.replace(found[k], dtype=expected[k][1] if not expected[k][1].is_floating_point
                                   else found[k].dtype) for k in expected}


def _lora_merged_sources(ckpt: ZeroCheckpoint, found: dict[str, ParamSource]) -> dict[str, ParamSource]:
    """The plain model's tensors of a LoRA run's checkpoint: each adapted weight read with its two adapter
    matrices and merged by peft (engine/train/lora.py), one layer at a time; the run's ``lora`` settings come from
    the checkpoint's client state."""
    from biomedgpt.engine.train.lora import merged_keys, produce_merged

    run_cfg = ckpt.client_state.get("config")
    settings = run_cfg.get("lora") if isinstance(run_cfg, dict) else None
    if not isinstance(settings, dict) or not settings.get("enabled"):
        raise CheckpointError(f"{ckpt.directory}: merge_lora=true, but its run did not train LoRA adapters "
                              f"(no lora.enabled in the saved run config): leave merge_lora off")
    plan = merged_keys(list(found))
    produce = produce_merged(plan, lambda key: found[key].read(), settings)
    return {key: dataclasses.replace(found[parts[0]], read=functools.partial(produce, key))
            for key, parts in plan.items()}


# ----------------------------------------------------------------------------------------------
# Streaming safetensors output
# ----------------------------------------------------------------------------------------------


def _tensor_bytes(tensor: Tensor) -> memoryview:
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def write_safetensors_streaming(path: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]],
                                produce: Callable[[str], Tensor], on_tensor: Callable[[int], None] = lambda n: None
                                ) -> dict[str, str]:
    """A safetensors file written tensor by tensor (header first: shapes are known up front).

    Returns each tensor's sha256. Memory: one tensor at a time."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    digests = {}
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in entries:
            tensor = produce(name)
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise CheckpointError(f"{name}: produced {tuple(tensor.shape)} {tensor.dtype}, "
                                      f"expected {shape} {dtype}")
            data = _tensor_bytes(tensor)
            f.write(data)
            digests[name] = hashlib.sha256(data).hexdigest()
            on_tensor(len(data))
            del tensor, data
        f.flush()
        os.fsync(f.fileno())
    return digests


def plan_shards(entries: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int
                ) -> list[list[tuple[str, tuple[int, ...], torch.dtype]]]:
    """Split into shards the way ``biomedgpt.models.checkpoint.write_model_files`` does."""
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = math.prod(entry[1]) * torch.empty((), dtype=entry[2]).element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


@dataclass
class ConsolidationResult:
    output: Path
    tensors: int
    bytes: int
    config: ModelConfig


def consolidate(ckpt: ZeroCheckpoint, output: str | Path, cfg: ModelConfig, dtype: str = "fp32",
                ema: bool = False, tokenizer=None, max_shard_bytes: int = 2 << 30, overwrite: bool = False,
                progress: bool = True, verify_output: bool = False, merge_lora: bool = False) -> ConsolidationResult:
    """Write a model directory (``biomedgpt.models.checkpoint`` layout) from ``ckpt``, streaming, atomically;
    ``verify_output`` runs ``verify`` against DeepSpeed's reconstruction before the directory appears."""
    from tqdm import tqdm

    if verify_output and ema:
        raise CheckpointError("verification compares with DeepSpeed's zero_to_fp32, which knows no EMA weights")
    out_dtype = torch_dtype(dtype)
    if verify_output and merge_lora:
        raise CheckpointError("verification compares tensor by tensor with zero_to_fp32, which holds the adapters "
                              "unmerged: verify=true and merge_lora=true do not go together")
    sources = weight_sources(ckpt, cfg, ema=ema, merge_lora=merge_lora)
    entries = [(k, s.shape, out_dtype if s.dtype.is_floating_point else s.dtype) for k, s in sources.items()]
    shards = plan_shards(entries, max_shard_bytes)
    total = sum(math.prod(e[1]) * torch.empty((), dtype=e[2]).element_size() for e in entries)

    def produce(name: str) -> Tensor:
        source = sources[name]
        tensor = source.read()
        return tensor.to(out_dtype) if tensor.is_floating_point() else tensor.to(source.dtype)

    def write(directory: Path) -> None:
        digests: dict[str, str] = {}
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"consolidating {ckpt.tag}",
                  disable=not progress) as bar:
            for name, shard in zip(names, shards):
                digests.update(write_safetensors_streaming(directory / name, shard, produce, bar.update))
        if len(shards) > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {e[0]: n for n, shard in zip(names, shards) for e in shard}}
            (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (directory / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        if tokenizer is not None:
            tokenizer.save(directory / "tokenizer")
        report = {"source": str(ckpt.directory.resolve()), "tag": ckpt.tag, "step": ckpt.step,
                  "zero_stage": ckpt.stage, "world_size": ckpt.world_size, "universal": ckpt.universal,
                  "dtype": dtype, "ema": ema, "merge_lora": merge_lora, "sha256": digests}
        (directory / REPORT_FILE).write_text(json.dumps(report, indent=2))
        if verify_output:
            verify(directory, ckpt)

    out = write_dir_atomically(Path(output), write, overwrite)
    return ConsolidationResult(out, len(entries), total, cfg)


# ----------------------------------------------------------------------------------------------
# Verification
# ----------------------------------------------------------------------------------------------


def verify_checksums(model_dir: str | Path) -> int:
    """Re-hash every tensor of a consolidated directory against its ``consolidation.json``."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    report_path = model_dir / REPORT_FILE
    if not report_path.exists():
        raise CheckpointError(f"{report_path}: missing (not written by the consolidation tool)")
    expected = json.loads(report_path.read_text())["sha256"]
    index = model_dir / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    seen = 0
    for name in files:
        with safe_open(str(model_dir / name), framework="pt") as f:
            for key in f.keys():
                digest = hashlib.sha256(_tensor_bytes(f.get_tensor(key))).hexdigest()
                if expected.get(key) != digest:
                    raise CheckpointError(f"{model_dir / name}: tensor {key} does not match its checksum")
                seen += 1
    if seen != len(expected):
        raise CheckpointError(f"{model_dir}: {seen} tensors on disk, {len(expected)} in {REPORT_FILE}")
    return seen


def reference_state(ckpt: ZeroCheckpoint) -> dict[str, Tensor]:
    """DeepSpeed's own reconstruction (``zero_to_fp32``, all in memory): an independent reference."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if ckpt.stage == 0 or ckpt.universal:
        raise CheckpointError(f"{ckpt.directory}: DeepSpeed's zero_to_fp32 reads ZeRO 1-3 checkpoints only")
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.directory.parent), tag=ckpt.tag)
    return {_canonical(k): v for k, v in state.items()}


def sample_batch(cfg: ModelConfig, seed: int = 0, batch: int = 2, image_size: int = 64) -> dict[str, Tensor]:
    """A fixed synthetic batch (text + image) for comparing forward passes."""
    g = torch.Generator().manual_seed(seed)
    return {"src_tokens": torch.randint(4, cfg.vocab_size, (batch, 12), generator=g),
            "prev_output_tokens": torch.randint(4, cfg.vocab_size, (batch, 7), generator=g),
            "patch_images": torch.randn(batch, 3, image_size, image_size, generator=g),
            "patch_masks": torch.ones(batch, dtype=torch.bool)}


@torch.no_grad()
def forward_difference(a: BiomedGPT, b: BiomedGPT, batch: dict[str, Tensor]) -> float:
    """Max |logits_a - logits_b| on ``batch`` (both in eval mode)."""
    a.eval(), b.eval()
    return (a(**batch).float() - b(**batch).float()).abs().max().item()


@dataclass
class VerifyReport:
    tensors: int
    max_tensor_diff: float | None = None
    max_logit_diff: float | None = None


def verify(model_dir: str | Path, ckpt: ZeroCheckpoint | None = None, live_model: BiomedGPT | None = None,
           atol: float = 1e-5) -> VerifyReport:
    """Checksums; then each tensor and a forward pass against ``live_model`` or DeepSpeed's reconstruction."""
    from biomedgpt.models.checkpoint import load_into, load_pretrained

    report = VerifyReport(verify_checksums(model_dir))
    if live_model is None and ckpt is None:
        return report
    meta = json.loads((Path(model_dir) / REPORT_FILE).read_text())
    out_dtype = torch_dtype(meta["dtype"])
    if live_model is not None:
        reference = {k: v.detach().cpu() for k, v in live_model.state_dict().items() if k not in TIED_ALIASES}
    else:
        if meta["ema"]:
            raise CheckpointError(f"{model_dir}: EMA weights have no DeepSpeed reference; verify with a live model")
        reference = reference_state(ckpt)
    written = read_model_weights(model_dir)
    worst = 0.0
    for key, value in written.items():
        if key not in reference:
            raise CheckpointError(f"{model_dir}: {key} is not in the reference")
        ref = reference[key]
        ref = ref.to(out_dtype) if ref.is_floating_point() else ref
        if ref.shape != value.shape:
            raise CheckpointError(f"{model_dir}: {key} has shape {tuple(value.shape)}, reference {tuple(ref.shape)}")
        worst = max(worst, (value.double() - ref.double()).abs().max().item() if value.numel() else 0.0)
    report.max_tensor_diff = worst
    cfg = read_model_config(model_dir)
    reference_model = BiomedGPT(cfg)  # the reference's weights rounded as the output's were
    load_into(reference_model, {k: v.to(out_dtype).float() if v.is_floating_point() else v
                                for k, v in reference.items() if k in written}, source="reference")
    report.max_logit_diff = forward_difference(load_pretrained(model_dir), reference_model, sample_batch(cfg))
    if worst > 0 or report.max_logit_diff > atol:
        raise CheckpointError(f"{model_dir}: differs from the reference (max tensor diff {worst:.3g}, "
                              f"max logit diff {report.max_logit_diff:.3g})")
    return report


# ----------------------------------------------------------------------------------------------
# Universal checkpoints (resume on another number of ranks)
# ----------------------------------------------------------------------------------------------


def to_universal(ckpt: ZeroCheckpoint, output: str | Path | None = None, overwrite: bool = False) -> Path:
    """DeepSpeed's ``ds_to_universal`` on a validated tag, written atomically (default ``<tag>/universal``).

    A run then resumes on any number of ranks with ``"checkpoint": {"load_universal": true}`` and
    ``load_checkpoint(<tag dir>, tag="universal")`` (the engine does this itself on a world-size change)."""
    if ckpt.universal or ckpt.stage == 0:
        raise CheckpointError(f"{ckpt.directory}: already universal / not a ZeRO checkpoint (stage 0 needs no "
                              f"conversion)")
    out = Path(output) if output is not None else ckpt.directory / layout.UNIVERSAL_DIR

    def convert(tmp: Path) -> None:
        target = tmp / "ckpt"  # ds_to_universal writes a sibling pointer file beside its output
        result = subprocess.run(
            [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt.directory),
             "--output_folder", str(target), "--num_extract_workers", "1", "--num_merge_workers", "1",
             "--inject_missing_state"], capture_output=True, text=True)
        if result.returncode != 0:
            raise CheckpointError(f"ds_to_universal failed on {ckpt.directory}:\n{result.stdout[-2000:]}\n"
                                  f"{result.stderr[-4000:]}")
        for item in target.iterdir():
            os.replace(item, tmp / item.name)
        target.rmdir()
        (tmp / layout.LATEST_UNIVERSAL_FILE).unlink(missing_ok=True)

    return write_dir_atomically(out, convert, overwrite)


# ----------------------------------------------------------------------------------------------
# Inspection
# ----------------------------------------------------------------------------------------------


def describe(ckpt: ZeroCheckpoint) -> dict[str, Any]:
    """What one tag holds, from the pickles alone."""
    files = sorted(p for p in ckpt.directory.iterdir() if p.is_file())
    try:
        cfg: Any = dataclasses.asdict(checkpoint_model_config(ckpt))
    except CheckpointError as exc:
        cfg = f"unknown ({exc})"
    client = {k: v for k, v in ckpt.client_state.items() if isinstance(v, (int, float, str, bool)) or v is None}
    return {"tag": ckpt.tag, "directory": str(ckpt.directory), "zero_stage": ckpt.stage,
            "world_size": ckpt.world_size, "universal": ckpt.universal, "step": ckpt.step,
            "ds_version": ckpt.model_state.get("ds_version"), "parameters": ckpt.num_parameters(),
            "engine_meta": ckpt.engine_meta(),  # written last by the engine: None for a plain DeepSpeed tag
            "has_ema": _has_ema(ckpt), "has_universal": (ckpt.directory / layout.UNIVERSAL_DIR).is_dir(),
            "files": {p.name: p.stat().st_size for p in files},
            "bytes": sum(p.stat().st_size for p in ckpt.directory.rglob("*") if p.is_file()),
            "client_state": client, "model_config": cfg}


def _has_ema(ckpt: ZeroCheckpoint) -> bool:
    path = ckpt.directory / layout.rank_state_file(0)
    if not path.exists():
        return False
    obj = CheckpointFile(path).obj
    return isinstance(obj, dict) and isinstance(obj.get("ema"), dict)


def iter_tags(path: str | Path) -> Iterable[tuple[str, Path]]:
    """(tag, directory) of every tag under a checkpoints root or run directory (or the tag itself)."""
    path = Path(path)
    if _is_tag_dir(path):
        yield path.name, path
        return
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    for tag in list_tags(root):
        yield tag, root / tag
