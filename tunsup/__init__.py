"""tunsup: a crash-safe tunnel supervisor for Linux.

The public surface is small; everything else lives in private or
single-purpose modules.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["ConfigError", "ExitCode", "__version__"]

from ._errors import ConfigError, ExitCode
