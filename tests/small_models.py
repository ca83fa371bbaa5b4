"""A small model with every structural piece of the real ones, for the attention and text-only tests."""
from __future__ import annotations

import torch

from biomedgpt.models.config import model_config
from biomedgpt.models.ofa import BiomedGPT

SMALL = dict(d_model=64, ffn_dim=128, encoder_layers=2, decoder_layers=2, heads=4, resnet_layers=[1, 1, 1],
             vocab_size=300, dropout=0.0)


def build(backend: str = "eager", scheme: str = "ofa", **overrides) -> BiomedGPT:
    """Seeded weights; the relative tables (zero in OFA's init) randomised so they matter."""
    torch.manual_seed(0)
    model = BiomedGPT(model_config("tiny", attention_backend=backend, position_scheme=scheme, **{**SMALL, **overrides})).init_weights()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "rel_pos_table" in name:
                param.normal_(0.0, 0.5)
    return model
