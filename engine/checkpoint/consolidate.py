"""A ZeRO checkpoint tag as a model directory (``biomedgpt.models.checkpoint`` layout), streamed tensor by
tensor into safetensors files.

Each output tensor is read from the ranks' files (``engine/checkpoint/zero_reader.py``), cast, hashed
(xxh3-128, kept in ``consolidation.json`` for ``verify``) and written before the next one is read, so
memory is about the largest tensor. The safetensors header is written first (every shape is known up
front), then each tensor's bytes straight from its buffer; the files are split into shards by
huggingface_hub's planner (``models/model_dir.plan_shards``), and the directory appears complete, fsynced,
or not at all (``core/durable.py``).

``consolidation_index`` records where each tensor of the default output lies, for the checkpoint manager
to write beside a tag: ``engine/checkpoint/consolidation_index.py`` then makes the same directory from
those bytes without torch (the header, report and metadata writers are shared).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from biomedgpt.engine.checkpoint.consolidation_index import (DTYPE_SIZES, INDEX_DTYPES, ConsolidationResult,
                                                             TokenizerJob, checksum, consolidation_report,
                                                             index_document, safetensors_header, start_writeback,
                                                             write_all, write_model_directory)
from biomedgpt.engine.checkpoint.zero_reader import (ParamSource, ZeroCheckpoint, checkpoint_model_config,
                                                     open_checkpoint)
from biomedgpt.models.checkpoint import TIED_ALIASES, CheckpointError, plan_shards
from biomedgpt.models.precision import torch_dtype
from biomedgpt.models.config import ModelConfig
from biomedgpt.models.ofa import BiomedGPT

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
assert all(DTYPE_SIZES[name] == dtype.itemsize for dtype, name in SAFETENSORS_DTYPES.items())


def tensor_bytes(tensor: Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


class _SkipInitialisation(TorchFunctionMode):
    """Module construction without PyTorch's default initialisation (the in-place fills of ``torch.nn.init``
    and ``Tensor``): parameters are allocated and never written, so their memory is never paged in."""

    OPS = frozenset({"normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
                     "xavier_uniform_", "xavier_normal_", "zero_", "zeros_", "ones_", "fill_", "constant_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) in self.OPS:
            return args[0] if args else next(iter(kwargs.values()))
        return func(*args, **kwargs)


def expected_state(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Keys, shapes and dtypes of a model directory for ``cfg`` (kept per config: a run's every save asks
    for its consolidation index). Built on the CPU without initialisation (no parameter is paged in; the
    buffers are computed): on the meta device torch would run the buffers' arithmetic through its Python
    reference kernels, whose first use imports ``torch._dynamo`` (seconds, more than the rest of a
    consolidation)."""
    return dict(_expected_state(json.dumps(dataclasses.asdict(cfg), sort_keys=True)))


@functools.lru_cache(maxsize=4)
def _expected_state(cfg_json: str) -> tuple[tuple[str, tuple[tuple[int, ...], torch.dtype]], ...]:
    with _SkipInitialisation():
        model = BiomedGPT(ModelConfig(**json.loads(cfg_json)))
    return tuple((k, (tuple(v.shape), v.dtype)) for k, v in model.state_dict().items() if k not in TIED_ALIASES)


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
    return {key: dataclasses.replace(found[parts[0]], segments=[], compute=lambda buffer=None, key=key: produce(key))
            for key, parts in plan.items()}


def consolidation_index(tag_dir: Path, step: int) -> dict | None:
    """The consolidation index of a tag whose files are all written (``consolidation_index.py``): where each
    tensor of its default output lies. None where that output is not the stored bytes as they are (LoRA
    adapters to merge, bf16 weights to cast, a universal checkpoint's file per parameter)."""
    ckpt = open_checkpoint(tag_dir, check_other_files=False)  # written by this job a moment ago
    run_cfg = ckpt.client_state.get("config")
    lora = run_cfg.get("lora") if isinstance(run_cfg, dict) else None
    if ckpt.universal or (isinstance(lora, dict) and lora.get("enabled")):
        return None
    cfg = checkpoint_model_config(ckpt)
    sources = weight_sources(ckpt, cfg)
    if not all(s.copyable and SAFETENSORS_DTYPES.get(s.dtype) in INDEX_DTYPES for s in sources.values()):
        return None
    paths = {file.path for s in sources.values() for file, _, _ in s.segments}
    files = {path.name: path.stat().st_size for path in paths}
    run_tokenizer = None
    if isinstance(run_cfg, dict):
        run_tokenizer = {key: run_cfg.get(key) for key in ("tokenizer", "bpe_dir")}
        if not all(v is None or isinstance(v, str) for v in run_tokenizer.values()):
            raise CheckpointError(f"the run config's tokenizer settings are not paths: {run_tokenizer}")
    return index_document(ckpt.tag, step, ckpt.stage, ckpt.world_size, dataclasses.asdict(cfg), run_tokenizer, files,
                          [(name, s.shape, SAFETENSORS_DTYPES[s.dtype], [(f.path.name, offset, count)
                                                                          for f, offset, count in s.segments])
                           for name, s in sources.items()])




