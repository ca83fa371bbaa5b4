"""Closed answer sets (the original's ``trainval_ans2label.pkl`` / ``*_class2label.pkl``, converted once to JSON;
class-name lists): read once here for the training constraints (``data/constraints.py``), the evaluator's
decoding and ``biomedgpt infer``.

Pickled data files are refused, not read: unpickling can run code, neither ``json`` nor
``torch.load(weights_only=True)`` reads a plain pickle, and this project writes no unpickler of its own. The
refusal names the one-line conversion (docs/tasks-and-data.md, "Answer sets and CIDEr-D statistics") a user runs
once on a file they trust.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

from biomedgpt.core.user_errors import UserError

PICKLE_SUFFIXES = (".pkl", ".pickle", ".p")
CONVERSION_DOC = 'docs/tasks-and-data.md, "Answer sets and CIDEr-D statistics"'


class SideFileError(UserError, ValueError):
    """A data side file (an answer set, CIDEr-D statistics) missing or not in its form: one line naming it."""


class PickledDataError(SideFileError):
    """A data file given as a pickle (the original's answer sets and CIDEr-D caches): convert it to JSON."""


#: the conversion of the original's ans2label / class2label pickles (``python3 -c '...' IN.pkl OUT.json``)
ANSWERS_CONVERSION = ("python3 -c 'import json, pickle, sys; json.dump(pickle.load(open(sys.argv[1], \"rb\")), "
                      "open(sys.argv[2], \"w\"))'")


def read_side_file(path: Path, what: str, conversion: str) -> bytes:
    """The bytes of a data side file (an answer set, CIDEr-D statistics); one line naming ``path`` when it is
    missing, or when it is a pickle (by its suffix or its protocol-2+ opening byte) with the command converting
    it (``conversion`` + input + output)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SideFileError(f"{what} file {path}: {exc.strerror or exc}") from None
    if path.suffix in PICKLE_SUFFIXES or raw[:1] == b"\x80":
        converted = path.with_suffix(".json")
        raise PickledDataError(f"{path}: a pickle, which this project does not load (unpickling can run code); "
                               f"convert it once, if you trust it: {conversion} {shlex.quote(str(path))} "
                               f"{shlex.quote(str(converted))}, then give {converted} ({CONVERSION_DOC})")
    return raw


def read_answers(path: str | Path) -> list[str]:
    """A closed answer set: a JSON list, a JSON ``answer -> index`` object (the original's ans2label, ordered by
    index), or one answer per line."""
    path = Path(path)
    raw = read_side_file(path, "answer set", ANSWERS_CONVERSION)
    try:
        if path.suffix == ".json":
            data = json.loads(raw)
        else:
            data = [line.strip() for line in raw.decode("utf-8").splitlines() if line.strip()]
    except ValueError as exc:  # invalid JSON, or bytes that are not UTF-8
        raise SideFileError(f"answer set file {path}: not {'JSON' if path.suffix == '.json' else 'UTF-8 text'} "
                            f"({exc})") from None
    if isinstance(data, dict) and all(isinstance(i, int) for i in data.values()):
        data = sorted(data, key=data.get)
    if not isinstance(data, list) or not data or not all(isinstance(a, str) for a in data):
        raise SideFileError(f"{path}: expected a non-empty list of answers or an answer -> index mapping")
    return list(dict.fromkeys(a.strip() for a in data))
