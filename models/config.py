"""Model sizes: every BiomedGPT/OFA size in one table, plus custom sizes for ablations."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

CANONICAL_VOCAB_SIZE = 59457  # GPT-2 BPE in fairseq order + <mask> + 8192 codes + 1000 bins

AttentionBackend = Literal["auto", "eager", "sdpa", "flex", "flash", "chunked"]
PositionScheme = Literal["ofa", "rope"]


@dataclass
class ModelConfig:
    """Architecture and regularisation of one encoder-decoder. Field names follow OFA's args."""

    d_model: int = 256
    ffn_dim: int = 1024
    encoder_layers: int = 4
    decoder_layers: int = 4
    heads: int = 4
    resnet_layers: list[int] = field(default_factory=lambda: [3, 4, 6])
    vocab_size: int = CANONICAL_VOCAB_SIZE
    pad_id: int = 1
    max_source_positions: int = 1024
    max_target_positions: int = 1024
    token_bucket_size: int = 256
    image_bucket_size: int = 42
    code_grid: int = 16  # decoder image-code window (code_image_size // 8 in OFA)
    attn_scale_factor: float = 2.0
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    encoder_drop_path_rate: float = 0.0
    decoder_drop_path_rate: float = 0.0
    resnet_drop_path_rate: float = 0.0
    attention_backend: AttentionBackend = "auto"
    position_scheme: PositionScheme = "ofa"  # ofa: released checkpoints' biases; rope: rotary, no additive bias
    rope_theta: float = 10000.0
    # Speed switches (engine/model_setup.py applies them; tests/test_default_path.py holds their numerics).
    channels_last: bool = True  # NHWC stem convolutions: the stem ~2.5x faster on CPU; fp32 gradients as close to fp64
    compile: bool | Literal["auto"] = "auto"  # inductor transformer layers; auto: on CUDA below ZeRO-3 only

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


RESNET50, RESNET101, RESNET152 = [3, 4, 6], [3, 4, 23], [3, 8, 36]

#: name: (d_model, ffn, encoder layers, decoder layers, heads, resnet blocks of layer1..3)
SIZES: dict[str, tuple[int, int, int, int, int, list[int]]] = {
    "tiny": (256, 1024, 4, 4, 4, RESNET50),
    "medium": (512, 2048, 4, 4, 8, RESNET101),
    "base": (768, 3072, 6, 6, 12, RESNET101),
    "large": (1024, 4096, 12, 12, 16, RESNET152),
    "xlarge": (1280, 5120, 24, 12, 16, RESNET152),
}

#: Published parameter counts (tied embedding once, BN statistics excluded), for checks.
PUBLISHED_PARAMS = {"tiny": 33.49e6, "medium": 92.89e6, "base": 182.24e6, "large": 472.98e6, "xlarge": 929.49e6}


def model_config(size: str = "tiny", **overrides) -> ModelConfig:
    """Config of a named size with field overrides (e.g. dropout=0.0, attention_backend="sdpa")."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; known: {sorted(SIZES)} (or give every field)")
    d, ffn, enc, dec, heads, resnet = SIZES[size]
    base = dict(d_model=d, ffn_dim=ffn, encoder_layers=enc, decoder_layers=dec, heads=heads,
                resnet_layers=list(resnet))
    base.update(overrides)
    return ModelConfig(**base)


@dataclass
class ModelSpec:
    """How a run names its model: a size from the table, with any field overridden (custom sizes)."""

    size: str = "tiny"
    overrides: dict = field(default_factory=dict)

    def build(self) -> ModelConfig:
        unknown = set(self.overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
        if unknown:
            raise ValueError(f"unknown model field(s) {sorted(unknown)} in model.overrides")
        return model_config(self.size, **self.overrides)
