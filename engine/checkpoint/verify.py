"""Checks of a consolidated model directory: its tensors against the checksums it was written with, and
against an independent reference (DeepSpeed's own ``zero_to_fp32`` reconstruction, or the live model),
tensor by tensor and by a forward pass. ``biomedgpt consolidate verify=true`` runs it before the directory
is published.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from biomedgpt.engine.checkpoint.consolidate import tensor_bytes
from biomedgpt.engine.checkpoint.consolidation_index import CHECKSUM, checksum
from biomedgpt.engine.checkpoint.layout import REPORT_FILE
from biomedgpt.engine.checkpoint.zero_reader import ZeroCheckpoint, canonical_name
from biomedgpt.models.checkpoint import (TIED_ALIASES, CheckpointError, load_into, load_pretrained,
                                         model_weight_files, read_model_config, read_model_weights)
from biomedgpt.models.precision import torch_dtype
from biomedgpt.models.config import ModelConfig
from biomedgpt.models.ofa import BiomedGPT


def verify_checksums(model_dir: str | Path) -> int:
    """Re-hash every tensor of a consolidated directory against its ``consolidation.json``."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    report_path = model_dir / REPORT_FILE
    if not report_path.exists():
        raise CheckpointError(f"{report_path}: missing (not written by the consolidation tool)")
    report = json.loads(report_path.read_text())
    algorithm = next((a for a in (CHECKSUM, "sha256") if a in report), None)
    if algorithm is None:
        raise CheckpointError(f"{report_path}: no checksums ({CHECKSUM})")
    expected = report[algorithm]
    seen = 0
    for path in model_weight_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if expected.get(key) != checksum(tensor_bytes(f.get_tensor(key)), algorithm):
                    raise CheckpointError(f"{path}: tensor {key} does not match its checksum")
                seen += 1
    if seen != len(expected):
        raise CheckpointError(f"{model_dir}: {seen} tensors on disk, {len(expected)} in {REPORT_FILE}")
    return seen


def reference_state(ckpt: ZeroCheckpoint) -> dict[str, Tensor]:
    """DeepSpeed's own reconstruction (``zero_to_fp32``, all in memory): an independent reference."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not ckpt.partitioned:
        raise CheckpointError(f"{ckpt.directory}: DeepSpeed's zero_to_fp32 reads ZeRO 1-3 checkpoints only")
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.directory.parent), tag=ckpt.tag)
    return {canonical_name(k): v for k, v in state.items()}


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


