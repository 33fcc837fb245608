"""Configuration: spec records (:mod:`.spec`), keys (:mod:`.keys`), the
wg-quick parser (:mod:`.wgquick`), the ``tunsup.toml`` loader with its line
locator (:mod:`.toml`) and the configuration sources ``run`` reloads from
(:mod:`.sources`).  Imports only attrs/cattrs and the base layer.
"""

from __future__ import annotations

from .keys import Key
from .settings import ControlSettings, RestartPolicy, TunnelOptions
from .spec import PeerSpec, TunnelSpec
from .wgquick import load_conf

# The TOML loader (cattrs) is imported from .toml by those who need it, so
# that importing the records stays light.
__all__ = [
    "ControlSettings",
    "Key",
    "PeerSpec",
    "RestartPolicy",
    "TunnelOptions",
    "TunnelSpec",
    "load_conf",
]
