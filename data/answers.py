"""Closed answer sets (VQA's ``trainval_ans2label.pkl``, class-name lists): read once here for the training
constraints (``data/constraints.py``), the evaluator's decoding and ``biomedgpt infer``."""
from __future__ import annotations

import json
from pathlib import Path

from biomedgpt.data.safe_pickle import load_data_pickle


def read_answers(path: str | Path) -> list[str]:
    """A closed answer set: JSON list, JSON / pickle ``answer -> index`` (OFA's trainval_ans2label.pkl,
    ordered by index), or one answer per line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"answer set file {path} not found") from None
    if path.suffix == ".pkl":
        data = load_data_pickle(path)  # the released answer lists are pickles: read from an allow-list
    elif path.suffix == ".json":
        data = json.loads(raw)
    else:
        data = [line.strip() for line in raw.decode("utf-8").splitlines() if line.strip()]
    if isinstance(data, dict):
        data = sorted(data, key=data.get)
    if not isinstance(data, list) or not data or not all(isinstance(a, str) for a in data):
        raise ValueError(f"{path}: expected a non-empty list of answers or an answer -> index mapping")
    return list(dict.fromkeys(a.strip() for a in data))
