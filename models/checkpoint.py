"""Checkpoints: this project's model directories, and import of released fairseq / HF-port weights.

A model directory is self-describing: ``config.json`` (ModelConfig), ``model.safetensors`` (or shards
``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``) and ``tokenizer/``. The tied
embedding is stored once, as ``embed_tokens.weight``. Its file names, shard planner and atomic publish
(torch-free) are ``biomedgpt.models.model_dir``'s, re-exported here.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from biomedgpt.models.config import ModelConfig
from biomedgpt.models.model_dir import (TIED_ALIASES, TIED_KEY, WEIGHTS_INDEX, WEIGHTS_PATTERN, CheckpointError,
                                        plan_shards, write_config, write_dir_atomically, write_shard_index)
from biomedgpt.models.ofa import BiomedGPT


class UnsafeCheckpointError(CheckpointError):
    """A pickled file that refers to something weights-only loading does not allow (it could run code)."""


# Deterministic buffers and bookkeeping keys a released file may carry: recomputed, never trusted.
IGNORED_KEY = re.compile(r"(^|\.)(token_rp_bucket|image_rp_bucket|image_position_idx|version|_float_tensor)$")
# HF-port component names inside a layer -> fairseq names (see docs/architecture.md, "Checkpoint names").
HF_ENCODER_LAYER = {"self_attn_mid_layer_norm": "attn_ln", "ffn_layer_norm": "ffn_layernorm"}
HF_DECODER_LAYER = {"self_attn_mid_layer_norm": "self_attn_ln", "cross_attn_mid_layer_norm": "cross_attn_ln",
                    "cross_attn_layer_norm": "encoder_attn_layer_norm", "cross_attn": "encoder_attn",
                    "ffn_layer_norm": "ffn_layernorm"}
HF_MARKERS = ("self_attn_mid_layer_norm", "ffn_layer_norm", "cross_attn_mid_layer_norm")


# ----------------------------------------------------------------------------------------------
# Reading released files
# ----------------------------------------------------------------------------------------------


def _sniff_torch_file(path: Path, zip_only: bool = False) -> None:
    """A file torch.save wrote (a zip archive with a data.pkl, or - unless ``zip_only`` - a legacy pickle),
    else a one-line error that says what the file is not - before any unpickling, so junk is never called
    unsafe."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read: {exc}") from None
    if head == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise CheckpointError(f"{path}: truncated or corrupt PyTorch checkpoint (its zip directory is "
                                  f"unreadable: {exc}); copy or download the file again") from None
        if not any(n.endswith("data.pkl") for n in names):
            raise CheckpointError(f"{path}: not a checkpoint (a zip archive without torch.save's data.pkl); "
                                  f"pass the released .pt, .bin or .safetensors file")
        return
    if zip_only and head[:1] == b"\x80":
        raise CheckpointError(f"{path}: a legacy-format torch.save file, which training checkpoints never are "
                              f"(they are zip archives)")
    if head[:1] != b"\x80":  # every torch.save pickle (legacy format) starts with the PROTO opcode
        raise CheckpointError(f"{path}: not a checkpoint at all (neither a torch.save archive, a pickle nor "
                              f"safetensors; it begins with bytes {head.hex()}); pass the released .pt, .bin "
                              f"or .safetensors file")


def _numpy_globals() -> list:
    """numpy's array and scalar reconstructors and dtype, under the module names numpy 1 and 2 pickle
    them with (a fairseq file's logged values, a numpy RNG state). They build arrays, never call code."""
    import numpy as np

    core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    found = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), type(np.dtype(np.float64)), type(np.dtype(np.int64))]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        found += [(core._reconstruct, f"{module}._reconstruct"), (core.scalar, f"{module}.scalar")]
    return found


#: What a released fairseq / HF-port file may hold besides tensors and plain containers.
RELEASED_GLOBALS = [argparse.Namespace]