def write_safetensors_streaming(path: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]],
                                produce: Callable[[str], Tensor], on_tensor: Callable[[int], None] = lambda n: None
                                ) -> dict[str, str]:
    """A safetensors file written tensor by tensor (header first: shapes are known up front); each
    tensor's checksum. Memory: one tensor at a time. Not fsynced here: the directory is, when published."""
    digests = {}
    with open(path, "wb", buffering=0) as f, ThreadPoolExecutor(1) as hasher:
        write_all(f, memoryview(safetensors_header([(n, s, SAFETENSORS_DTYPES[d]) for n, s, d in entries])))
        written = f.tell()
        for name, shape, dtype in entries:
            tensor = produce(name)
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise CheckpointError(f"{name}: produced {tuple(tensor.shape)} {tensor.dtype}, "
                                      f"expected {shape} {dtype}")
            data = tensor_bytes(tensor)
            digest = hasher.submit(checksum, data)  # hashed while written (both release the GIL)
            write_all(f, data)
            digests[name] = digest.result()  # before the next tensor reuses the buffer
            on_tensor(tensor.numel() * dtype.itemsize)
            del tensor, data
            written = start_writeback(f, written)
    return digests


def consolidate(ckpt: ZeroCheckpoint, output: str | Path, cfg: ModelConfig, dtype: str = "fp32",
                ema: bool = False, tokenizer=None, max_shard_bytes: int = 2 << 30, overwrite: bool = False,
                progress: bool = True, verify_output: bool = False, merge_lora: bool = False) -> ConsolidationResult:
    """Write a model directory (``biomedgpt.models.checkpoint`` layout) from ``ckpt``, streaming, atomically;
    ``verify_output`` runs ``verify.verify`` against DeepSpeed's reconstruction before the directory appears.
    ``tokenizer``: saved beside the weights; a function that returns one (or None: no tokenizer) runs on a
    thread while the key list is built and the tensors stream (parsing a BPE is Python work; its errors
    stop the consolidation before the directory appears, and come first, as if it had been made first)."""
    with TokenizerJob(tokenizer) as job:
        return _consolidate(ckpt, output, cfg, dtype, ema, job, max_shard_bytes, overwrite, progress, verify_output,
                            merge_lora)


def _consolidate(ckpt, output, cfg, dtype, ema, job: TokenizerJob, max_shard_bytes, overwrite, progress,
                 verify_output, merge_lora) -> ConsolidationResult:
    if verify_output and ema:
        raise CheckpointError("verification compares with DeepSpeed's zero_to_fp32, which knows no EMA weights")
    out_dtype = torch_dtype(dtype)
    if verify_output and merge_lora:
        raise CheckpointError("verification compares tensor by tensor with zero_to_fp32, which holds the adapters "
                              "unmerged: verify=true and merge_lora=true do not go together")
    sources = weight_sources(ckpt, cfg, ema=ema, merge_lora=merge_lora)
    dtypes = {k: out_dtype if s.dtype.is_floating_point else s.dtype for k, s in sources.items()}
    plan = plan_shards({k: math.prod(s.shape) * dtypes[k].itemsize for k, s in sources.items()}, max_shard_bytes)
    # every tensor is read into this one buffer (its bytes, before any cast): no allocation per tensor
    buffer = torch.empty(max(math.prod(s.shape) * s.stored.itemsize for s in sources.values()), dtype=torch.uint8)

    def produce(name: str) -> Tensor:
        return sources[name].read(buffer).to(dtypes[name])

    def write_file(path: Path, names: list[str], on_bytes: Callable[[int], None]) -> dict[str, str]:
        return write_safetensors_streaming(path, [(n, sources[n].shape, dtypes[n]) for n in names], produce, on_bytes)

    def verify_before_publish(directory: Path) -> None:
        from biomedgpt.engine.checkpoint.verify import verify

        verify(directory, ckpt)

    return write_model_directory(
        output, plan, cfg, job, ckpt.tag, write_file,
        lambda digests: consolidation_report(ckpt.directory, ckpt.tag, ckpt.step, ckpt.stage, ckpt.world_size,
                                             ckpt.universal, dtype, ema, merge_lora, digests),
        len(sources), overwrite, progress, verify_before_publish if verify_output else None)

