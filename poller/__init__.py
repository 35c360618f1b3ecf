"""batch-poller: polls OpenAI-compatible Batch APIs and publishes every status transition."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("batch-poller")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
