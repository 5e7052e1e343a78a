"""TokenFlow: consistent diffusion features for text-driven video editing."""

__version__ = "0.1.0"
