"""Export a model directory for Hugging Face: stock ``transformers`` (format=transformers) or the names of the
released BiomedGPT HF-port weights (format=ofa, the default).

    biomedgpt export-hf model=models/demo output=export/demo-hf [dtype=bf16]
    biomedgpt export-hf model=runs/vqa_rad/best output=export/vqa-rad format=transformers [image_size=384]

format=transformers writes a directory that ``transformers`` loads with no ``biomedgpt`` installed
(``AutoConfig`` / ``AutoModelForSeq2SeqLM`` / ``AutoTokenizer`` / ``AutoImageProcessor.from_pretrained(dir,
trust_remote_code=True)``): the project's own plain-PyTorch model modules are copied in with their imports made
relative (``BUNDLED_MODULES``) beside ``tools/hf_templates``' configuration and modeling files, so its logits and
``generate()`` tokens are this project's; see ``write_transformers``.

format=ofa: the HF port (OFA's ``transformers`` fork) renames some layer parts (``attn_ln`` ->
``self_attn_mid_layer_norm``, ``encoder_attn`` -> ``cross_attn``, ...; the tables are
``biomedgpt.models.checkpoint.HF_ENCODER_LAYER`` / ``HF_DECODER_LAYER``, used here in reverse) and stores the tied
embedding under all three of its names. Output: ``model.safetensors`` + an OFA-style ``config.json``
(+ ``tokenizer/`` copied when present); ``biomedgpt.models.checkpoint.import_released`` reads it back.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from safetensors.torch import save_file
from tokenizers.processors import TemplateProcessing
from torch import Tensor

from biomedgpt.core.config import PathStr, parse_cli
from biomedgpt.models.checkpoint import (HF_DECODER_LAYER, HF_ENCODER_LAYER, TIED_ALIASES, TIED_KEY, CheckpointError,
                               write_dir_atomically, read_model_config, read_model_weights)
from biomedgpt.models.config import GenerationConfig, ModelConfig, Precision
from biomedgpt.models.precision import torch_dtype
from biomedgpt.models.tokenizer import BOS, EOS, MASK, PAD, UNK, Tokenizer, TokenizerError, load_any_tokenizer
from biomedgpt.tools.cli import one_line_errors

TO_HF = {"encoder": {v: k for k, v in HF_ENCODER_LAYER.items()},
         "decoder": {v: k for k, v in HF_DECODER_LAYER.items()}}
RESNET_TYPES = {(3, 4, 6): "resnet50", (3, 4, 23): "resnet101", (3, 8, 36): "resnet152"}
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
TEMPLATES_DIR = Path(__file__).resolve().parent / "hf_templates"
#: the project's model modules written into a transformers export (they import only torch and each other)
BUNDLED_MODULES = ("config", "kernels", "attention", "ofa", "generation")
TEMPLATES = ("configuration_biomedgpt", "modeling_biomedgpt")
#: top-level packages a bundled module may import: a transformers user has these (and the standard library)
ALLOWED_IMPORTS = frozenset({"torch", "transformers"})
AUTO_MAP = {"AutoConfig": "configuration_biomedgpt.BiomedGPTConfig",
            "AutoModelForSeq2SeqLM": "modeling_biomedgpt.BiomedGPTForConditionalGeneration"}


@dataclass
class ExportConfig:
    model: PathStr  # a model directory (biomedgpt.tools.consolidate / save_pretrained)
    output: PathStr
    dtype: Optional[Precision] = None  # default: as stored
    overwrite: bool = False
    # ofa: the released HF-port names (OFA's transformers fork); transformers: stock transformers with the
    # modeling code inside (trust_remote_code=True)
    format: Literal["ofa", "transformers"] = "ofa"
    image_size: int = 256  # format=transformers: the fine-tuning patch_image_size the image processor resizes to
    tokenizer: Optional[str] = None  # format=transformers without model/tokenizer/: GPT-2 files or a BART dir

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"image_size must be at least 16 pixels, got {self.image_size}")


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


def export(model_dir: str | Path, output: str | Path, dtype: str | None = None, overwrite: bool = False,
           format: str = "ofa", image_size: int = 256, tokenizer: str | None = None) -> Path:
    model_dir = Path(model_dir)
    cfg = read_model_config(model_dir)
    state = read_model_weights(model_dir)
    if dtype is not None:
        state = {k: v.to(torch_dtype(dtype)) if v.is_floating_point() else v for k, v in state.items()}
    if format == "transformers":
        tok = _export_tokenizer(model_dir, tokenizer)
        if tok.vocab_size != cfg.vocab_size:
            raise CheckpointError(f"{model_dir}: the embedding has {cfg.vocab_size} rows but the tokenizer "
                                  f"({tok.source}) has {tok.vocab_size} ids; pass tokenizer= the model's BPE")
        return write_dir_atomically(Path(output), lambda d: write_transformers(d, state, cfg, tok, image_size),
                                    overwrite)
    hf_state = {k: v.contiguous() for k, v in to_hf_names(state).items()}

    def write(directory: Path) -> None:
        save_file(hf_state, directory / "model.safetensors", metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps(hf_config(cfg), indent=2))
        if (model_dir / "tokenizer").is_dir():
            shutil.copytree(model_dir / "tokenizer", directory / "tokenizer")

    return write_dir_atomically(Path(output), write, overwrite)


# ---- format=transformers --------------------------------------------------------------------------------


def _export_tokenizer(model_dir: Path, path: str | None) -> Tokenizer:
    """The model directory's own tokenizer, else ``path`` (a saved tokenizer, GPT-2 files or a BART dir), else
    the packaged BPE."""
    try:
        if (model_dir / "tokenizer").is_dir():
            return Tokenizer.load(model_dir / "tokenizer")
        return load_any_tokenizer(path)
    except TokenizerError as exc:
        raise CheckpointError(str(exc)) from None


def bundled_source(name: str) -> str:
    """``models/<name>.py`` for an export: ``biomedgpt.models.X`` imports made relative, and top-level
    functions that reach the rest of the package (e.g. the run-config reader) left out. Raises if what is
    left imports anything a plain transformers install lacks."""
    path = MODELS_DIR / f"{name}.py"
    source = path.read_text().replace("from biomedgpt.models.", "from .")
    lines = source.splitlines(keepends=True)
    for node in reversed(ast.parse(source).body):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and any(
                isinstance(n, ast.ImportFrom) and (n.module or "").startswith("biomedgpt") for n in ast.walk(node)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            del lines[start:node.end_lineno]
    source = "".join(lines)
    for node in ast.walk(ast.parse(source)):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
        for imported in names:
            top = imported.split(".")[0]
            if top not in ALLOWED_IMPORTS and top not in sys.stdlib_module_names and top != "__future__":
                raise CheckpointError(f"{path}:{node.lineno}: imports {imported!r}, which an exported model "
                                      f"cannot: only {sorted(ALLOWED_IMPORTS)} and the standard library")
    return source


def transformers_config(cfg: ModelConfig) -> dict:
    """config.json: every ModelConfig field (inductor compilation off: a user's choice), auto_map to the code."""
    fields = dict(dataclasses.asdict(cfg), compile=False)
    return {"architectures": ["BiomedGPTForConditionalGeneration"], "model_type": "biomedgpt",
            "auto_map": AUTO_MAP, **fields, "bos_token_id": 0, "pad_token_id": cfg.pad_id, "eos_token_id": 2,
            "decoder_start_token_id": 0, "is_encoder_decoder": True, "torch_dtype": "float32"}


def generation_config(search: GenerationConfig = GenerationConfig()) -> dict:
    """generation_config.json: the project's default search in transformers' names."""
    return {"num_beams": search.beam_size, "max_new_tokens": search.max_len, "min_new_tokens": search.min_len,
            "length_penalty": search.len_penalty, "no_repeat_ngram_size": search.no_repeat_ngram_size,
            "do_sample": False, "bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2,
            "decoder_start_token_id": 0}


def image_processor_config(cfg: ModelConfig, image_size: int) -> dict:
    """preprocessor_config.json: PIL bicubic resize of the whole image to the patch size (as the data
    pipeline, ``data.images``), then ``(x / 255 - mean) / std`` with the model's training normalisation."""
    return {"image_processor_type": "ViTImageProcessor", "do_resize": True,
            "size": {"height": image_size, "width": image_size}, "resample": 3, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(cfg.image_mean),
            "image_std": list(cfg.image_std), "do_convert_rgb": True}


def write_tokenizer_files(directory: Path, tokenizer: Tokenizer) -> None:
    """tokenizer.json (+ vocab.json / merges.txt, BART style) for ``AutoTokenizer``: the same ids as
    ``tokenizer.encode`` for text, with ``<s> ... </s>`` around it as the project's source sequences."""
    from transformers import PreTrainedTokenizerFast

    backend = tokenizer.backend()
    backend.post_processor = TemplateProcessing(single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} {EOS} $B {EOS}",
                                                special_tokens=[(BOS, tokenizer.bos_id), (EOS, tokenizer.eos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, mask_token=MASK, model_max_length=1024)
    fast.save_pretrained(str(directory))
    vocab = {tokenizer.id_to_token(i): i for i in range(tokenizer.vocab_size)}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text(tokenizer.merges_text())


def model_card(cfg: ModelConfig, parameters: int, image_size: int) -> str:
    return f"""---
license: apache-2.0
library_name: transformers
pipeline_tag: image-text-to-text
tags: [biomedgpt, ofa, medical, vision-language, custom_code]
---
# BiomedGPT ({parameters / 1e6:.1f}M parameters)

An OFA/BiomedGPT encoder-decoder (d_model {cfg.d_model}, {cfg.encoder_layers}+{cfg.decoder_layers} layers,
{cfg.heads} heads, ResNet blocks {cfg.resnet_layers}) exported by `biomedgpt export-hf format=transformers`.
Tasks it may have been trained on: visual question answering, captioning / report generation, visual
grounding (location tokens `<bin_i>`), image classification, summarization, natural language inference.

```python
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForSeq2SeqLM, AutoTokenizer

model = AutoModelForSeq2SeqLM.from_pretrained(DIR, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(DIR)
images = AutoImageProcessor.from_pretrained(DIR, use_fast=False)  # PIL bicubic to {image_size} px, as in training
inputs = tokenizer([" what modality is shown?"], return_tensors="pt")
pixels = images(Image.open("scan.png"), return_tensors="pt").pixel_values
tokens = model.generate(inputs.input_ids, pixels, num_beams=5, max_new_tokens=30)
print(tokenizer.batch_decode(tokens, skip_special_tokens=True))
```

The modeling code in this directory is BiomedGPT's own (`ofa.py`, `attention.py`, ...) and `generate()` runs
its beam search, so the tokens equal `biomedgpt infer`'s on the same weights and prompt. The prompt must be
written as the model was fine-tuned (see the project's `biomedgpt.data.tasks`). The tokenizer gives the
project's ids, `<mask>`, `<code_i>` and `<bin_j>` written in text included; one difference: `<s>`, `</s>`,
`<pad>`, `<unk>` written literally in text are special tokens here, ordinary text in the project.

## Licence
The code and weights format are under the Apache License 2.0 (BiomedGPT, OFA). The weights were trained on
data sets with their own licences and terms of use (e.g. MIMIC-CXR and other PhysioNet data under the
PhysioNet Credentialed Health Data License, ROCO, VQA-RAD, SLAKE, PathVQA, MedMNIST); using the weights
means accepting those terms. Not for clinical use.
"""


def write_transformers(directory: Path, state: dict[str, Tensor], cfg: ModelConfig, tokenizer: Tokenizer,
                       image_size: int) -> None:
    """The files of a format=transformers export into ``directory``."""
    for name in BUNDLED_MODULES:
        (directory / f"{name}.py").write_text(bundled_source(name))
    for name in TEMPLATES:
        shutil.copyfile(TEMPLATES_DIR / f"{name}.py", directory / f"{name}.py")
    weights = {f"model.{k}": v.contiguous() for k, v in state.items()}
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(transformers_config(cfg), indent=2))
    (directory / "generation_config.json").write_text(json.dumps(generation_config(), indent=2))
    (directory / "preprocessor_config.json").write_text(json.dumps(image_processor_config(cfg, image_size),
                                                                   indent=2))
    write_tokenizer_files(directory, tokenizer)
    parameters = sum(v.numel() for k, v in state.items() if "running_" not in k and "num_batches" not in k)
    (directory / "README.md").write_text(model_card(cfg, parameters, image_size))


@one_line_errors(CheckpointError)
def main(argv: list[str] | None = None) -> int:
    cfg = parse_cli(ExportConfig, argv, description=__doc__)
    out = export(cfg.model, cfg.output, cfg.dtype, cfg.overwrite, cfg.format, cfg.image_size, cfg.tokenizer)
    kind = "stock transformers, trust_remote_code=True" if cfg.format == "transformers" else "HF-port names"
    print(f"{cfg.model} -> {out} ({kind})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