def load_weights_only(path: str | Path, allowed: list | tuple = (), mmap: bool = False, meta: bool = False) -> Any:
    """``torch.load(weights_only=True)`` under ``safe_globals(allowed)`` (plus numpy's reconstructors):
    nothing in the file can run code. ``mmap``: tensors stay in the file, mapped, until read. ``meta``:
    tensors on the meta device, nothing read (torch notes where each storage lies in the file:
    ``tensor.untyped_storage()._checkpoint_offset``).

    Errors are one line naming the file: junk, truncated, or a global that is not allowed (named)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    _sniff_torch_file(path, zip_only=mmap or meta)
    allowed = [*_numpy_globals(), *allowed]
    try:
        with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. "pickle protocol 4": the refusal says more
            return torch.load(path, map_location="meta" if meta else "cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        reason = str(exc)
        if "Weights only load failed" not in reason:
            raise CheckpointError(f"{path}: truncated or corrupt PyTorch checkpoint (its pickle does not parse: "
                                  f"{reason.splitlines()[0]}); copy or download the file again") from None
        raise UnsafeCheckpointError(f"{path}: {_refusal(path, allowed, reason)}, which no checkpoint needs: "
                                    f"not loaded (unpickling it could run code)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: truncated or corrupt PyTorch checkpoint ({str(exc).splitlines()[0]}); "
                              f"copy or download the file again") from None


def _refusal(path: Path, allowed: list, reason: str) -> str:
    """What weights-only loading refused: the globals the pickle names that are not allowed (read
    statically, nothing executed), else torch's reason."""
    names = set()
    try:
        with torch.serialization.safe_globals(allowed):
            names = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except (ValueError, RuntimeError, OSError, pickle.UnpicklingError):
        pass  # a legacy (non-zip) file: torch's message names the global
    if not names:
        names = set(re.findall(r"GLOBAL (\S+?)(?: was| whose|$)", reason, flags=re.M)) or _stack_globals(path)
    if names:
        return f"refers to {', '.join(sorted(names))}"
    lines = [line.strip() for line in reason.splitlines() if line.strip() and "weights_only" not in line
             and "Weights only" not in line and not line.strip().startswith(("(1)", "(2)", "Check the"))]
    return f"holds what weights-only loading refuses ({lines[-1] if lines else 'unknown reason'})"


def _stack_globals(path: Path) -> set[str]:
    """The globals a protocol-4+ pickle names with STACK_GLOBAL (which weights-only loading refuses
    outright, so torch names none), read statically from the archive's data.pkl."""
    try:
        with zipfile.ZipFile(path) as archive:
            data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
        strings: list[str] = []  # the strings pushed so far (module and name precede a STACK_GLOBAL)
        memo: dict[int, str | None] = {}
        names, last = set(), None
        for op, arg, _ in pickletools.genops(data):
            if "UNICODE" in op.name:
                strings.append(arg)
            elif op.name == "MEMOIZE":
                memo[len(memo)] = strings[-1] if last is not None and "UNICODE" in last else None
            elif op.name.endswith("PUT"):
                memo[arg] = strings[-1] if last is not None and "UNICODE" in last else None
            elif op.name.endswith("GET") and memo.get(arg) is not None:
                strings.append(memo[arg])
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.add(f"{strings[-2]}.{strings[-1]}")
            last = op.name
        return names
    except (zipfile.BadZipFile, OSError, StopIteration, ValueError):
        return set()


