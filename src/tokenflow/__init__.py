"""TokenFlow: consistent diffusion features for text-driven video editing."""

__version__ = "0.1.0"

from .errors import TokenFlowError  # noqa: E402
from .families import load_model  # noqa: E402
from .options import EditOptions  # noqa: E402
from .pipeline import EditResult, TokenFlowPipeline  # noqa: E402

__all__ = [
    "EditOptions",
    "EditResult",
    "TokenFlowError",
    "TokenFlowPipeline",
    "__version__",
    "load_model",
]
