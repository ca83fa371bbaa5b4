"""Building the model for DeepSpeed: zero.Init for large sizes, initial weights, activation checkpointing,
compilation.

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


def compile_enabled(cfg: ModelConfig, device: torch.device, zero_stage: int = 0) -> bool:
    """``compile: auto`` compiles on CUDA below ZeRO-3 only. On this CPU inductor needs minutes to warm up
    (212 s for tiny) and CPU runs are tests and short demos; under ZeRO-3 its parameter hooks would run inside
    the compiled layers. ``true``/``false`` force it either way."""
    if cfg.compile == "auto":
        return device.type == "cuda" and zero_stage < 3
    return bool(cfg.compile)


def apply_compile(model: BiomedGPT) -> int:
    """``torch.compile`` (inductor) every transformer layer in place; parameter names unchanged.

    The attention core stays out of the graphs (a graph break): its backends are fused kernels or the
    chunked autograd function already; only ``flex`` is traced into them, as FlexAttention wants. Layers of
    one stack share their compiled graphs. The ResNet stem stays eager (cuDNN/oneDNN convolutions already;
    channels-last is ``ModelConfig.channels_last``). Returns the number of compiled layers.
    """
    for module in model.modules():
        if hasattr(module, "attend") and getattr(module, "backend", None) != "flex":
            module.attend = torch.compiler.disable(module.attend)
    layers = [*model.encoder.layers, *model.decoder.layers]
    for layer in layers:
        layer.compile()
    return len(layers)
