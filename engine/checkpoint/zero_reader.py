"""DeepSpeed ZeRO checkpoints read tensor by tensor: what a tag holds, and each parameter's values.

DeepSpeed's ``zero_to_fp32`` unpickles every rank's optimizer file whole and concatenates the flat
partitions, so it holds several copies of the model in host memory. Here every file is unpickled with
``torch.load(weights_only=True)`` under the allow-list of what DeepSpeed writes (``engine/checkpoint/load.py``:
a crafted file is refused, nothing in it runs) onto the meta device: no tensor byte is read, and torch
notes where each storage lies in the file. A parameter is then read (``pread``) from the ranks' fp32
master partitions straight into its own buffer, one at a time: memory is about the largest tensor,
whatever the model size or the number of ranks. ``engine/checkpoint/consolidate.py`` writes them out,
``engine/checkpoint/verify.py`` checks the result.

Layouts understood (DeepSpeed 0.19, cf. ``deepspeed/utils/zero_to_fp32.py``):

- ZeRO 1/2: per parameter group, each rank's ``single_partition_of_fp32_groups[g]`` is a consecutive
  piece of one flat vector holding the group's parameters in ``param_shapes[g]`` order (plus
  ``param_alignment_paddings``).
- ZeRO 3: every parameter is split into ``ceil(numel / world)`` pieces, rank r's piece lying at the
  same offset of its ``fp32_flat_groups[g]``; the last piece is zero-padded.
- stage 0 (no ZeRO optimizer files): the full state dict in rank 0's model-states file.
- a universal checkpoint (``ds_to_universal``): one fp32 file per parameter.

Buffers (BatchNorm statistics) come from rank 0's model-states file; EMA weights from the engine's
per-rank state files (see ``engine/train/ema.py``). The model config of a tag: ``checkpoint_model_config``.
The file names: ``engine/checkpoint/layout.py``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from biomedgpt.engine.checkpoint import layout
from biomedgpt.engine.checkpoint.layout import MODEL_FILE_RE, OPTIM_FILE_RE, is_tag_dir, list_tags, resolve_tag_dir
from biomedgpt.models.checkpoint import TIED_ALIASES, TIED_KEY, CheckpointError
from biomedgpt.models.config import DATA_FIELDS, ModelConfig, ModelSpec, spec_from_saved

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Top-level keys DeepSpeed itself writes into a model-states file; anything else is the client state.
DS_MODEL_KEYS = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
                 "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
                 "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size",
                 "checkpoint_parallel_dimensions", "ds_config", "ds_version", "universal_checkpoint_info"}


# ----------------------------------------------------------------------------------------------
# Checkpoint files: weights-only, tensors read where they lie
# ----------------------------------------------------------------------------------------------


class CheckpointFile:
    """One ``torch.save`` file of a tag, unpickled weights-only onto the meta device (a file that refers
    to anything else is refused, nothing in it runs; no tensor byte is read). ``byte_range`` says where
    a tensor's elements lie in the file, ``read_into`` copies bytes from there into a buffer (``os.preadv``:
    no mapping, so nothing of the file stays resident). The file stays open: one deleted meanwhile
    (pruned by a running job) is still read."""

    def __init__(self, path: str | Path):
        from biomedgpt.engine.checkpoint.load import load_checkpoint_file

        if sys.byteorder != "little":  # torch.save writes little-endian; the meta load does not swap
            raise CheckpointError(f"{path}: reading checkpoints needs a little-endian host")
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            self._fd = None  # load_checkpoint_file names the problem (missing, unreadable)
        else:
            weakref.finalize(self, os.close, self._fd)
        self.obj = load_checkpoint_file(self.path, meta=True)

    def byte_range(self, tensor: Tensor, start: int, count: int) -> tuple[int, int]:
        """(offset in the file, byte count) of ``count`` elements of ``tensor`` (a meta tensor of this file,
        read as a flat vector) from element ``start``."""
        offset = getattr(tensor.untyped_storage(), "_checkpoint_offset", None)
        if offset is None or not tensor.is_contiguous():
            raise CheckpointError(f"{self.path}: a tensor torch did not place in the file (not read with "
                                  f"CheckpointFile?)")
        if start < 0 or start + count > tensor.numel():
            raise CheckpointError(f"{self.path}: read {start}+{count} past a tensor of {tensor.numel()}")
        return offset + (tensor.storage_offset() + start) * tensor.element_size(), count * tensor.element_size()

    def read_into(self, position: int, view: memoryview) -> None:
        """``len(view)`` bytes of the file from ``position``."""
        while len(view):
            count = os.preadv(self._fd, [view], position)
            if count == 0:
                raise CheckpointError(f"{self.path}: ends inside a tensor (truncated); copy the file again")
            view, position = view[count:], position + count


# ----------------------------------------------------------------------------------------------
# A checkpoint tag: its files, ZeRO stage, world size, client state
# ----------------------------------------------------------------------------------------------


#: (file, byte offset in the file, byte count): one piece of a tensor's stored bytes
Segment = tuple[CheckpointFile, int, int]


@dataclass
class ParamSource:
    """One output tensor: its shape and dtype, and where its values lie: the bytes of ``segments`` in turn
    (the tensor in ``stored`` dtype; the consolidation index records them), or - for values that are not
    stored as they are read (a LoRA merge, a universal checkpoint's file opened when read) - ``compute``."""

    shape: tuple[int, ...]
    dtype: torch.dtype  # of the tensor ``read`` returns
    segments: list[Segment] = field(default_factory=list)
    stored: torch.dtype | None = None  # of the bytes in ``segments`` (default: ``dtype``)
    compute: Callable[..., Tensor] | None = None  # compute(buffer=None)

    def __post_init__(self) -> None:
        if self.stored is None:
            self.stored = self.dtype

    @property
    def copyable(self) -> bool:
        """The output is the stored bytes as they are (no computation, no cast)."""
        return self.compute is None and self.stored == self.dtype

    def read(self, buffer: Tensor | None = None) -> Tensor:
        """The tensor, in ``buffer`` (a flat uint8 tensor reused from tensor to tensor) when it fits."""
        if self.compute is not None:
            return self.compute(buffer)
        return _read_segments(self.segments, self.shape, self.stored, buffer).to(self.dtype)


#: (file, saved meta tensor, first element, number of elements): one piece of an output tensor's values
Piece = tuple[CheckpointFile, Tensor, int, int]


def _segments(pieces: list[Piece], numel: int, dtype: torch.dtype, origin: str) -> list[Segment]:
    """Where ``numel`` values of ``dtype`` taken from the pieces in turn lie (surplus padding dropped)."""
    segments, pos = [], 0
    for source, tensor, start, count in pieces:
        count = min(count, numel - pos)
        if count <= 0:
            break
        if tensor.dtype != dtype:
            raise CheckpointError(f"{source.path}: holds {tensor.dtype} values where {dtype} ones belong")
        segments.append((source, *source.byte_range(tensor, start, count)))
        pos += count
    if pos != numel:
        raise CheckpointError(f"{origin}: only {pos} of {numel} values found")
    return segments


def _stored(pieces: list[Piece], shape: tuple[int, ...], origin: str, stored: torch.dtype | None = None,
            dtype: torch.dtype | None = None) -> ParamSource:
    """A tensor of ``shape`` made of the pieces' values, stored as ``stored`` (default: the first piece's
    dtype), read as ``dtype`` (default: as stored)."""
    stored = stored or pieces[0][1].dtype
    return ParamSource(tuple(shape), dtype or stored, _segments(pieces, math.prod(shape), stored, origin), stored)


def _read_segments(segments: list[Segment], shape: tuple[int, ...], dtype: torch.dtype,
                   buffer: Tensor | None = None) -> Tensor:
    """Concatenate the segments' bytes into one tensor of ``shape``, in ``buffer`` (a flat uint8 tensor
    reused from tensor to tensor) when it is large enough."""
    nbytes = math.prod(shape) * dtype.itemsize
    out = buffer[:nbytes] if buffer is not None and buffer.numel() >= nbytes else torch.empty(nbytes, dtype=torch.uint8)
    view = memoryview(out.numpy())
    pos = 0
    for source, offset, count in segments:
        source.read_into(offset, view[pos:pos + count])
        pos += count
    return out.view(dtype).view(shape)


def canonical_name(name: str) -> str:
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
    def partitioned(self) -> bool:
        """Its optimizer state is split across the ranks that wrote it (ZeRO 1-3, not converted to universal):
        it loads only into the same layout, and DeepSpeed's ``zero_to_fp32`` reads it."""
        return self.stage != 0 and not self.universal

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
            if name in buffers or not isinstance(value, Tensor) or canonical_name(name) in seen:
                continue
            seen.add(canonical_name(name))
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
            sources = {canonical_name(n): self._whole(module[n], self.model_files[0])
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
        return {canonical_name(n): self._whole(module[n], self.model_files[0]) for n in names}

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
        shapes = {canonical_name(n): s for g in self.param_shapes() for n, s in g.items()}
        # Partitioned (ZeRO-3): rank r holds piece r of each parameter, as the ZeRO-3 optimizer does.
        shards = [(source, ema["shadow"])]
        if ema["partitioned"]:
            shards += [self._rank_ema(r) for r in range(1, self.world_size)]
        sources = {}
        for name in ema["shadow"]:
            shape = shapes.get(canonical_name(name))
            if shape is None:
                raise CheckpointError(f"{first}: EMA of {name!r}, which the checkpoint has no parameter for")
            pieces = [(file, shard[name], 0, shard[name].numel()) for file, shard in shards]
            sources[canonical_name(name)] = _stored(pieces, shape, str(first), dtype=torch.float32)
        return sources

    def _rank_ema(self, rank: int) -> tuple[CheckpointFile, dict[str, Tensor]]:
        path = self.directory / layout.rank_state_file(rank)
        source = CheckpointFile(path)
        try:
            return source, source.obj["ema"]["shadow"]
        except (KeyError, TypeError):
            raise CheckpointError(f"{path}: no EMA shard although rank 0 has one") from None

    @staticmethod
    def _whole(tensor: Tensor, source: CheckpointFile, shape: tuple[int, ...] | None = None) -> ParamSource:
        """A saved tensor as it is (as ``shape``: the same number of values)."""
        return _stored([(source, tensor, 0, tensor.numel())], shape or tuple(tensor.shape), str(source.path))

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
                pieces, base = [], 0
                for file, part in parts:
                    lo, hi = max(offset, base), min(offset + numel, base + part.numel())
                    if lo < hi:
                        pieces.append((file, part, lo - base, hi - lo))
                    base += part.numel()
                sources[canonical_name(name)] = _stored(pieces, shape, str(self.optim_files[0].path), torch.float32)
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
                pieces = [(file, flat, offset, piece) for file, flat in flats]
                sources[canonical_name(name)] = _stored(pieces, shape, str(self.optim_files[0].path), torch.float32)
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
                pieces = [(mf, mf.obj["frozen_param_fragments"][name], 0,
                           mf.obj["frozen_param_fragments"][name].numel()) for mf in self.model_files]
                sources[canonical_name(name)] = _stored(pieces, shape, str(self.model_files[0].path))
            else:
                saved = self.model_state["frozen_param_fragments"][name]
                sources[canonical_name(name)] = self._whole(saved, self.model_files[0], shape)
        return sources

    def _universal_sources(self) -> dict[str, ParamSource]:
        sources = {}
        for group in self.param_shapes():
            for name, shape in group.items():
                path = self.directory / layout.UNIVERSAL_PARAMS_DIR / name / layout.UNIVERSAL_PARAM_FILE
                sources[canonical_name(name)] = ParamSource(  # one file per parameter: opened when read
                    shape, torch.float32,
                    compute=lambda buffer=None, p=path, s=shape: _universal_tensor(p, s, buffer))
        return sources


def _universal_tensor(path: Path, shape: tuple[int, ...], buffer: Tensor | None = None) -> Tensor:
    source = CheckpointFile(path)
    saved = source.obj.get("param") if isinstance(source.obj, dict) else source.obj
    if not isinstance(saved, Tensor) or saved.numel() < math.prod(shape) or saved.dtype != torch.float32:
        raise CheckpointError(f"{path}: no fp32 tensor of {math.prod(shape)} values")
    return _stored([(source, saved, 0, saved.numel())], shape, str(path)).read(buffer)


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


def open_checkpoint(path: str | Path, tag: str | None = None, check_other_files: bool = True) -> ZeroCheckpoint:
    """Find, parse (pickles only) and cross-check every rank file of a tag; errors name the file.
    ``check_other_files``: also read the tag's other ``.pt`` files weights-only (before DeepSpeed's tools
    unpickle them); off for a tag this process has just written."""
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
    if check_other_files:
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
    if is_tag_dir(path):
        yield path.name, path
        return
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    for tag in list_tags(root):
        yield tag, root / tag
