"""Export a model directory under the names of the released BiomedGPT HF-port weights.

    python -m biomedgpt.tools.export_hf model=models/demo output=export/demo-hf [dtype=bf16]

The HF port (OFA's ``transformers`` fork) renames some layer parts (``attn_ln`` ->
``self_attn_mid_layer_norm``, ``encoder_attn`` -> ``cross_attn``, ...; the tables are
``biomedgpt.models.checkpoint.HF_ENCODER_LAYER`` / ``HF_DECODER_LAYER``, used here in reverse) and stores the tied
embedding under all three of its names. Output: ``model.safetensors`` + an OFA-style ``config.json``
(+ ``tokenizer/`` copied when present); ``biomedgpt.models.checkpoint.import_released`` reads it back.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from safetensors.torch import save_file
from torch import Tensor

from biomedgpt.engine.config import PathStr, parse_cli
from biomedgpt.models.checkpoint import (HF_DECODER_LAYER, HF_ENCODER_LAYER, TIED_ALIASES, TIED_KEY, CheckpointError,
                               write_dir_atomically, read_model_config, read_model_weights)
from biomedgpt.models.config import ModelConfig
from biomedgpt.tools.zero_checkpoint import DTYPES

TO_HF = {"encoder": {v: k for k, v in HF_ENCODER_LAYER.items()},
         "decoder": {v: k for k, v in HF_DECODER_LAYER.items()}}
RESNET_TYPES = {(3, 4, 6): "resnet50", (3, 4, 23): "resnet101", (3, 8, 36): "resnet152"}


@dataclass
class ExportConfig:
    model: PathStr  # a model directory (biomedgpt.tools.consolidate / save_pretrained)
    output: PathStr
    dtype: Optional[Literal["fp32", "bf16", "fp16"]] = None  # default: as stored
    overwrite: bool = False


def to_hf_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our (fairseq) names -> HF-port names; the tied embedding becomes its three separate copies."""
    out = {}
    for key, value in state.items():
        if key == TIED_KEY:
            for alias in TIED_ALIASES:
                out[alias] = value.clone()  # safetensors refuses shared storage
            continue
        match = re.match(r"^(encoder|decoder)\.layers\.(\d+)\.([^.]+)\.(.*)$", key)
        if match:
            side, idx, part, rest = match.groups()
            key = f"{side}.layers.{idx}.{TO_HF[side].get(part, part)}.{rest}"
        out[key] = value
    return out


def hf_config(cfg: ModelConfig) -> dict:
    """An OFA-style ``config.json`` (the HF port's field names), plus this project's own config."""
    return {
        "architectures": ["OFAModel"], "model_type": "ofa", "vocab_size": cfg.vocab_size, "d_model": cfg.d_model,
        "encoder_layers": cfg.encoder_layers, "decoder_layers": cfg.decoder_layers,
        "encoder_attention_heads": cfg.heads, "decoder_attention_heads": cfg.heads,
        "encoder_ffn_dim": cfg.ffn_dim, "decoder_ffn_dim": cfg.ffn_dim,
        "max_position_embeddings": cfg.max_source_positions, "activation_function": "gelu",
        "dropout": cfg.dropout, "attention_dropout": cfg.attention_dropout,
        "activation_dropout": cfg.activation_dropout, "encoder_drop_path_rate": cfg.encoder_drop_path_rate,
        "decoder_drop_path_rate": cfg.decoder_drop_path_rate, "resnet_drop_path_rate": cfg.resnet_drop_path_rate,
        "resnet_type": RESNET_TYPES.get(tuple(cfg.resnet_layers), "custom"), "token_bucket_size": cfg.token_bucket_size,
        "image_bucket_size": cfg.image_bucket_size, "code_image_size": cfg.code_grid * 8,
        "attn_scale_factor": cfg.attn_scale_factor, "normformer": True, "layernorm_embedding": True,
        "patch_layernorm_embedding": True, "code_layernorm_embedding": True, "add_type_embedding": True,
        "share_decoder_input_output_embed": True, "share_input_output_embed": True,
        "pad_token_id": cfg.pad_id, "bos_token_id": 0, "eos_token_id": 2,
        "biomedgpt": dataclasses.asdict(cfg),
    }


def export(model_dir: str | Path, output: str | Path, dtype: str | None = None, overwrite: bool = False) -> Path:
    model_dir = Path(model_dir)
    cfg = read_model_config(model_dir)
    state = read_model_weights(model_dir)
    if dtype is not None:
        state = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}
    hf_state = {k: v.contiguous() for k, v in to_hf_names(state).items()}

    def write(directory: Path) -> None:
        save_file(hf_state, directory / "model.safetensors", metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps(hf_config(cfg), indent=2))
        if (model_dir / "tokenizer").is_dir():
            shutil.copytree(model_dir / "tokenizer", directory / "tokenizer")

    return write_dir_atomically(Path(output), write, overwrite)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_cli(ExportConfig, argv, description=__doc__)
    try:
        out = export(cfg.model, cfg.output, cfg.dtype, cfg.overwrite)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{cfg.model} -> {out} (HF-port names)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
