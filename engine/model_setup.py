"""Building the model for DeepSpeed: zero.Init for large sizes, initial weights, activation checkpointing.

Everything DeepSpeed-specific about the model lives here, so ``models/`` stays plain PyTorch.
"""
from __future__ import annotations

import functools

import torch
import torch.utils.checkpoint
from torch import nn

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


class _InitLater(BiomedGPT):
    """BiomedGPT whose constructor leaves the weight init for later (it runs on gathered parameters)."""

    def reset_parameters(self) -> None:
        return None


def build_model(cfg: ModelConfig, ds_config: dict, zero_init: bool, init_state: dict | None) -> BiomedGPT:
    """The model, partitioned at construction under ZeRO-3 zero.Init, with its initial weights.

    Under zero.Init every parameter is partitioned as soon as its module is built, so the model's own
    initialisation cannot run in ``__init__`` (it would see empty tensors): it runs here on the gathered
    parameters (rank 0's values are broadcast), and a given ``init_state`` is loaded the same way.
    """
    from biomedgpt.models.checkpoint import load_into

    if not zero_init:
        model = BiomedGPT(cfg)
        if init_state is not None:
            load_into(model, init_state)
        return model
    import deepspeed

    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = _InitLater(cfg)
    model.__class__ = BiomedGPT
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
        # Every rank draws (rank 0's values are kept), so all ranks' RNG streams stay where a run
        # without zero.Init would have them.
        model.reset_parameters()
        if init_state is not None:
            load_into(model, init_state)
    return model


def load_partitioned(model_dir, ds_config: dict, rank: int) -> BiomedGPT:
    """A model directory's fp32 model built already partitioned (ZeRO-3 zero.Init), for evaluation: no rank
    holds the whole model. One module at a time its parameters are gathered and rank 0 fills them from
    the safetensors files, read lazily (its values are kept, ``modifier_rank=0``); the other ranks read
    only the files' headers and the (unpartitioned) buffers."""
    import contextlib

    import deepspeed
    from safetensors import safe_open

    from biomedgpt.models.checkpoint import TIED_ALIASES, check_fits, model_weight_files, read_model_config

    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = _InitLater(read_model_config(model_dir))
    model.__class__ = BiomedGPT
    with contextlib.ExitStack() as files:
        where = {}
        for path in model_weight_files(model_dir):
            handle = files.enter_context(safe_open(str(path), framework="pt"))
            where.update((key, handle) for key in handle.keys())
        check_fits({k: tuple(getattr(v, "ds_shape", v.shape)) for k, v in model.state_dict(keep_vars=True).items()},
                   {k: tuple(h.get_slice(k).get_shape()) for k, h in where.items()}, str(model_dir))
        read = lambda key: where[key].get_tensor(key)  # noqa: E731
        with torch.no_grad():
            for prefix, module in model.named_modules():
                own = [(f"{prefix}.{n}" if prefix else n, p) for n, p in module._parameters.items() if p is not None]
                own = [(key, p) for key, p in own if key not in TIED_ALIASES]
                if not own:
                    continue
                with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=0):
                    if rank == 0:
                        for key, p in own:
                            p.data.copy_(read(key).to(p.dtype))
            for key, buffer in model.named_buffers():
                if key in where:  # persistent buffers (check_fits: every one is there); others are derived
                    buffer.copy_(read(key).to(buffer.dtype))
    return model


def register_external_parameters(model: nn.Module) -> None:
    """ZeRO-3 gathers a module's parameters around its own forward and backward. OFA reads embedding
    tables (position and relative-position tables, the tied output projection) directly, outside any
    call of their module, and the encoder returns a dataclass whose tensors ZeRO-3's backward hooks
    cannot see; so every embedding table is registered as an external parameter of the root model,
    whose output (the logits) ZeRO-3 does track, in the forward and in the backward."""
    import deepspeed

    for module in model.modules():
        if isinstance(module, nn.Embedding):
            deepspeed.zero.register_external_parameter(model, module.weight)


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
