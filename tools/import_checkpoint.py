"""Import a released BiomedGPT / OFA checkpoint into this project's model directory.

    python -m biomedgpt.tools.import_checkpoint source=biomedgpt_base.pt output=models/biomedgpt-base \
        [ema=true] [dtype=bf16]

Accepts fairseq checkpoints (``model`` or ``extra_state.ema``), HF-port state dicts (.bin /
.safetensors / a directory), and a downloaded HF-port collection directory (``config.json`` with model_type
"ofa", ``pytorch_model.bin`` or ``model.safetensors``, ``vocab.json`` + ``merges.txt``), whose tokenizer is
then the one imported. The architecture is inferred from tensor shapes; the output is ``config.json`` +
safetensors + ``tokenizer/``, written atomically. Pickled files are read weights-only (tensors, containers,
``argparse.Namespace``, numpy values): a file holding anything else is refused with one line naming it,
never unpickled.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from biomedgpt.core.config import PathStr, parse_cli
from biomedgpt.models.checkpoint import CheckpointError, collection_tokenizer_dir, import_released, save_pretrained
from biomedgpt.models.config import Precision
from biomedgpt.models.ofa import count_parameters
from biomedgpt.models.precision import torch_dtype
from biomedgpt.models.tokenizer import load_any_tokenizer
from biomedgpt.tools.cli import one_line_errors


@dataclass
class ImportConfig:
    """Import a released checkpoint (fairseq or HF-port names) into a model directory."""

    source: PathStr
    output: PathStr
    # GPT-2 files, a BART dir or a saved tokenizer; None: the source directory's vocab.json + merges.txt (a downloaded
    # collection), else the packaged GPT-2 BPE
    tokenizer: Optional[str] = None
    ema: bool = False
    dtype: Precision = "fp32"
    overwrite: bool = False


def run(cfg: ImportConfig) -> Path:
    tokenizer_path = cfg.tokenizer if cfg.tokenizer is not None else collection_tokenizer_dir(cfg.source)
    tokenizer = load_any_tokenizer(tokenizer_path)
    model = import_released(cfg.source, ema=cfg.ema)
    if model.cfg.vocab_size != tokenizer.vocab_size:
        raise CheckpointError(f"{cfg.source}: embedding has {model.cfg.vocab_size} rows but the tokenizer at "
                              f"{tokenizer_path or 'the packaged GPT-2 BPE'} has {tokenizer.vocab_size} ids")
    out = save_pretrained(model, cfg.output, tokenizer, dtype=torch_dtype(cfg.dtype), overwrite=cfg.overwrite)
    c = model.cfg
    print(f"imported {cfg.source}{' (EMA)' if cfg.ema else ''}: d_model={c.d_model} ffn={c.ffn_dim} "
          f"layers={c.encoder_layers}+{c.decoder_layers} heads={c.heads} resnet={c.resnet_layers} "
          f"params={count_parameters(model) / 1e6:.2f}M, tokenizer from {tokenizer_path or 'the packaged GPT-2 BPE'} "
          f"-> {out}")
    return out


@one_line_errors(CheckpointError)
def main(argv: list[str] | None = None) -> int:
    run(parse_cli(ImportConfig, argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
