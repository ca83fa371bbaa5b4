"""Checks made before a run resumes, so that a bad checkpoint fails in one line that says what to do.

- every file of the tag is a readable ``torch.save`` archive that holds nothing but what DeepSpeed and this
  engine write (read weights-only, ``engine/checkpoint/load.py``; no tensor is read), else the error names
  the file (and the refused global) and the tag, and an earlier complete tag if there is one;
- the settings a run cannot change midway (``FIXED``: the data order, the optimizer state's shape, the model
  architecture) equal this run's, else the error names the settings that differ and the two ways out (a
  fresh ``output_dir``, or ``checkpoint.resume=never``) instead of DeepSpeed's hundreds of "size mismatch"
  lines, or a run that silently trains on another data order;
- the optimizer settings a user may change (``APPLIED``) are returned, for the trainer to apply to the
  resumed optimizer and schedule (``apply_optimizer_settings``) and log.

Every other setting (logging, evaluation, checkpointing, loader workers and caches, the model's
``RUNTIME_FIELDS`` such as dropout or the attention backend, the ZeRO stage through a universal
checkpoint) takes this run's value without a word. docs/DESIGN.md ("Resuming with changed settings").
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from biomedgpt.engine.checkpoint import layout
from biomedgpt.engine.checkpoint.layout import MODEL_FILE_RE, RANK_RE, TAG_RE
from biomedgpt.engine.checkpoint.load import load_checkpoint_file
from biomedgpt.engine.checkpoint.manager import ResumeError
from biomedgpt.models.checkpoint import CheckpointError, UnsafeCheckpointError

# With more files than this, a rank checks rank 0's model states and its own files only.
CHECK_ALL_FILES_UP_TO = 64

#: Settings a resumed run must keep: they decide the data order (the loader's saved position counts samples
#: of this mixture in this order), the optimizer state's layout, or the random streams.
FIXED = ("seed", "data.batch_size", "data.group_weights", "data.shuffle", "data.shuffle_seed", "data.shuffle_algo",
         "data.shuffle_block_size", "data.num_canonical_nodes", "data.epoch_size", "optim.grad_accum",
         "optim.freeze_embeddings", "lora.enabled", "lora.r", "lora.alpha", "lora.target_modules",
         "lora.modules_to_save")
#: Per stream, matched by name: what it holds and its share of the mixture (``remote``/``local`` may move).
FIXED_STREAM_KEYS = ("task", "proportion", "loss_group")
#: Optimizer and schedule settings a resumed run applies (``apply_optimizer_settings``) and logs as changed.
APPLIED = ("optim.lr", "optim.betas", "optim.eps", "optim.weight_decay", "optim.clip_norm", "optim.schedule",
           "optim.power", "optim.warmup_ratio", "optim.warmup_steps", "optim.end_lr", "optim.max_steps",
           "optim.max_epochs")


_ABSENT = object()  # a setting that a checkpoint of an older version did not record: not compared


def _get(cfg: dict, dotted: str):
    for part in dotted.split("."):
        cfg = cfg.get(part, _ABSENT) if isinstance(cfg, dict) else _ABSENT
    return cfg


def _differs(saved: dict, wanted: dict, key: str) -> bool:
    before = _get(saved, key)
    return before is not _ABSENT and not _same(before, _get(wanted, key))


def _same(a, b) -> bool:
    """Equal as saved: a tuple reads back as a list, an int setting may be written as a float."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _stream_differences(saved: list, wanted: list) -> list[str]:
    names_a, names_b = [s["name"] for s in saved], [s["name"] for s in wanted]
    if names_a != names_b:
        return [f"data.streams: checkpoint {names_a}, this run {names_b}"]
    return [f"data.streams[{a['name']}].{key}: checkpoint {a.get(key)!r}, this run {b.get(key)!r}"
            for a, b in zip(saved, wanted) for key in FIXED_STREAM_KEYS if not _same(a.get(key), b.get(key))]


def fixed_differences(saved: dict, wanted: dict) -> list[str]:
    """``key: checkpoint X, this run Y`` for every setting a resumed run must keep (``FIXED``, the training
    streams, the model architecture) that differs between the saved run config ``saved`` and ``wanted``."""
    diffs = [f"{key}: checkpoint {_get(saved, key)!r}, this run {_get(wanted, key)!r}"
             for key in FIXED if _differs(saved, wanted, key)]
    diffs += _stream_differences((saved.get("data") or {}).get("streams") or [], wanted["data"]["streams"])
    if isinstance(saved.get("model"), dict):
        diffs += model_differences(saved["model"], wanted["model"])
    return diffs


def applied_changes(saved: dict, wanted: dict) -> list[str]:
    """``key X -> Y`` for every optimizer setting (``APPLIED``) this run changes."""
    return [f"{key} {_get(saved, key)!r} -> {_get(wanted, key)!r}"
            for key in APPLIED if _differs(saved, wanted, key)]


