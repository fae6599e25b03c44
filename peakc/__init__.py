"""peakc: an ahead-of-time graph compiler for large language models."""

__version__ = "0.1.0"

from peakc import ir  # noqa: E402
from peakc.api import compile, load  # noqa: E402
from peakc.errors import PeakcError  # noqa: E402
from peakc.passes.base import Pass, PassContext, PassResult, register_pass  # noqa: E402
from peakc.passes.pipeline import Pipeline  # noqa: E402

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