def read_state_dict(path: str | Path, ema: bool = False) -> dict[str, Tensor]:
    """The weights of a released file: a fairseq checkpoint (``model`` or ``extra_state.ema``), a plain
    state dict (.pt/.bin), a .safetensors file, or a directory holding one of those. Pickled files are
    read weights-only (``RELEASED_GLOBALS``): a crafted file runs nothing, it is refused."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / n for n in ("model.safetensors", "pytorch_model.bin", "checkpoint.pt")]
        found = next((c for c in candidates if c.exists()), None)
        if found is None:
            raise CheckpointError(f"{path}: no model.safetensors, pytorch_model.bin or checkpoint.pt inside")
        path = found
    if not path.exists():
        raise CheckpointError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}") from None
    try:
        obj = load_weights_only(path, RELEASED_GLOBALS)
    except UnsafeCheckpointError as exc:
        raise UnsafeCheckpointError(f"{exc}; if you trust the file, save its weights alone where you trust it "
                              f"(torch.save(torch.load(f, weights_only=False)['model'], 'weights.pt')) and "
                              f"import that") from None
    if isinstance(obj, dict) and "checkpoint" in obj and isinstance(obj["checkpoint"], dict):
        obj = obj["checkpoint"]  # a wrapper holding a fairseq checkpoint (e.g. a parity fixture)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        if ema:
            state = obj.get("extra_state", {}).get("ema") if isinstance(obj.get("extra_state"), dict) else None
            if not isinstance(state, dict):
                raise CheckpointError(f"{path}: EMA weights requested but extra_state.ema is missing")
            return state
        return obj["model"]
    if ema:
        raise CheckpointError(f"{path}: EMA weights requested but this is a plain state dict")
    if isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        return obj
    raise CheckpointError(f"{path}: neither a fairseq checkpoint (with 'model') nor a state dict of tensors")


def collection_tokenizer_dir(path: str | Path) -> Path | None:
    """``path`` itself when it is a downloaded HF-port collection directory (``config.json`` with model_type
    "ofa", ``pytorch_model.bin`` or ``model.safetensors``, and its BPE as ``vocab.json`` + ``merges.txt``);
    None for any other source (a file, or a directory without ``vocab.json``)."""
    path = Path(path)
    if not path.is_dir() or not (path / "vocab.json").is_file():
        return None
    config = path / "config.json"
    if config.is_file():
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
            raise CheckpointError(f"{config}: not a JSON object ({exc}); download the file again") from None
        if model_type not in (None, "ofa"):
            raise CheckpointError(f"{config}: model_type {model_type!r} is not an OFA/BiomedGPT collection "
                                  f"(expected \"ofa\"); pass the released weights of BiomedGPT or OFA")
    if not (path / "merges.txt").is_file():
        raise CheckpointError(f"{path}: vocab.json without merges.txt; download both tokenizer files, or pass "
                              f"tokenizer= a BPE folder")
    return path


def to_fairseq_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Normalise key names: strip wrapper prefixes, map HF-port names, drop recomputed buffers."""
    keys = list(state)
    for prefix in ("module.", "_orig_mod.", "model."):
        if keys and all(k.startswith(prefix) for k in keys):
            state = {k[len(prefix):]: v for k, v in state.items()}
            keys = list(state)
    hf = any(marker in k for k in keys for marker in HF_MARKERS)
    out = {}
    for key, value in state.items():
        if IGNORED_KEY.search(key):
            continue
        if hf:
            match = re.match(r"^(encoder|decoder)\.layers\.(\d+)\.([^.]+)\.(.*)$", key)
            if match:
                side, idx, part, rest = match.groups()
                table = HF_ENCODER_LAYER if side == "encoder" else HF_DECODER_LAYER
                key = f"{side}.layers.{idx}.{table.get(part, part)}.{rest}"
        out[key] = value
    return out


def _shape(state: dict[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"key {key!r} is missing: cannot infer the architecture")
    return tuple(state[key].shape)


def _count_indexed(state: dict[str, Tensor], pattern: str) -> int:
    found = {int(m.group(1)) for k in state for m in [re.match(pattern, k)] if m}
    return max(found) + 1 if found else 0


def infer_config(state: dict[str, Tensor], **overrides) -> ModelConfig:
    """The architecture from tensor shapes (fairseq names): width, heads, depths, backbone, tables."""
    vocab, d = _shape(state, "encoder.embed_tokens.weight")
    heads = _shape(state, "encoder.layers.0.self_attn.c_attn")[0]
    ffn = _shape(state, "encoder.layers.0.fc1.weight")[0]
    resnet = [_count_indexed(state, rf"^encoder\.embed_images\.layer{i}\.(\d+)\.") for i in (1, 2, 3)]
    image_rows = _shape(state, "encoder.embed_image_positions.weight")[0]
    bucket = int(round((image_rows - 1) ** 0.5))
    if bucket * bucket + 1 != image_rows:
        raise CheckpointError(f"encoder.embed_image_positions.weight has {image_rows} rows, not n*n+1")
    fields = dict(
        d_model=d, ffn_dim=ffn, heads=heads, vocab_size=vocab, resnet_layers=resnet,
        encoder_layers=_count_indexed(state, r"^encoder\.layers\.(\d+)\."),
        decoder_layers=_count_indexed(state, r"^decoder\.layers\.(\d+)\."),
        max_source_positions=_shape(state, "encoder.embed_positions.weight")[0] - 2,
        max_target_positions=_shape(state, "decoder.embed_positions.weight")[0] - 2,
        token_bucket_size=(_shape(state, "encoder.token_rel_pos_table_list.0.weight")[0] + 1) // 2,
        image_bucket_size=bucket,
    )
    fields.update(overrides)
    try:
        return ModelConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"inferred architecture is invalid: {exc}") from None


