"""The compact parity cases of tests/fixtures: weights, checkpoint files and inputs rebuilt from a seed.

A case file (``parity_fairseq_mini.pt``, ``parity_hf_small.pt``) holds no weights, only a manifest, a seed
and a slice of the reference implementation's output (OFA HF port, fp32, eval mode). This module follows
the recipe of the fixtures README ("Compact parity cases") to rebuild, bit for bit:

- the weights: one CPU ``torch.Generator`` seeded once, the manifest walked in order, one whole-tensor
  ``torch.rand``/``torch.randn`` draw per row, the first matching of seven rules, float32 arithmetic,
  an fp16 round trip, then the tied aliases;
- the checkpoint file, in either naming: fairseq (``{"model": state}``) or the HF port's
  (``pytorch_model.bin`` with the deterministic int64 buffers), BatchNorm counters in both;
- the inputs: a second generator seeded with seed + 1.

``compare`` measures a model's logits against the stored reference at the valid decoder positions.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import Tensor

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CASES = {"fairseq_mini": "parity_fairseq_mini.pt", "hf_small": "parity_hf_small.pt"}
NAMINGS = ("fairseq", "hf")
BIN_IDS = (58467, 58957, 59157, 59456)  # <bin_10>, <bin_500>, <bin_700>, <bin_999> at source positions 3..6
TOKEN_BUCKET, MAX_POSITIONS, IMAGE_BUCKET = 256, 1024, 42
TOL = 1e-5

# Inside a layer: fairseq component name -> HF-port name (architecture.md, "Checkpoint names").
FAIRSEQ_TO_HF = {
    "encoder": {"attn_ln": "self_attn_mid_layer_norm", "ffn_layernorm": "ffn_layer_norm"},
    "decoder": {"self_attn_ln": "self_attn_mid_layer_norm", "cross_attn_ln": "cross_attn_mid_layer_norm",
                "encoder_attn": "cross_attn", "encoder_attn_layer_norm": "cross_attn_layer_norm",
                "ffn_layernorm": "ffn_layer_norm"},
}
HF_TO_FAIRSEQ = {side: {v: k for k, v in table.items()} for side, table in FAIRSEQ_TO_HF.items()}
LAYER_KEY = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.([^.]+)\.(.*)$")


def load_case(name: str) -> dict:
    """A case file by short name (``fairseq_mini``, ``hf_small``) or file name."""
    return torch.load(FIXTURES / CASES.get(name, name), weights_only=True)


def rename(state: dict[str, Tensor], source: str, target: str) -> dict[str, Tensor]:
    """Key names from one naming (``fairseq`` / ``hf``) to the other; values (and order) unchanged."""
    if source == target:
        return dict(state)
    tables = FAIRSEQ_TO_HF if (source, target) == ("fairseq", "hf") else HF_TO_FAIRSEQ
    out = {}
    for key, value in state.items():
        m = LAYER_KEY.match(key)
        if m:
            side, idx, part, rest = m.groups()
            key = f"{side}.layers.{idx}.{tables[side].get(part, part)}.{rest}"
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------

_F32 = torch.float32


def _affine(draw: Tensor, scale: float, offset: float | None = None) -> Tensor:
    """scale * draw (+ offset) in float32: the scale rounded to float32, the product rounded, then the add."""
    out = torch.mul(draw, torch.tensor(scale, dtype=_F32))
    if offset is not None:
        out = torch.add(out, torch.tensor(offset, dtype=_F32))
    return out


def draw_weight(name: str, shape: list[int], g: torch.Generator) -> Tensor:
    """One manifest row: exactly one whole-tensor draw, the first matching rule, then an fp16 round trip."""
    leaf = name.rsplit(".", 1)[-1]
    one_d = len(shape) == 1

    def randn() -> Tensor:
        return torch.randn(shape, generator=g, dtype=_F32)

    if "running_var" in name:
        value = torch.add(torch.rand(shape, generator=g, dtype=_F32), torch.tensor(0.5, dtype=_F32))
    elif "running_mean" in name:
        value = _affine(randn(), 0.1)
    elif one_d and leaf == "weight":
        value = _affine(randn(), 0.1, 1.0)
    elif one_d and leaf == "bias":
        value = _affine(randn(), 0.1)
    elif leaf == "c_attn":
        value = _affine(randn(), 0.2, 1.0)
    elif "rel_pos_table" in name:
        value = _affine(randn(), 0.5)
    else:
        value = _affine(randn(), 0.05)
    assert value.dtype == _F32 and list(value.shape) == list(shape), (name, value.dtype, value.shape)
    return value.half().float()


def build_weights(case: dict) -> dict[str, Tensor]:
    """Every floating-point tensor of the case, in manifest order and naming, plus the tied aliases."""
    g = torch.Generator(device="cpu")
    g.manual_seed(case["seed"])
    state = {name: draw_weight(name, shape, g) for name, shape in case["manifest"]}
    for alias, target in case["tied"].items():
        state[alias] = state[target].clone()
    return state


# ----------------------------------------------------------------------------------------------
# The deterministic int64 buffers of the HF-port files
# ----------------------------------------------------------------------------------------------


def token_rp_bucket(b: int = TOKEN_BUCKET, positions: int = MAX_POSITIONS) -> Tensor:
    """[M, M]: offset(i - j) + b - 1, log-spaced beyond |r| > b/2 (README formula, float64)."""
    m = b // 2
    idx = torch.arange(positions, dtype=torch.float64)
    r = idx[:, None] - idx[None, :]
    absr = r.abs()
    far = m + torch.ceil(torch.log(absr.clamp(min=1) / m) / math.log((positions - 1) / m) * (m - 1))
    offset = torch.where(absr <= m, r, torch.sign(r) * far)
    return (offset + b - 1).to(torch.int64)


def image_rp_bucket(g: int = IMAGE_BUCKET) -> Tensor:
    """[g*g+1, g*g+1]: the relative (row, column) offset of two grid cells; slot 0 the special token."""
    n = (2 * g - 1) ** 2 + 3
    cells = torch.arange(g * g)
    rows, cols = cells // g, cells % g
    grid = (rows[:, None] - rows[None, :] + g - 1) * (2 * g - 1) + (cols[:, None] - cols[None, :] + g - 1)
    out = torch.empty(g * g + 1, g * g + 1, dtype=torch.int64)
    out[1:, 1:] = grid
    out[0, 1:] = n - 3
    out[1:, 0] = n - 2
    out[0, 0] = n - 1
    return out


def image_position_idx(g: int = IMAGE_BUCKET, side: int = 16, length: int = MAX_POSITIONS + 1) -> Tensor:
    """[1025]: 0, then 1 + g*r + c over a side x side grid (row-major), then 1024."""
    out = torch.full((length,), MAX_POSITIONS, dtype=torch.int64)
    out[0] = 0
    r, c = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    out[1:1 + side * side] = (1 + g * r + c).reshape(-1)
    return out


def hf_buffers() -> dict[str, Tensor]:
    token, image = token_rp_bucket(), image_rp_bucket()
    return {"encoder.token_rp_bucket": token, "decoder.token_rp_bucket": token.clone(),
            "encoder.image_rp_bucket": image, "decoder.image_rp_bucket": image.clone(),
            "decoder.image_position_idx": image_position_idx()}


# ----------------------------------------------------------------------------------------------
# Checkpoint files and inputs
# ----------------------------------------------------------------------------------------------


def checkpoint_state(case: dict, naming: str | None = None) -> dict[str, Tensor]:
    """The state a checkpoint file of ``naming`` (default: the case's own) holds, without file wrapping."""
    naming = naming or case["format"]
    state = rename(build_weights(case), case["format"], naming)
    for key in [k for k in state if k.endswith("running_mean")]:
        state[key[: -len("running_mean")] + "num_batches_tracked"] = torch.tensor(0, dtype=torch.int64)
    if naming == "hf":
        state.update(hf_buffers())
    return state


def write_checkpoint(case: dict, directory: Path, naming: str | None = None,
                     state: dict[str, Tensor] | None = None) -> Path:
    """The checkpoint file in ``naming`` (default: the case's own): fairseq ``{"model": state}`` as
    ``checkpoint.pt``, or the HF port's ``pytorch_model.bin``. Returns the file's path."""
    naming = naming or case["format"]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = checkpoint_state(case, naming) if state is None else state
    if naming == "fairseq":
        path = directory / "checkpoint.pt"
        torch.save({"model": state}, path)
    elif naming == "hf":
        path = directory / "pytorch_model.bin"
        torch.save(state, path)
    else:
        raise ValueError(f"unknown naming {naming!r}")
    return path


def build_inputs(case: dict) -> dict[str, Tensor]:
    """src_tokens, prev_output_tokens, patch_images, patch_masks from the second generator (seed + 1)."""
    spec = case["input_spec"]
    text_lens, tgt_lens = spec["text_lens"], spec["tgt_lens"]
    b = len(text_lens)
    g = torch.Generator(device="cpu")
    g.manual_seed(case["seed"] + 1)
    src = torch.ones(b, max(text_lens), dtype=torch.int64)
    prev = torch.ones(b, max(tgt_lens), dtype=torch.int64)
    for i, (s, t) in enumerate(zip(text_lens, tgt_lens)):
        src[i, 0] = 0
        src[i, 1:s - 1] = torch.randint(4, 50260, (s - 2,), generator=g)
        src[i, s - 1] = 2
        prev[i, 0] = 0
        prev[i, 1:t] = torch.randint(4, 50260, (t - 1,), generator=g)
    assert text_lens[0] >= 8
    src[0, 3:7] = torch.tensor(BIN_IDS)
    size = spec["image_size"]
    images = torch.randn(b, 3, size, size, generator=g, dtype=_F32)
    return dict(src_tokens=src, prev_output_tokens=prev, patch_images=images,
                patch_masks=torch.ones(b, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------
# Comparing
# ----------------------------------------------------------------------------------------------


def valid_positions(case: dict) -> Tensor:
    """[B, T] bool: decoder positions j < target_lengths[i]."""
    t = case["logits_subset"].shape[1]
    return torch.arange(t)[None, :] < case["target_lengths"][:, None]


def compare(logits: Tensor, case: dict) -> dict[str, float]:
    """The README's three measures at valid positions: max |logit - ref| over the kept columns,
    max |logsumexp - ref| over the full vocabulary, and the argmax agreement."""
    logits = logits.detach().float()
    valid = valid_positions(case)
    assert logits.shape[:2] == valid.shape, (tuple(logits.shape), tuple(valid.shape))
    subset = logits[..., case["vocab_ids"]]
    return {
        "logits": (subset - case["logits_subset"]).abs()[valid].max().item(),
        "logsumexp": (logits.logsumexp(-1) - case["logsumexp"]).abs()[valid].max().item(),
        "argmax": (logits.argmax(-1) == case["argmax"])[valid].float().mean().item(),
    }


def assert_holds(measured: dict[str, float], tol: float = TOL, what: str = "") -> None:
    assert measured["logits"] <= tol and measured["logsumexp"] <= tol and measured["argmax"] >= 0.999, \
        f"{what} parity fails: {measured}"


# ----------------------------------------------------------------------------------------------
# Built once per test session
# ----------------------------------------------------------------------------------------------


def other_naming(naming: str) -> str:
    return "hf" if naming == "fairseq" else "fairseq"


class ParityBuilds:
    """Each case's checkpoint files (both namings), import-tool outputs, inputs and forwards, built once
    per session under ``root`` and shared by every test that asks."""

    def __init__(self, root: Path, tokenizer_dir: Path):
        self.root, self.tokenizer_dir = Path(root), Path(tokenizer_dir)
        self._cache: dict = {}

    def _once(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def case(self, name: str) -> dict:
        return self._once(("case", name), lambda: load_case(name))

    def own_naming(self, name: str) -> str:
        return self.case(name)["format"]

    def inputs(self, name: str) -> dict[str, Tensor]:
        return self._once(("inputs", name), lambda: build_inputs(self.case(name)))

    def state(self, name: str, naming: str) -> dict[str, Tensor]:
        """The checkpoint state of ``naming`` (read-only: copy before changing it)."""
        return self._once(("state", name, naming), lambda: checkpoint_state(self.case(name), naming))

    def checkpoint(self, name: str, naming: str) -> Path:
        """The checkpoint file: ``<root>/<case>-<naming>/checkpoint.pt`` or ``.../pytorch_model.bin``."""
        return self._once(("checkpoint", name, naming), lambda: write_checkpoint(
            self.case(name), self.root / f"{name}-{naming}", naming, self.state(name, naming)))

    def imported(self, name: str, naming: str) -> Path:
        """The checkpoint of ``naming`` imported through ``biomedgpt.tools.import_checkpoint``."""
        def make():
            from biomedgpt.tools import import_checkpoint

            out = self.root / f"{name}-{naming}-imported"
            rc = import_checkpoint.main([f"source={self.checkpoint(name, naming)}", f"output={out}",
                                         f"tokenizer={self.tokenizer_dir}"])
            assert rc == 0, f"import_checkpoint failed for {name} ({naming} names)"
            return out
        return self._once(("imported", name, naming), make)

    def model(self, name: str, naming: str | None = None):
        """One shared eval-mode model per case (and naming), loaded from the import tool's output with the
        eager backend; switch backends with ``set_backend``. Do not change its weights."""
        from biomedgpt.models.checkpoint import load_pretrained

        naming = naming or self.own_naming(name)
        return self._once(("model", name, naming),
                          lambda: load_pretrained(self.imported(name, naming), attention_backend="eager").eval())

    def forward(self, name: str, model, key=None) -> Tensor:
        """Logits of ``model`` on the case's inputs; with ``key``, computed once per session under that key."""
        def run():
            with torch.no_grad():
                return model(**self.inputs(name))
        return run() if key is None else self._once(("forward", name, key), run)
