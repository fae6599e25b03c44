"""peakc: an ahead-of-time graph compiler for large language models.

The public names are imported on first use (module `__getattr__`), so `import peakc` and the
command line start without importing torch; `peakc.compile` imports what it needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from peakc.errors import PeakcError
from peakc.version import __version__

if TYPE_CHECKING:
    from peakc import ir
    from peakc.api import compile, load
    from peakc.passes.base import Pass, PassContext, PassResult, register_pass
    from peakc.passes.pipeline import Pipeline

# public name -> the module that defines it
_LAZY = {
    "compile": "peakc.api",
    "load": "peakc.api",
    "Pass": "peakc.passes.base",
    "PassContext": "peakc.passes.base",
    "PassResult": "peakc.passes.base",
    "register_pass": "peakc.passes.base",
    "Pipeline": "peakc.passes.pipeline",
}


def __getattr__(name: str) -> Any:
    if name == "ir":
        return importlib.import_module("peakc.ir")
    if name not in _LAZY:
        raise AttributeError(f"module 'peakc' has no attribute '{name}'")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


__all__ = [
    "Pass",
    "PassContext",
    "PassResult",
    "PeakcError",
    "Pipeline",
    "__version__",
    "compile",
    "ir",
    "load",
    "register_pass",
]
