"""The one rule for interface names, used everywhere a name is checked.

wg-quick takes the interface name from the file name and accepts only
``[a-zA-Z0-9_=+.-]{1,15}``; that is stricter than the kernel's own rule
(1-15 bytes, no ``/``, no whitespace, not ``.`` or ``..``), which it
implies, except for ``.`` and ``..``, which are refused here as well.
"""

from __future__ import annotations

import re

__all__ = ["IFNAME_RULE", "is_valid_ifname"]

_IFNAME = re.compile(r"[a-zA-Z0-9_=+.-]{1,15}")

#: The rule in words, for messages ("... must be" + IFNAME_RULE).
IFNAME_RULE = "1 to 15 characters of letters, digits and _ = + . - (not '.' or '..')"


def is_valid_ifname(name: str) -> bool:
    """Whether ``name`` is a valid interface name for tunsup (and wg-quick)."""
    return _IFNAME.fullmatch(name) is not None and name not in (".", "..")
