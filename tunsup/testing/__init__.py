"""Test support that stands at the OS boundary, public for anyone driving
tunsup's engine: the in-memory fake host and fake helpers
(:mod:`.fakehost`, re-exported here), the ``tunsup run`` subprocess driver
(:mod:`.service_process`) and scratch network namespaces (:mod:`.netns`).
"""

from __future__ import annotations

from .fakehost import (
    PEER,
    Behaviour,
    FakeHelper,
    FakeHost,
    FakeLink,
    FakeNet,
    Fault,
    spec,
    uapi_dir,
)

__all__ = [
    "PEER",
    "Behaviour",
    "FakeHelper",
    "FakeHost",
    "FakeLink",
    "FakeNet",
    "Fault",
    "spec",
    "uapi_dir",
]
