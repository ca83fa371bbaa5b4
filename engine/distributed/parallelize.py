"""Building the model for DeepSpeed: zero.Init, initial weights, partitioned loading, activation checkpointing,
compilation. ``ZeroPlan`` (``zero.py``) decides which of them a run uses.

Everything DeepSpeed-specific about the model lives in ``engine/distributed/``, so ``models/`` stays plain PyTorch.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.utils.checkpoint

from biomedgpt.models.config import ModelConfig
from biomedgpt.models.ofa import BiomedGPT

def approx_parameters(cfg: ModelConfig) -> float:
    """Parameter count from the config alone (transformer weights + embedding + ResNet), to decide zero.Init
    (``ZeroPlan.builds_partitioned``)."""
    d, f = cfg.d_model, cfg.ffn_dim
    enc = cfg.encoder_layers * (4 * d * d + 2 * d * f)
    dec = cfg.decoder_layers * (8 * d * d + 2 * d * f)
    resnet = sum(n for n in cfg.resnet_layers) * 1.2e6
    return enc + dec + cfg.vocab_size * d + resnet


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


def load_partitioned(model_dir, ds_config: dict, rank: int) -> BiomedGPT:
    """A model directory's fp32 model built already partitioned (ZeRO-3 zero.Init), for evaluation: no rank
    holds the whole model. One module at a time its parameters are gathered and rank 0 fills them from
    the safetensors files, read lazily (its values are kept, ``modifier_rank=0``); the other ranks read
    only the files' headers and the (unpartitioned) buffers."""
    import deepspeed
    from safetensors import safe_open

    from biomedgpt.engine.distributed.zero import whole_shape
    from biomedgpt.models.checkpoint import TIED_ALIASES, check_fits, model_weight_files, read_model_config

    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = BiomedGPT(read_model_config(model_dir))  # no init_weights(): every weight is loaded below
    with contextlib.ExitStack() as files:
        where = {}
        for path in model_weight_files(model_dir):
            handle = files.enter_context(safe_open(str(path), framework="pt"))
            where.update((key, handle) for key in handle.keys())
        check_fits({k: whole_shape(v) for k, v in model.state_dict(keep_vars=True).items()},
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


def compile_enabled(cfg: ModelConfig, device: torch.device, *, partitions_params: bool = False) -> bool:
    """``compile: auto`` compiles on CUDA where the parameters are whole (below ZeRO-3) only. On this CPU
    inductor needs minutes to warm up (212 s for tiny) and CPU runs are tests and short demos; with partitioned
    parameters ZeRO-3's hooks would run inside the compiled layers. ``true``/``false`` force it either way."""
    if cfg.compile == "auto":
        return device.type == "cuda" and not partitions_params
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
