"""DeepSpeed JSON from a ``ds_configs/*.json`` template plus the run config.

The templates hold only what is DeepSpeed-specific tuning (bucket sizes, loss-scale window, ...). Every
value the run config decides is ``"auto"`` there and filled here; a template that sets one of them to
anything else is an error, so the JSON and the run config can never disagree.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from biomedgpt.core.config import PACKAGE_ROOT, read_json
from biomedgpt.engine.run_config import RunConfig
from biomedgpt.core.user_errors import UserError

DS_CONFIG_DIR = PACKAGE_ROOT / "ds_configs"


class DeepSpeedConfigError(UserError, ValueError):
    pass


def device_precision(precision: str) -> tuple[str, str | None]:
    """``precision`` where this device's accelerator supports it, else fp32 and the line that says so (a
    fine-tuning recipe's fp16 on a CPU, where DeepSpeed would stop with "Type fp16 is not supported")."""
    if precision == "fp32":
        return precision, None
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if (accelerator.is_fp16_supported() if precision == "fp16" else accelerator.is_bf16_supported()):
        return precision, None
    return "fp32", (f"deepspeed.precision {precision} is not supported on this device "
                    f"({accelerator.device_name()}): training in fp32 instead")


def template_path(cfg: RunConfig) -> Path:
    ds = cfg.deepspeed
    if ds.template:
        return Path(ds.template)
    offload = ds.offload_optimizer != "none" or ds.offload_param != "none"
    name = f"zero{ds.zero_stage}{'_offload' if offload else ''}.json"
    path = DS_CONFIG_DIR / name
    if not path.exists():
        raise DeepSpeedConfigError(f"no template {path} for zero_stage {ds.zero_stage} with offload={offload}; "
                                   f"set deepspeed.template")
    return path


def _owned_values(cfg: RunConfig) -> dict[tuple[str, ...], Any]:
    """The DeepSpeed keys the run config decides, by path."""
    ds, optim = cfg.deepspeed, cfg.optim
    values: dict[tuple[str, ...], Any] = {
        ("train_micro_batch_size_per_gpu",): cfg.data.batch_size,
        ("gradient_accumulation_steps",): optim.grad_accum,
        ("gradient_clipping",): optim.clip_norm,
        ("fp16", "enabled"): ds.precision == "fp16",
        ("bf16", "enabled"): ds.precision == "bf16",
        ("zero_optimization", "stage"): ds.zero_stage,
        ("zero_optimization", "offload_optimizer", "device"): ds.offload_optimizer,
        ("zero_optimization", "offload_param", "device"): ds.offload_param,
    }
    if optim.implementation == "deepspeed":
        values[("optimizer",)] = {"type": "AdamW", "params": {
            "lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay}}
    return values


def build_ds_config(cfg: RunConfig) -> dict:
    path = template_path(cfg)
    config = read_json(path, DeepSpeedConfigError, "the DeepSpeed template")
    for forbidden in ("train_batch_size", "scheduler"):
        if forbidden in config:
            raise DeepSpeedConfigError(f"{path}: remove {forbidden!r}; the engine derives it from the run config")
    if "optimizer" in config and cfg.optim.implementation != "deepspeed":
        raise DeepSpeedConfigError(f"{path}: remove 'optimizer'; the run config's optim section defines it")
    config = copy.deepcopy(config)
    for keys, value in _owned_values(cfg).items():
        node = config
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
            if node is None:
                break
        if node is None or keys[-1] not in node:
            if keys[-1] == "device":
                if value != "none":
                    raise DeepSpeedConfigError(f"{path}: has no {'.'.join(keys[:-1])} section for the "
                                               f"requested offload to {value}")
                continue
            _set(config, keys, value)
            continue
        current = node[keys[-1]]
        if current != "auto" and current != value:
            raise DeepSpeedConfigError(f"{path}: {'.'.join(keys)} is {current!r} but the run config gives "
                                       f"{value!r}; write \"auto\" in the template")
        node[keys[-1]] = value
    ds = cfg.deepspeed
    for key, value in (("initial_scale_power", ds.initial_scale_power), ("loss_scale_window", ds.loss_scale_window),
                       ("hysteresis", ds.loss_scale_hysteresis)):
        if value is not None:  # the run's fp16 loss scaling replaces the template's
            _set(config, ("fp16", key), value)
    _drop_disabled_offload(config)
    leftover = _find_auto(config)
    if leftover:
        raise DeepSpeedConfigError(f"{path}: no run-config value for {leftover}")
    return config


def _set(config: dict, keys: tuple[str, ...], value: Any) -> None:
    node = config
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value


def _drop_disabled_offload(config: dict) -> None:
    zero = config.get("zero_optimization", {})
    for key in ("offload_optimizer", "offload_param"):
        if isinstance(zero.get(key), dict) and zero[key].get("device") == "none":
            del zero[key]


def _find_auto(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _find_auto(v, f"{prefix}{k}.")]
    return [prefix.rstrip(".")] if node == "auto" else []


def evaluation_ds_config(stage: int) -> dict:
    """DeepSpeed's config for a model that only runs forward (``biomedgpt evaluate`` / ``infer`` with
    ``zero_stage``): no optimizer and no run config, so no template; DeepSpeed's defaults for the rest."""
    return {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage}}
