"""LLaVA(-Med) instruction conversations (a JSON list): each human turn with the gpt reply after it is one
``instruction`` row."""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable, Iterator

from biomedgpt.data.convert.config import PrepareConfig
from biomedgpt.data.convert.rows import ConversionError, Row, bad_row, field_image, image_base
from biomedgpt.data.records import BadRecord, make_record


def llava_rows(path: Path, cfg: PrepareConfig) -> Iterator[Row]:
    """A JSON list of ``{"id", "image", "conversations": [{"from": "human" | "gpt", "value"}, …]}``.

    Each human turn with the gpt reply after it becomes one ``instruction`` row ``<id>-<pair index>``
    (the ``<image>`` marker dropped); an entry without ``image`` gives text-only rows. Rows are reported
    as ``file:entry N, turn K`` (1-based). A file that is not such a list stops the conversion.
    """
    base = image_base(cfg.image_root, path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{path}: not a JSON file: {exc}") from None
    if not isinstance(entries, list):
        raise ConversionError(f"{path}: expected a JSON list of conversations, got {type(entries).__name__}")
    for n, entry in enumerate(entries, start=1):
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list) or not turns:
            yield f"{path}:entry {n}", bad_row("an entry must be an object with a non-empty conversations list")
            continue
        uid = str(entry.get("id") or f"{path.stem}-{n}")
        image = functools.lru_cache(maxsize=1)(lambda e=entry: field_image(e.get("image"), base))
        for k in range((len(turns) + 1) // 2):
            pair = turns[2 * k: 2 * k + 2]
            yield f"{path}:entry {n}, turn {k + 1}", (lambda u=uid, k=k, p=pair, i=image: _llava_turn(u, k, p, i))


def _llava_turn(uid: str, k: int, pair: list, image: Callable[[], bytes]) -> dict:
    roles = [turn.get("from") if isinstance(turn, dict) else None for turn in pair]
    if roles != ["human", "gpt"]:
        raise BadRecord(f"conversation {uid!r}: turn {k + 1} has roles {roles}, expected ['human', 'gpt']")
    instruction = str(pair[0].get("value") or "").replace("<image>", "").strip()
    meta = {"instruction": instruction, "response": str(pair[1].get("value") or "").strip(), "conversation": uid,
            "turn": k}
    return make_record(f"{uid}-{k}", "instruction", meta, image())
