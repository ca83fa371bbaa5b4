"""The parts of mosaicml-streaming this project uses, imported without streaming's package ``__init__`` files.

``import streaming`` runs ``streaming/__init__.py``, which imports its example datasets (C4 imports
transformers' ``AutoTokenizer``), and ``streaming/base/__init__.py`` imports its ``StreamingDataLoader``
(transformers' ``BatchEncoding``). transformers in turn imports ``torch._dynamo`` and
``torch.distributed.tensor``, for names this project never uses: measured with torch 2.14 and DeepSpeed
already imported, 4.7 CPU-seconds for the import, 2.4 fewer per training rank in all (its optimizer imports
``torch._dynamo`` later anyway). What this module adds: the two packages are registered from their real import specs
without running their ``__init__``; the modules below (dataset, stream, MDS reader and writer, uploader,
world) are streaming's own, imported as usual. A package left so completes its own ``__init__`` the first
time code asks it for a name it has not got (PEP 562 ``__getattr__``), so other code in the same process
that does ``from streaming import StreamingDataLoader`` gets streaming's real objects, only later.
"""
from __future__ import annotations

import importlib.util
import sys


def _register_without_init(name: str) -> None:
    """Put package ``name`` in ``sys.modules`` from its spec; its ``__init__`` runs on first missing name."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    package = importlib.util.module_from_spec(spec)

    def complete_init(attribute: str):
        if importlib.util.find_spec(f"{name}.{attribute}") is not None:  # `from package import submodule`
            return importlib.import_module(f"{name}.{attribute}")
        del package.__getattr__  # from here on a missing name is a plain AttributeError
        spec.loader.exec_module(package)
        return getattr(package, attribute)

    package.__getattr__ = complete_init
    sys.modules[name] = package
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, package)


_register_without_init("streaming")
_register_without_init("streaming.base")

from streaming.base.constant import SHM_TO_CLEAN  # noqa: E402
from streaming.base.dataset import StreamingDataset, _ShardState  # noqa: E402
from streaming.base.format.mds.reader import MDSReader  # noqa: E402
from streaming.base.format.mds.writer import MDSWriter  # noqa: E402
from streaming.base.storage.upload import CloudUploader  # noqa: E402
from streaming.base.stream import Stream  # noqa: E402
from streaming.base.world import World  # noqa: E402

__all__ = ["SHM_TO_CLEAN", "StreamingDataset", "_ShardState", "MDSReader", "MDSWriter", "CloudUploader", "Stream",
           "World"]
