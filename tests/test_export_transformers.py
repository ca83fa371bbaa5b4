"""``export-hf format=transformers``: stock transformers, in a process that cannot import biomedgpt, loads the
export and gives this project's logits and generated tokens; ``import-checkpoint`` reads the downloaded-collection
layout (config.json + pytorch_model.bin + vocab.json / merges.txt)."""
from __future__ import annotations

import ast
import json
import os
import site
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from biomedgpt.models.checkpoint import import_released, load_pretrained, save_pretrained
from biomedgpt.models.generation import GenerationConfig, generate
from biomedgpt.models.tokenizer import Tokenizer
from biomedgpt.tools import export_hf, import_checkpoint
from small_models import build

IMAGE_SIZE = 48
PROMPTS = [" what modality is shown in <bin_7> the image?", " is there an abnormality?"]
DECODER_INPUT = [0, 99, 16, 1437, 58460, 259]
SEARCHES = {"greedy": 1, "beam3": 3}
MAX_NEW_TOKENS = 6

# Runs in a fresh interpreter: no .pth files (the editable biomedgpt install is one), only the site-packages
# folders on sys.path, the current folder outside the repository.
STOCK_TRANSFORMERS = r"""
import json, sys
sys.path.extend(json.loads(sys.argv[1]))
try:
    import biomedgpt
except ModuleNotFoundError:
    pass
else:
    raise SystemExit(f"biomedgpt is importable here: {biomedgpt.__path__}")
import numpy as np, torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModelForSeq2SeqLM, AutoTokenizer

export, images, prompts, decoder_input, searches, max_new, out = json.loads(sys.argv[2])
config = AutoConfig.from_pretrained(export, trust_remote_code=True)
model = AutoModelForSeq2SeqLM.from_pretrained(export, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(export)
processor = AutoImageProcessor.from_pretrained(export, use_fast=False)
inputs = tokenizer(prompts, return_tensors="pt", padding=True)
pixels = processor([Image.open(p) for p in images], return_tensors="pt").pixel_values
with torch.no_grad():
    logits = model(inputs.input_ids, pixels, decoder_input_ids=torch.tensor([decoder_input] * len(prompts))).logits
tokens = {name: model.generate(inputs.input_ids, pixels, num_beams=beams, max_new_tokens=max_new).tolist()
          for name, beams in searches.items()}
torch.save({"config": type(config).__name__, "model": type(model).__name__, "input_ids": inputs.input_ids,
            "logits": logits, "tokens": tokens, "num_beams": model.generation_config.num_beams}, out)
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A seeded small model with the full released vocabulary, saved and exported, and two source images."""
    root = tmp_path_factory.mktemp("export")
    model = build(vocab_size=59457, image_mean=[0.48, 0.46, 0.41], image_std=[0.27, 0.26, 0.28])
    noise = torch.Generator().manual_seed(3)
    with torch.no_grad():  # decoder weights far from init: searches that differ per image and between greedy / beam
        for name, param in model.named_parameters():
            if name.startswith("decoder.layers") and param.dim() == 2:
                param.add_(torch.randn(param.shape, generator=noise) * 0.5)
    save_pretrained(model, root / "model", Tokenizer.from_gpt2_files())
    assert export_hf.main([f"model={root / 'model'}", f"output={root / 'hf'}", "format=transformers",
                           f"image_size={IMAGE_SIZE}"]) == 0
    rng = np.random.default_rng(0)
    images = []
    for i, (h, w) in enumerate([(61, 70), (52, 40)]):
        path = root / f"image{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        images.append(path)
    return root, images


def project_inputs(root, images):
    """What ``biomedgpt infer`` feeds the model: ``<s> prompt </s>`` ids, uint8 images resized as data.images does
    (PIL bicubic, whole image), the model normalising them with its config's mean / std."""
    tokenizer = Tokenizer.load(root / "model" / "tokenizer")
    rows = [[tokenizer.bos_id] + tokenizer.encode(p) + [tokenizer.eos_id] for p in PROMPTS]
    src = torch.full((len(rows), max(map(len, rows))), tokenizer.pad_id)
    for i, row in enumerate(rows):
        src[i, :len(row)] = torch.tensor(row)
    pixels = [np.asarray(Image.open(p).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC))
              for p in images]
    return src, torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()


