"""Re-export of :mod:`tunsup.testing.fakehost` (where the fake host now lives)."""

from tunsup.testing.fakehost import (  # noqa: F401
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
