"""The control socket: wire protocol (:mod:`.protocol`), the trio server
(:mod:`.server`) and the trio-free client (:mod:`.client`).  Knows nothing
of the engine.  This ``__init__`` imports nothing, so the client stays light.
"""
