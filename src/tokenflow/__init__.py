"""TokenFlow: consistent diffusion features for text-driven video editing."""

__version__ = "0.1.0"

from .config import EditConfig  # noqa: E402
from .editor import EditResult, TokenFlowPipeline  # noqa: E402
from .errors import TokenFlowError  # noqa: E402

__all__ = ["EditConfig", "EditResult", "TokenFlowError", "TokenFlowPipeline", "__version__"]
