"""megatron-core's compiled dataset helpers (`helpers_cpp`), loaded straight from their file on first use.

`from megatron.core.datasets import helpers_cpp` runs megatron.core's package __init__, which imports
torch, its model-parallel code and its optimizer (warning that Transformer Engine and Apex are absent):
about 2.5 s more on this machine even with torch already imported, paid by every process that builds an
index. The extension itself needs only numpy, so it is loaded from its file and registered under its
own name: a later `import megatron.core` finds that one module instead of loading the extension twice.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

NAME = "megatron.core.datasets.helpers_cpp"
_lock = threading.Lock()


def _extension_file() -> Path | None:
    core = importlib.util.find_spec("megatron.core")  # imports only `megatron`, a namespace package
    for folder in (core.submodule_search_locations or []) if core else []:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = Path(folder) / "datasets" / f"helpers_cpp{suffix}"
            if path.is_file():
                return path
    return None


def helpers_cpp() -> ModuleType:
    with _lock:
        module = sys.modules.get(NAME)
        if module is not None:
            return module
        path = _extension_file()
        if path is None:  # not where a wheel puts it: the ordinary import, quietly
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Transformer Engine and Apex are not installed", UserWarning)
                from megatron.core.datasets import helpers_cpp as module
            return module
        spec = importlib.util.spec_from_file_location(NAME, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[NAME] = module
        spec.loader.exec_module(module)
        return module