def apply_optimizer_settings(scheduler, optim) -> None:
    """Give a resumed optimizer and LR schedule this run's ``optim`` settings. DeepSpeed restores the saved
    param groups (lr, betas, eps, weight decay) and the scheduler's base lrs, which would silently win; the
    schedule's shape (warmup, decay, end lr, total steps) already comes from this run's ``lr_lambda``, and
    clipping from this run's DeepSpeed config."""
    groups = scheduler.optimizer.param_groups
    for group in groups:
        group.update(initial_lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
    scheduler.base_lrs = [optim.lr] * len(groups)
    lrs = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports until the next step


def model_differences(saved: dict, wanted: dict) -> list[str]:
    """``model.key: checkpoint X, this run Y`` for every architecture setting that differs (the built model
    configs are compared, so ``size: base`` equals its table row written out; runtime choices such as the
    attention backend or dropout may change on resume)."""
    from biomedgpt.models.config import RUNTIME_FIELDS, spec_from_saved

    a, b = (dataclasses.asdict(spec_from_saved(d).build()) for d in (saved, wanted))
    return [f"model.{key}: checkpoint {a[key]!r}, this run {b[key]!r}"
            for key in a if key not in RUNTIME_FIELDS and a[key] != b[key]]


def _complete_tags(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and TAG_RE.match(p.name) and layout.is_complete(p))


def _files_to_check(tag_dir: Path, rank: int) -> list[Path]:
    files = sorted(p for p in tag_dir.iterdir() if p.is_file() and p.suffix == ".pt")
    if len(files) <= CHECK_ALL_FILES_UP_TO:
        return files
    keep = []
    for path in files:
        match = RANK_RE.search(path.name)
        if match is None or int(match[1]) in (0, rank):
            keep.append(path)
    return keep


def _problem(path: Path) -> CheckpointError | None:
    try:
        load_checkpoint_file(path, meta=True)
    except CheckpointError as exc:
        return exc
    return None


def _way_out(root: Path, tag: str, output_dir: Path) -> str:
    earlier = [t for t in _complete_tags(root) if t < tag]
    fresh = f"or start over in a new output_dir (or with checkpoint.resume=never, which overwrites {root})"
    for candidate in reversed(earlier):
        if not any(_problem(p) for p in sorted((root / candidate).glob("*.pt"))):
            return (f"the earlier checkpoint {candidate} is complete: to resume from it, move {root / tag} "
                    f"aside and write {candidate} into {root / layout.LATEST_FILE}; {fresh}")
    return f"no earlier complete checkpoint exists in {root}: start over in a new output_dir " \
           f"(or with checkpoint.resume=never, which overwrites {root})"


def check_resumable(root: str | Path, tag: str, rank: int, run_config: dict) -> list[str]:
    """Raise ``ResumeError`` (one line, naming the file or setting and the way out) unless ``tag`` can be
    resumed by a run with the settings ``run_config`` (``to_dict(RunConfig)``); returns the optimizer
    settings it changes (``applied_changes``)."""
    root = Path(root)
    tag_dir = root / tag
    output_dir = root.parent
    for path in _files_to_check(tag_dir, rank):
        problem = _problem(path)
        if isinstance(problem, UnsafeCheckpointError):
            raise ResumeError(f"{problem}, so checkpoint {tag} cannot be resumed; {_way_out(root, tag, output_dir)}")
        if problem is not None:
            raise ResumeError(f"{path}: truncated or corrupt, so checkpoint {tag} cannot be resumed; "
                              f"{_way_out(root, tag, output_dir)}")

    states = [p for p in sorted(tag_dir.iterdir()) if MODEL_FILE_RE.match(p.name)]
    if not states:
        raise ResumeError(f"{tag_dir}: no DeepSpeed model-states file, so checkpoint {tag} cannot be resumed; "
                          f"{_way_out(root, tag, output_dir)}")
    client = load_checkpoint_file(states[0], meta=True)
    saved = client.get("config") if isinstance(client, dict) else None
    if not isinstance(saved, dict):
        return []
    diffs = fixed_differences(saved, run_config)
    if any(d.startswith("model.") for d in diffs):
        raise ResumeError(
            f"{output_dir} holds checkpoint {tag} of another model ({'; '.join(diffs)}): use a new "
            f"output_dir for this model, or checkpoint.resume=never to train it from scratch there "
            f"(its checkpoints are then replaced)")
    if diffs:
        raise ResumeError(
            f"checkpoint {tag} in {output_dir} was trained with other settings that a resumed run cannot change "
            f"({'; '.join(diffs)}): resume with the checkpoint's values, or use a new output_dir for these "
            f"settings, or checkpoint.resume=never to train from scratch there (its checkpoints are then replaced)")
    return applied_changes(saved, run_config)
