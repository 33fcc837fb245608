"""Configuration: spec records (:mod:`.spec`), keys (:mod:`.keys`), the
wg-quick parser (:mod:`.wgquick`), the ``tunsup.toml`` loader with its line
locator (:mod:`.toml`) and the configuration sources ``run`` reloads from
(:mod:`.sources`).  Imports only attrs/cattrs and the base layer.
"""