def test_stock_transformers_without_biomedgpt_matches_the_project(exported, tmp_path):
    root, images = exported
    out = tmp_path / "stock.pt"
    job = [str(root / "hf"), [str(p) for p in images], PROMPTS, DECODER_INPUT, SEARCHES, MAX_NEW_TOKENS, str(out)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", STOCK_TRANSFORMERS, json.dumps(site.getsitepackages()),
                           json.dumps(job)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stock = torch.load(out)
    assert (stock["config"], stock["model"]) == ("BiomedGPTConfig", "BiomedGPTForConditionalGeneration")

    model = load_pretrained(root / "model").eval()
    src, pixels = project_inputs(root, images)
    assert torch.equal(stock["input_ids"], src)  # the exported tokenizer gives the project's ids
    with torch.no_grad():
        logits = model(src, torch.tensor([DECODER_INPUT] * len(PROMPTS)), pixels)
    diff = (stock["logits"] - logits).abs().max().item()
    print(f"max |logits - project's| = {diff:.2e}")
    assert diff <= 1e-5
    for name, beams in SEARCHES.items():
        hyps = generate(model, src, pixels, cfg=GenerationConfig(beam_size=beams, max_len=MAX_NEW_TOKENS))
        expected = [[0] + h[0].tokens + ([2] if h[0].finished else []) for h in hyps]
        got = [[t for t in row if t != 1] for row in stock["tokens"][name]]
        print(f"{name}: stock {got} project {expected}")
        assert got == expected, name
        assert len({tuple(row) for row in got}) == len(PROMPTS), "the two images should give different tokens"
    assert stock["num_beams"] == GenerationConfig().beam_size  # generation_config.json holds the project's search


def test_bundled_modules_import_nothing_but_torch_and_transformers(exported):
    root, _ = exported
    export = root / "hf"
    config = json.loads((export / "config.json").read_text())
    assert config["auto_map"]["AutoModelForSeq2SeqLM"] == "modeling_biomedgpt.BiomedGPTForConditionalGeneration"
    for name in export_hf.BUNDLED_MODULES:
        tree = ast.parse((export / f"{name}.py").read_text())
        absolute = {(n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0] for n in ast.walk(tree)
                    if isinstance(n, ast.Import) or (isinstance(n, ast.ImportFrom) and not n.level) for a in n.names}
        assert absolute <= {"torch", "transformers"} | set(sys.stdlib_module_names), (name, absolute)
        assert "spec_from_saved" not in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    processor = json.loads((export / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": IMAGE_SIZE, "width": IMAGE_SIZE} and processor["resample"] == 3
    assert processor["image_mean"] == [0.48, 0.46, 0.41] and processor["image_std"] == [0.27, 0.26, 0.28]
    assert Tokenizer.from_bart_dir(export) == Tokenizer.load(root / "model" / "tokenizer")  # vocab.json, merges.txt
    card = (export / "README.md").read_text()
    assert "Apache License 2.0" in card and "M parameters" in card


def test_import_of_the_downloaded_collection_layout(tmp_path, capsys):
    """config.json (model_type ofa) + pytorch_model.bin under the HF-port names + vocab.json / merges.txt imports
    with its own tokenizer, to the logits of the same weights imported from a fairseq file."""
    model = build(vocab_size=59457).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fairseq = tmp_path / "fairseq.pt"
    torch.save({"model": state}, fairseq)

    collection = tmp_path / "collection"
    collection.mkdir()
    hf_state = export_hf.to_hf_names({k: v for k, v in state.items() if k not in
                                      ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                                       "decoder.output_projection.weight")})
    torch.save(hf_state, collection / "pytorch_model.bin")
    (collection / "config.json").write_text(json.dumps(export_hf.hf_config(model.cfg)))
    Tokenizer.from_gpt2_files().save(tmp_path / "bpe")
    (collection / "vocab.json").write_bytes((tmp_path / "bpe" / "vocab.json").read_bytes())
    merges = (tmp_path / "bpe" / "merges.txt").read_text().splitlines(keepends=True)
    (collection / "merges.txt").write_text("".join(merges[:-1]))  # one merge fewer: a BPE told apart from the packaged
    tokenizer = Tokenizer.from_bart_dir(collection)
    assert tokenizer != Tokenizer.from_gpt2_files()

    assert import_checkpoint.main([f"source={collection}", f"output={tmp_path / 'from_collection'}"]) == 0
    assert import_checkpoint.main([f"source={fairseq}", f"output={tmp_path / 'from_fairseq'}"]) == 0
    assert f"tokenizer from {collection}" in capsys.readouterr().out
    assert Tokenizer.load(tmp_path / "from_collection" / "tokenizer") == tokenizer

    torch.manual_seed(1)
    src = torch.randint(4, 1000, (2, 7))
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    prev = torch.randint(4, 1000, (2, 5))
    with torch.no_grad():
        a = load_pretrained(tmp_path / "from_collection").eval()(src, prev, images)
        b = load_pretrained(tmp_path / "from_fairseq").eval()(src, prev, images)
        c = model(src, prev, images)
    diff = (a - b).abs().max().item()
    print(f"collection vs fairseq import: max |d logits| = {diff:.2e}")
    assert diff == 0
    torch.testing.assert_close(a, c, rtol=0, atol=1e-5)  # and they are the weights that were written


def test_collection_directory_that_is_not_ofa_or_lacks_merges_is_one_line(tmp_path, capsys):
    folder = tmp_path / "downloaded"
    folder.mkdir()
    (folder / "vocab.json").write_text("{}")
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert import_checkpoint.main([f"source={folder}", f"output={tmp_path / 'out'}"]) == 1
    assert f"{folder / 'config.json'}: model_type 'bert'" in capsys.readouterr().err
    (folder / "config.json").write_text(json.dumps({"model_type": "ofa"}))
    assert import_checkpoint.main([f"source={folder}", f"output={tmp_path / 'out'}"]) == 1
    assert "vocab.json without merges.txt" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
