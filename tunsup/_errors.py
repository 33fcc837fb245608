"""Exceptions and the exit codes of ``tunsup run`` and friends."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit codes; part of the user contract (see README)."""

    OK = 0
    #: A runtime failure; the host was restored.
    FAILURE = 1
    #: Usage or configuration error; nothing was applied.
    USAGE = 2
    #: Teardown incomplete: some undo step failed; the log names each one.
    TEARDOWN_INCOMPLETE = 3


class TunsupError(Exception):
    """Base class of the errors tunsup reports to users as one line."""


class ConfigError(TunsupError):
    """A configuration file is invalid.

    ``str()`` gives ``FILE:LINE: message`` (or ``FILE: message`` when no line
    applies).  The message never contains key material.
    """

    def __init__(self, path: str, line: int | None, message: str) -> None:
        self.path = path
        self.line = line
        self.message = message
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {message}")


class HostError(TunsupError):
    """A host operation (netlink, process, file) failed or timed out."""


class HelperExited(TunsupError):
    """A tunnel's data-plane helper exited while it should be running."""
