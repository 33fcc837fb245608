"""Exceptions and every exit code of tunsup's commands.

The one place exit codes are defined: the service (``run``, ``cleanup``)
and the trio-free client commands (:mod:`tunsup.client`) both use these.
This module imports nothing heavy (the client imports it).
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from enum import IntEnum as _Codes
    from typing import TypeVar

    _E = TypeVar("_E", bound=BaseException)
else:

    class _Codes(int):
        """What the exit codes need of :class:`enum.IntEnum`, without
        importing :mod:`enum`: it and what it pulls in (functools,
        collections...) are about 8 ms of a client command's start, which
        should take about 20 in all.  A subclass's upper-case int attributes
        become its members: instances of it, ints with a ``name``, equal to
        and hashing as their value, shown as IntEnum shows them.  The type
        checker sees a real IntEnum."""

        name: str
        _members: tuple[_Codes, ...] = ()

        def __init_subclass__(cls) -> None:
            super().__init_subclass__()
            members = []
            for key, value in list(vars(cls).items()):
                if key.isupper() and type(value) is int:
                    member = int.__new__(cls, value)
                    member.name = key
                    setattr(cls, key, member)
                    members.append(member)
            cls._members = tuple(members)

        def __new__(cls, value: int) -> _Codes:
            """``ExitCode(3)``: the member of that value, as for an enum."""
            for member in cls._members:
                if member == value:
                    return member
            raise ValueError(f"{value!r} is not a valid {cls.__name__}")

        def __reduce__(self) -> tuple[type[_Codes], tuple[int]]:
            return type(self), (int(self),)

        @property
        def value(self) -> int:
            return int(self)

        def __repr__(self) -> str:
            return f"<{type(self).__name__}.{self.name}: {int(self)}>"

        __str__ = int.__repr__


class ExitCode(_Codes):
    """Process exit codes; part of the user contract (see README's table).
    ``status`` has its own, LSB's: :class:`StatusCode`."""

    OK = 0
    #: A runtime failure; the host was restored.  (A client: the op failed.)
    FAILURE = 1
    #: Usage or configuration error; nothing was applied.
    USAGE = 2
    #: Teardown incomplete: some undo step failed; the log names each one.
    TEARDOWN_INCOMPLETE = 3
    #: A client could not find out: no answer in time, not permitted, or
    #: (``stop``) the service still runs after ``--timeout``.
    UNKNOWN = 4
    #: ``up``/``down``/``reload``/``logs``: no service runs (LSB's "program
    #: is not running" for actions).
    NOT_RUNNING = 7


class StatusCode(_Codes):
    """Exit codes of ``tunsup status``: LSB's init-script status codes."""

    RUNNING = 0
    #: The service is dead and its pid file remains.
    DEAD = 1
    NOT_RUNNING = 3
    #: No permission or no answer.
    UNKNOWN = 4


class TunsupError(Exception):
    """Base class of the errors tunsup reports to users as one line."""


class ConfigError(TunsupError):
    """A configuration file is invalid.

    ``str()`` gives ``FILE:LINE: message`` (or ``FILE: message`` when no line
    applies).  The message never contains key material, and is cut at
    :data:`MAX_MESSAGE` characters: it may quote what the file holds, and
    it travels in log lines, control frames and the service's log ring.
    """

    MAX_MESSAGE = 1000

    def __init__(self, path: str, line: int | None, message: str) -> None:
        if len(message) > self.MAX_MESSAGE:
            message = (f"{message[:self.MAX_MESSAGE]}... (cut: {len(message)} characters "
                       "in all)")
        self.path = path
        self.line = line
        self.message = message
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {message}")


class ConfigErrors(ConfigError):
    """Several problems, in the order they should be read (file order).

    ``path``, ``line`` and ``message`` are those of the first problem;
    ``str()`` gives one ``FILE:LINE: message`` per line, at most
    :data:`MAX_REPORTED` of them, then ``and N more``.
    """

    #: Problems shown; a file with thousands of bad lines is summed up.
    MAX_REPORTED = 20

    errors: tuple[ConfigError, ...]

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        flat: list[ConfigError] = []
        for error in errors:
            flat.extend(error.errors if isinstance(error, ConfigErrors) else (error,))
        self.errors = tuple(flat)
        first = self.errors[0]
        super().__init__(first.path, first.line, first.message)

    def __str__(self) -> str:
        shown = [str(e) for e in self.errors[: self.MAX_REPORTED]]
        hidden = len(self.errors) - len(shown)
        if hidden:
            shown.append(f"and {hidden} more error(s)")
        return "\n".join(shown)


def config_errors(errors: Sequence[ConfigError]) -> ConfigError | None:
    """One exception for ``errors``: ``None`` for none, the error itself for
    one, else a :class:`ConfigErrors` (nested ones are flattened)."""
    if not errors:
        return None
    if len(errors) == 1:
        return errors[0]
    return ConfigErrors(errors)


class HostError(TunsupError):
    """A host operation (netlink, process, file) failed or timed out."""


class HelperExited(TunsupError):
    """A tunnel's data-plane helper exited while it should be running."""


def leaves(group: BaseExceptionGroup[_E]) -> list[_E]:
    """The exceptions in ``group`` and its nested groups, in order."""
    out: list[_E] = []
    for exc in group.exceptions:
        out.extend(leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out