def tie_embeddings(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Collapse the three embedding copies into ``embed_tokens.weight``; they must agree in shape."""
    state = dict(state)
    copies = {k: state.pop(k) for k in (TIED_KEY, *TIED_ALIASES) if k in state}
    if not copies:
        raise CheckpointError(f"no token embedding: none of {[TIED_KEY, *TIED_ALIASES]} present")
    shapes = {k: tuple(v.shape) for k, v in copies.items()}
    if len(set(shapes.values())) > 1:
        raise CheckpointError(f"tied embedding copies disagree in shape: {shapes}")
    state[TIED_KEY] = next(iter(copies.values()))
    return state


def load_into(model: BiomedGPT, state: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Strict load with one clear error listing every missing, unexpected or wrong-shape key."""
    check_fits({k: tuple(v.shape) for k, v in model.state_dict().items()},
               {k: tuple(v.shape) for k, v in state.items()}, source)
    with torch.no_grad():
        params = dict(model.state_dict(keep_vars=True))
        for key, value in state.items():
            params[key].copy_(value.to(params[key].dtype))


def check_fits(expected: dict[str, tuple], found: dict[str, tuple], source: str = "checkpoint") -> None:
    """One clear error listing every missing, unexpected or wrong-shape key (``expected``: the model's
    state-dict shapes, tied aliases included; ``found``: the checkpoint's)."""
    expected = {k: v for k, v in expected.items() if k not in TIED_ALIASES}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{k}: checkpoint {found[k]} vs model {expected[k]}"
             for k in sorted(set(found) & set(expected)) if found[k] != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:20]}{' …' if len(missing) > 20 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:20]}{' …' if len(unexpected) > 20 else ''}")
    if wrong:
        problems.append(f"wrong shapes [{'; '.join(wrong[:20])}]")
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(problems))


def import_released(path: str | Path, ema: bool = False, **config_overrides) -> BiomedGPT:
    """A released BiomedGPT/OFA checkpoint (fairseq or HF-port names) as an fp32 BiomedGPT."""
    state = tie_embeddings(to_fairseq_names(read_state_dict(path, ema=ema)))
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    state["encoder.embed_tokens.weight"] = state[TIED_KEY]  # infer_config reads the fairseq name
    cfg = infer_config(state, **config_overrides)
    del state["encoder.embed_tokens.weight"]
    model = BiomedGPT(cfg)
    load_into(model, state, source=str(path))
    return model


# ----------------------------------------------------------------------------------------------
# This project's model directories
# ----------------------------------------------------------------------------------------------


def model_state(model: BiomedGPT) -> dict[str, Tensor]:
    """State dict with the tied embedding once (safetensors refuses shared storage)."""
    return {k: v for k, v in model.state_dict().items() if k not in TIED_ALIASES}


def write_model_files(directory: Path, state: dict[str, Tensor], cfg: ModelConfig, tokenizer=None,
                      max_shard_bytes: int = 2 << 30) -> None:
    """Write config, safetensors weights (sharded past ``max_shard_bytes``) and tokenizer into ``directory``."""
    write_config(directory, cfg)
    plan = plan_shards({k: t.numel() * t.element_size() for k, t in state.items()}, max_shard_bytes)
    for filename, keys in plan.filename_to_tensors.items():
        save_file({k: state[k].contiguous() for k in keys}, directory / filename, metadata={"format": "pt"})
    write_shard_index(directory, plan)
    if tokenizer is not None:
        tokenizer.save(directory / "tokenizer")


def save_pretrained(model: BiomedGPT, out_dir: str | Path, tokenizer=None, dtype: torch.dtype | None = None,
                    max_shard_bytes: int = 2 << 30, overwrite: bool = False) -> Path:
    """Write a model directory atomically (optionally cast floating tensors to ``dtype``)."""
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu()
             for k, v in model_state(model).items()}
    return write_dir_atomically(Path(out_dir), lambda d: write_model_files(d, state, model.cfg, tokenizer,
                                                                            max_shard_bytes), overwrite)


def read_model_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    from biomedgpt.core.config import ConfigError, from_dict, read_json

    data = read_json(path, CheckpointError, "not a model directory")

    try:
        return from_dict(ModelConfig, data)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def model_weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a model directory (one, or the shards its index names)."""
    model_dir = Path(model_dir)
    index = model_dir / WEIGHTS_INDEX
    return ([model_dir / WEIGHTS_PATTERN.format(suffix="")] if not index.exists()
            else [model_dir / n for n in sorted(set(json.loads(index.read_text())["weight_map"].values()))])


def read_model_weights(model_dir: str | Path) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    for f in model_weight_files(model_dir):
        state.update(read_state_dict(f))
    return state


def load_pretrained(model_dir: str | Path, **config_overrides) -> BiomedGPT:
    """A model directory written by ``save_pretrained`` (or the consolidation tool), in fp32."""
    cfg = dataclasses.replace(read_model_config(model_dir), **config_overrides)
    model = BiomedGPT(cfg)
    state = {k: v.float() if v.is_floating_point() else v for k, v in read_model_weights(model_dir).items()}
    load_into(model, state, source=str(model_dir))
    return model
