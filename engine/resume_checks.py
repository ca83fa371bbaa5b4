"""Checks made before a run resumes, so that a bad checkpoint fails in one line that says what to do.

- every file of the tag is a readable ``torch.save`` archive that holds nothing but what DeepSpeed and this
  engine write (read weights-only, ``engine/checkpoint_load.py``; no tensor is read), else the error names
  the file (and the refused global) and the tag, and an earlier complete tag if there is one;
- the checkpoint's model settings equal this run's, else the error names the settings that differ and
  the two ways out (a fresh ``output_dir``, or ``checkpoint.resume=never``) instead of DeepSpeed's
  hundreds of "size mismatch" lines.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from biomedgpt.engine import checkpoint_files as layout
from biomedgpt.engine.checkpoint_files import MODEL_FILE_RE, RANK_RE, TAG_RE
from biomedgpt.engine.checkpoint_load import load_checkpoint_file
from biomedgpt.engine.checkpointing import ResumeError
from biomedgpt.models.checkpoint import CheckpointError, UnsafeCheckpointError

# With more files than this, a rank checks rank 0's model states and its own files only.
CHECK_ALL_FILES_UP_TO = 64


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
        load_checkpoint_file(path)
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


def check_resumable(root: str | Path, tag: str, rank: int, run_model: dict) -> None:
    """Raise ``ResumeError`` (one line, naming the file or setting and the way out) unless ``tag`` can be
    resumed by a run whose ``model`` settings are ``run_model``."""
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
    client = load_checkpoint_file(states[0])
    saved = (client.get("config") or {}).get("model") if isinstance(client, dict) else None
    if isinstance(saved, dict):
        diffs = model_differences(saved, run_model)
        if diffs:
            raise ResumeError(
                f"{output_dir} holds checkpoint {tag} of another model ({'; '.join(diffs)}): use a new "
                f"output_dir for this model, or checkpoint.resume=never to train it from scratch there "
                f"(its checkpoints are then replaced)")
