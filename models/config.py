"""Model sizes: every BiomedGPT/OFA size in one table, plus custom sizes for ablations."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Literal

CANONICAL_VOCAB_SIZE = 59457  # GPT-2 BPE in fairseq order + <mask> + 8192 codes + 1000 bins

#: Numeric precision of weights and computation (``biomedgpt.models.precision.torch_dtype`` gives the dtype).
Precision = Literal["fp32", "fp16", "bf16"]
AttentionBackend = Literal["auto", "eager", "sdpa", "flex", "flash", "chunked"]
PositionScheme = Literal["ofa", "rope"]


@dataclass
class ModelFields:
    """Architecture, regularisation and kernels of one encoder-decoder: the fields a run sets as ``model.*``.
    Field names follow OFA's args; the defaults are the ``tiny`` row of the size table."""

    d_model: int = 256  # hidden width of the encoder and decoder layers (size table)
    ffn_dim: int = 1024  # inner width of each layer's feed-forward block (size table)
    encoder_layers: int = 4  # transformer layers of the encoder (size table)
    decoder_layers: int = 4  # transformer layers of the decoder (size table)
    heads: int = 4  # attention heads per layer, d_model divisible by it (size table)
    resnet_layers: list[int] = field(default_factory=lambda: [3, 4, 6])  # ResNet stem blocks of layer1..3 (size table)
    vocab_size: int = CANONICAL_VOCAB_SIZE  # text BPE + <mask> + image codes + location bins
    pad_id: int = 1  # padding token id (fairseq's)
    max_source_positions: int = 1024  # rows of the encoder's absolute position table
    max_target_positions: int = 1024  # rows of the decoder's absolute position table
    token_bucket_size: int = 256  # relative text positions bucketed into this many distances
    image_bucket_size: int = 42  # relative 2-D image positions: grid side of the bucket table
    code_grid: int = 16  # decoder image-code window (code_image_size // 8 in OFA)
    attn_scale_factor: float = 2.0  # OFA's query scaling with decoupled position biases
    dropout: float = 0.1  # residual dropout (runtime: may change on resume)
    attention_dropout: float = 0.0  # dropout on attention probabilities (eager/sdpa only)
    activation_dropout: float = 0.0  # dropout after the FFN activation
    encoder_drop_path_rate: float = 0.0  # stochastic depth, rising linearly to this over encoder layers
    decoder_drop_path_rate: float = 0.0  # stochastic depth, rising linearly to this over decoder layers
    resnet_drop_path_rate: float = 0.0  # stochastic depth in the ResNet stem
    attention_backend: AttentionBackend = "auto"  # kernel: eager (reference), sdpa, chunked, flex, flash, auto
    position_scheme: PositionScheme = "ofa"  # ofa: released checkpoints' biases; rope: rotary, no additive bias
    rope_theta: float = 10000.0  # rotary base frequency (position_scheme rope)
    # Speed switches (engine/distributed/parallelize.py applies them; tests/test_default_path.py holds their numerics).
    # NHWC stem: off, because on some CPUs (this project's CI kind among them) oneDNN's channels-last fp32
    # weight gradient of the first convolution is ~7e-3 off an fp64 run where channels-first is ~2e-6; and no
    # CPU-time gain was measured (base 256 px batch 8: 0.98x)
    channels_last: bool = False  # NHWC ResNet stem (off: see the numerics note above)
    compile: bool | Literal["auto"] = "auto"  # inductor transformer layers; auto: on CUDA, parameters not partitioned

    def __post_init__(self) -> None:
        if self.d_model % self.heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by heads {self.heads}")
        if len(self.resnet_layers) != 3 or min(self.resnet_layers) < 1:
            raise ValueError(f"resnet_layers must be three positive block counts, got {self.resnet_layers}")
        if self.position_scheme == "rope" and self.head_dim % 4:
            raise ValueError(f"position_scheme rope needs head_dim ({self.head_dim}) divisible by 4 (2-D rotary pairs)")
        if self.attention_backend in ("flex", "chunked") and self.attention_dropout > 0:
            raise ValueError(f"attention_backend {self.attention_backend} has no attention dropout: set "
                             f"attention_dropout 0 or use sdpa")
        for name in ("encoder_layers", "decoder_layers", "heads", "ffn_dim", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads


@dataclass
class ModelConfig(ModelFields):
    """One encoder-decoder as built and saved (a model directory's ``config.json``): its fields and the pixel
    normalisation its weights were trained with."""

    # uint8 images become (x / 255 - mean) / std per RGB channel. A run sets both from data.image_mean /
    # data.image_std (``RunConfig.model_config``), so a saved model directory evaluates, infers and exports
    # with its training's normalisation.
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError(f"image_mean / image_std need 3 values (std > 0), got {self.image_mean} / "
                             f"{self.image_std}")


ConstraintMode = Literal["before", "after"]


@dataclass
class GenerationConfig:
    """Search settings (``biomedgpt.models.generation``). ``max_len`` / ``min_len`` count generated tokens, ``</s>`` and the prefix excluded."""

    beam_size: int = 5  # hypotheses kept per input
    max_len: int = 30
    min_len: int = 1  # </s> is forbidden before this many tokens
    len_penalty: float = 1.0  # with normalize_scores: a finished score is sum(log p) / length ** len_penalty
    normalize_scores: bool = True  # False: compare finished hypotheses by their summed log-probabilities
    no_repeat_ngram_size: int = 0  # > 0: no n-gram of this size twice in one hypothesis
    temperature: float = 1.0  # the logits are divided by it before search or sampling
    sampling: bool = False  # sample instead of searching: beam_size independent samples per input
    top_k: int = 0  # sampling: keep the k most likely tokens (0: all)
    top_p: float = 1.0  # sampling: nucleus mass
    constraint_mode: ConstraintMode = "before"  # "after": the zero-shot variant
    use_cache: bool = True  # False recomputes the whole prefix each step (reference path for tests)

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {self.beam_size}")
        if not 0 <= self.min_len <= self.max_len:
            raise ValueError(f"need 0 <= min_len <= max_len, got min_len={self.min_len}, max_len={self.max_len}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


#: ModelConfig fields that choose how the same network runs, not what it is: a run may resume with others.
RUNTIME_FIELDS = frozenset({"dropout", "attention_dropout", "activation_dropout", "encoder_drop_path_rate",
                            "decoder_drop_path_rate", "resnet_drop_path_rate", "attention_backend",
                            "channels_last", "compile"})

#: ModelConfig fields a run takes from its data settings (data.image_mean / data.image_std), not ``model.*``.
DATA_FIELDS = frozenset({"image_mean", "image_std"})

RESNET50, RESNET101, RESNET152 = [3, 4, 6], [3, 4, 23], [3, 8, 36]

ModelSize = Literal["tiny", "medium", "base", "large", "xlarge"]

#: Every BiomedGPT/OFA size: the width and depth fields each one sets (``tiny`` is ``ModelFields``' defaults).
SIZES: dict[str, dict] = {
    "tiny": dict(d_model=256, ffn_dim=1024, encoder_layers=4, decoder_layers=4, heads=4, resnet_layers=RESNET50),
    "medium": dict(d_model=512, ffn_dim=2048, encoder_layers=4, decoder_layers=4, heads=8, resnet_layers=RESNET101),
    "base": dict(d_model=768, ffn_dim=3072, encoder_layers=6, decoder_layers=6, heads=12, resnet_layers=RESNET101),
    "large": dict(d_model=1024, ffn_dim=4096, encoder_layers=12, decoder_layers=12, heads=16,
                  resnet_layers=RESNET152),
    "xlarge": dict(d_model=1280, ffn_dim=5120, encoder_layers=24, decoder_layers=12, heads=16,
                   resnet_layers=RESNET152),
}
#: The fields a size sets.
SIZE_FIELDS = tuple(SIZES["tiny"])
assert tuple(SIZES) == typing.get_args(ModelSize)

#: Published parameter counts (tied embedding once, BN statistics excluded), for checks.
PUBLISHED_PARAMS = {"tiny": 33.49e6, "medium": 92.89e6, "base": 182.24e6, "large": 472.98e6, "xlarge": 929.49e6}


def size_row(size: str) -> dict:
    """The fields size ``size`` sets (fresh lists: a caller may change them)."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; known: {', '.join(SIZES)}")
    return {name: list(value) if isinstance(value, list) else value for name, value in SIZES[size].items()}


def model_config(size: str = "tiny", **fields) -> ModelConfig:
    """Config of a named size with field overrides (e.g. dropout=0.0, attention_backend="sdpa")."""
    return ModelConfig(**{**size_row(size), **fields})


@dataclass
class ModelSpec(ModelFields):
    """How a run names its model (``model.*``): a size from the table, and any field, typed.

    The size supplies the fields the run does not set. Whether a field was set is a property of the
    settings as written, not of the dataclass, so the loader resolves it: ``biomedgpt.core.config.from_dict``
    asks ``layered_defaults`` for the size's row and lays the given keys over it, for a config file, its
    ``key=value`` overrides (merged into one mapping first) and a saved run config alike. So
    ``model.size=base model.encoder_layers=4`` is base with 4 encoder layers, and a config file's own
    ``d_model`` stays when the command line changes ``model.size``. In Python, ``ModelSpec.of(size, **fields)``
    does the same; ``ModelSpec(size=...)`` alone only labels the fields it is given (the defaults: tiny).
    """

    size: ModelSize = "tiny"  # a row of the size table: the values of its fields this config does not set

    def __post_init__(self) -> None:
        size_row(self.size)  # an unknown size fails here (constructed in Python: the loader checks the Literal)
        super().__post_init__()

    @classmethod
    def layered_defaults(cls, given: dict) -> dict:
        """The values under the ``given`` mapping (``core.config.from_dict``'s hook): its size's row."""
        size = given.get("size", cls.size)
        return size_row(size) if isinstance(size, str) and size in SIZES else {}  # a bad size: the loader says so

    @classmethod
    def of(cls, size: str = "tiny", **fields) -> "ModelSpec":
        """Size ``size`` with ``fields`` set, as the loader builds it."""
        return cls(size=size, **{**size_row(size), **fields})

    def build(self) -> ModelConfig:
        """The model this spec names (the pixel normalisation: ``RunConfig.model_config`` adds the data's)."""
        return ModelConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ModelFields)})

    def custom_fields(self) -> dict:
        """The fields that differ from the size's row and the defaults (a short name of a custom model)."""
        plain = ModelSpec.of(self.size)
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelFields)
                if getattr(self, f.name) != getattr(plain, f.name)}


def saved_model_settings(data: dict) -> dict:
    """A saved run config's ``model`` section in today's form, also of runs written before the fields were
    typed: ``{size, overrides: {...}}``, or every field written with ``null`` for the size's value."""
    data = dict(data)
    data.update(data.pop("overrides", None) or {})
    return {key: value for key, value in data.items() if value is not None}


def spec_from_saved(data: dict) -> ModelSpec:
    """A ModelSpec from a saved run config's ``model`` section (``saved_model_settings``)."""
    from biomedgpt.core.config import from_dict  # the one typed loader (torch-free)

    return from_dict(ModelSpec, saved_model_settings(data), prefix="model.")
