"""LoRA fine-tuning through peft: adapters injected into the plain ``BiomedGPT`` module, and their merge into
plain weights for model directories.

peft does the adapters and the merge; what this module adds is the mapping between an adapter model's state
(``<layer>.base_layer.weight``, ``<layer>.lora_A.default.weight``, ``<module>.modules_to_save.default.*``) and a
plain model directory's keys, tensor by tensor, so consolidation can merge while it streams.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

ADAPTER = "default"  # peft's adapter name; one adapter per run
_BASE, _A, _B = ".base_layer.", f".lora_A.{ADAPTER}.", f".lora_B.{ADAPTER}."
_SAVED, _ORIGINAL = f".modules_to_save.{ADAPTER}.", ".original_module."


def peft_config(settings):
    """peft's ``LoraConfig`` for a run's ``lora`` settings (``engine.run_config.LoraConfig`` or its dict)."""
    from peft import LoraConfig

    get = settings.get if isinstance(settings, dict) else lambda key: getattr(settings, key)
    return LoraConfig(r=get("r"), lora_alpha=get("alpha"), lora_dropout=get("dropout"),
                      target_modules=list(get("target_modules")), modules_to_save=list(get("modules_to_save")) or None,
                      bias="none")


def apply_lora(model: nn.Module, settings) -> int:
    """Inject the adapters into ``model`` in place and freeze everything else; returns the trainable count.

    Only the adapters and ``modules_to_save`` keep ``requires_grad``, so the optimizer (and DeepSpeed's
    partitioned state) holds state for them alone."""
    from peft import inject_adapter_in_model

    config = peft_config(settings)
    try:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    except ValueError as exc:  # peft: a target or saved module that matches nothing
        raise ValueError(f"lora settings (target_modules {sorted(config.target_modules)}, modules_to_save "
                         f"{config.modules_to_save or []}): {exc}") from None
    trainable = 0
    for name, param in model.named_parameters():
        keep = ".lora_" in name or _SAVED in name
        param.requires_grad_(keep)
        trainable += param.numel() if keep else 0
    return trainable


def merged_keys(keys: list[str]) -> dict[str, list[str]]:
    """Each plain model key and the adapter-model keys it is made of (adapted weights: base, A, B)."""
    plan: dict[str, list[str]] = {}
    for key in keys:
        if _A in key or _B in key or _ORIGINAL in key:
            continue
        if _BASE in key:
            prefix, leaf = key.split(_BASE)
            plan[f"{prefix}.{leaf}"] = ([key, f"{prefix}{_A}weight", f"{prefix}{_B}weight"] if leaf == "weight"
                                        else [key])
        elif _SAVED in key:
            prefix, leaf = key.split(_SAVED)
            plan[f"{prefix}.{leaf}"] = [key]
        else:
            plan[key] = [key]
    return plan


def merge_weight(base: Tensor, lora_a: Tensor, lora_b: Tensor, settings) -> Tensor:
    """``base + B @ A * alpha / r`` computed by peft's own merge on a one-layer copy."""
    out_features, in_features = base.shape
    holder = nn.Module()
    holder.layer = nn.Linear(in_features, out_features, bias=False, dtype=torch.float32)
    config = peft_config(settings)
    config.target_modules, config.modules_to_save = {"layer"}, None
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, holder, adapter_name=ADAPTER)
    with torch.no_grad():
        holder.layer.base_layer.weight.copy_(base.float())
        holder.layer.lora_A[ADAPTER].weight.copy_(lora_a.float())
        holder.layer.lora_B[ADAPTER].weight.copy_(lora_b.float())
        holder.layer.merge(adapter_names=[ADAPTER])
    return holder.layer.base_layer.weight.detach().to(base.dtype)


def produce_merged(plan: dict[str, list[str]], read: Callable[[str], Tensor], settings) -> Callable[[str], Tensor]:
    """A reader of plain keys over a reader of adapter-model keys (one merged tensor at a time)."""
    def produce(key: str) -> Tensor:
        parts = plan[key]
        if len(parts) == 3:
            return merge_weight(read(parts[0]), read(parts[1]), read(parts[2]), settings)
        return read(parts[0])

    return produce


def merged_state(state: dict[str, Tensor], settings) -> dict[str, Tensor]:
    """An adapter model's state dict as a plain model's, adapters merged into the weights."""
    plan = merged_keys(list(state))
    produce = produce_merged(plan, state.__getitem__, settings)
    return {key: produce(key) for key in plan}


def write_merged_lora(model: nn.Module, directory, tokenizer, settings) -> None:
    """A plain model directory from a (gathered) adapter model: the adapters merged into the weights."""
    from biomedgpt.models.checkpoint import TIED_ALIASES, write_dir_atomically, write_model_files

    state = {k: v.detach().cpu() for k, v in merged_state(model.state_dict(), settings).items()
             if k not in TIED_ALIASES}
    write_dir_atomically(Path(directory), lambda d: write_model_files(d, state, model.cfg, tokenizer), True)
