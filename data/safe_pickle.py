"""Plain pickle data files read without running code: OFA's answer lists (``trainval_ans2label.pkl``: answer
-> index) and its cached CIDEr-D document frequencies (a ``defaultdict`` of n-gram tuples, numpy scalars).

Neither ``torch.load(weights_only=True)`` nor ``json`` reads them: ``torch.load`` expects its own archive (a
plain pickle fails its magic-number check), and torch's weights-only unpickler underneath it (the private
``torch._weights_only_unpickler``, no public entry for plain pickles) reads protocol 2 only: measured with
torch 2.14.1, protocols 0, 4 and 5 fail with "Unsupported operand" (the original's ``*_class2label.pkl``
files are protocol 4) and a ``defaultdict`` (the CIDEr cache) with "Can only SETITEM for dict".
``pickle.loads`` would run whatever a crafted file names. So the standard library's own unpickler reads
them, restricted as the pickle documentation shows ("Restricting Globals": only ``find_class`` is
overridden; the opcodes are CPython's): it resolves only the globals on ``ALLOWED`` (containers and numpy
scalars: nothing that calls code); any other global refuses the whole file with one line naming the file
and the global. Checkpoints never come here (``engine/checkpoint/load.py`` reads them with
``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

from biomedgpt.core.user_errors import UserError

#: (module, name) pairs a data pickle may name: a defaultdict with a builtin factory, numpy scalars / dtypes
ALLOWED = frozenset({
    ("collections", "defaultdict"), ("collections", "OrderedDict"), ("collections", "Counter"),
    ("builtins", "float"), ("builtins", "int"), ("builtins", "list"), ("builtins", "set"), ("builtins", "str"),
    ("__builtin__", "float"), ("__builtin__", "int"), ("__builtin__", "list"), ("__builtin__", "set"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "dtype"),
})


class UnsafePickleError(UserError, ValueError):
    """A data pickle that names a global outside ``ALLOWED``."""


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, source: str):
        super().__init__(io.BytesIO(data), encoding="latin1")  # Python 2 pickles (OFA's caches) too
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED:
            raise UnsafePickleError(f"{self.source}: refers to {module}.{name}, which no data file needs: not "
                                    f"loaded (unpickling it could run code); save it as JSON instead")
        return super().find_class(module, name)


def load_data_pickle(path: str | Path) -> object:
    """The object a plain data pickle holds, built from allow-listed globals only."""
    path = Path(path)
    try:
        return _AllowListUnpickler(path.read_bytes(), str(path)).load()
    except (pickle.UnpicklingError, EOFError) as exc:
        raise UnsafePickleError(f"{path}: not a readable pickle ({exc})") from None
