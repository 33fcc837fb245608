"""Where tunsup keeps its files by default.  Standard library only: the
trio-free client commands need the runtime directory too."""

from __future__ import annotations

DEFAULT_STATE_DIR = "/var/lib/tunsup"
DEFAULT_RUNTIME_DIR = "/run/tunsup"
DEFAULT_RESOLV_CONF = "/etc/resolv.conf"
