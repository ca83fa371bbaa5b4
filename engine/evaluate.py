"""Evaluation metrics of the engine's loss pass: loss, perplexity and token accuracy, overall and per task."""
from __future__ import annotations

import math
from typing import Sequence


def eval_metrics(records: Sequence[tuple[str, int, float, float, int, int]], task_names: Sequence[str]) -> dict:
    """``records``: (sample id, task id, summed loss, summed nll, target tokens, correct tokens) per sample.

    The evaluation loader pads each rank's share by repeating samples, so each id counts once.
    """
    seen: dict[str, tuple[int, float, float, int, int]] = {}
    for uid, task, loss, nll, tokens, correct in records:
        seen.setdefault(uid, (task, loss, nll, tokens, correct))
    metrics: dict[str, float] = {"samples": float(len(seen))}
    groups: dict[str, list] = {"": list(seen.values())}
    for row in seen.values():
        groups.setdefault(f"/{task_names[row[0]]}", []).append(row)
    for suffix, rows in groups.items():
        tokens = sum(r[3] for r in rows)
        if tokens == 0:
            continue
        nll = sum(r[2] for r in rows) / tokens
        metrics[f"loss{suffix}"] = sum(r[1] for r in rows) / tokens
        metrics[f"nll{suffix}"] = nll
        metrics[f"ppl{suffix}"] = math.exp(min(nll, 50.0))
        metrics[f"accuracy{suffix}"] = sum(r[4] for r in rows) / tokens
    return metrics
