"""Building the model for DeepSpeed: zero.Init for large sizes, initial weights, activation checkpointing.

Everything DeepSpeed-specific about the model lives here, so ``models/`` stays plain PyTorch.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.utils.checkpoint

from biomedgpt.models.config import ModelConfig
from biomedgpt.models.ofa import BiomedGPT

ZERO_INIT_AUTO_PARAMS = 300e6  # build under zero.Init at ZeRO-3 from this size up


def approx_parameters(cfg: ModelConfig) -> float:
    """Parameter count from the config alone (transformer weights + embedding + ResNet), to decide zero.Init."""
    d, f = cfg.d_model, cfg.ffn_dim
    enc = cfg.encoder_layers * (4 * d * d + 2 * d * f)
    dec = cfg.decoder_layers * (8 * d * d + 2 * d * f)
    resnet = sum(n for n in cfg.resnet_layers) * 1.2e6
    return enc + dec + cfg.vocab_size * d + resnet


def use_zero_init(cfg: ModelConfig, zero_stage: int, setting: bool | None) -> bool:
    if zero_stage != 3:
        return False
    return approx_parameters(cfg) >= ZERO_INIT_AUTO_PARAMS if setting is None else setting


def build_model(cfg: ModelConfig, ds_config: dict, zero_init: bool, init_state: dict | None) -> BiomedGPT:
    """The model, partitioned at construction under ZeRO-3 zero.Init, with its initial weights.

    Under zero.Init every parameter is partitioned as soon as its module is built (``__init__`` does
    not initialise weights), so ``init_weights`` runs here on the gathered parameters (rank 0's values
    are broadcast), and a given ``init_state`` is loaded the same way. Without zero.Init the same calls
    run on the plain model.
    """
    from biomedgpt.models.checkpoint import load_into

    gathered = contextlib.nullcontext
    if zero_init:
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = BiomedGPT(cfg)
        gathered = functools.partial(deepspeed.zero.GatheredParameters, list(model.parameters()), modifier_rank=0)
    else:
        model = BiomedGPT(cfg)
    with gathered():
        # Every rank draws (rank 0's values are kept under zero.Init), so all ranks' RNG streams stay where
        # a run without zero.Init would have them; weights to load are drawn over as before.
        model.init_weights()
        if init_state is not None:
            load_into(model, init_state)
    return model


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: BiomedGPT) -> int:
    """Recompute each encoder/decoder layer in the backward instead of storing its activations.

    The layer's ``forward`` is wrapped on the instance, so parameter names (and checkpoints) are
    unchanged. Returns the number of wrapped layers.
    """
    count = 0
    for stack in (model.encoder.layers, model.decoder.layers):
        for layer in stack:
            layer.forward = functools.partial(_checkpointed, layer.forward)
            count += 1
    return count
