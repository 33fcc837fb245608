"""Modules imported on ``tunsup run``'s start and never used: run on first use.

trio's package imports its TLS and DTLS layers whatever a program uses:
``ssl`` (with ``_ssl`` and libssl), ``hmac`` (with ``_hashlib`` and
libcrypto) and ``idna``.  On the cold start of ``tunsup run`` they cost
~7 ms of ~165 (``-X importtime``; an A/B of 40 starts: ~10 ms of the
imports' median), for code the service never calls: tunsup speaks netlink,
UAPI and a Unix control socket, none of them over TLS, and ``idna`` only
encodes a non-ASCII host name (an Endpoint given by such a name loads it
then).  ``shutil`` (for ``which``) imports ``bz2`` and ``lzma`` and
their libraries only to learn whether it can make such archives; tunsup
makes none.
Two more are imported only for functions a start does not call:
``tokenize`` (by ``linecache``, to read the source lines of a traceback)
and ``locale`` (by ``subprocess``, for text-mode pipes): ~2 ms together.
(Not ``textwrap``: ``sortedcontainers``, which trio needs, uses it at
import.)

:func:`defer` puts each such module in :data:`sys.modules` before trio is
imported: the real module, found where ``import`` would find it, whose
code has not run yet.  ``import ssl`` of it then only binds the name (the
import system reads nothing of a module in :data:`sys.modules` but its
``__spec__``); the first other attribute anyone reads runs the module's
code in that same module object, so every holder of it sees the real
module.  trio only binds these modules at import (``import ssl as
_stdlib_ssl``, ``import hmac``, ``import idna as _idna``) and reads them
inside the functions that use them, so a service never runs them, and a
program that does use them (a test opening an SSLStream, say) gets what an
eager import would have given it, a little later.  (Reads that look at
the module as a whole, ``dir()``, ``repr()``, ``hasattr``, run it too:
correct, only no longer deferred.)

Why not :class:`importlib.util.LazyLoader`, the standard library's lazy
module: on this Python its module runs on *any* attribute read, including
the ``__spec__`` that every later ``import`` of it reads, so trio's own
``import ssl`` ran it at once.  Unlike it, a first use from several threads
runs the module once, and the others wait until it has run (a lock per
module), and a module whose code fails is left to run again at its next
use, as a failed import is tried again.  A module whose C part this Python
lacks (``_ssl``, ``_bz2``, ``_lzma``) is not deferred: its import fails at
once, as it did, and ``shutil`` learns the truth.
"""

from __future__ import annotations

import sys
import threading
import types

#: What ``tunsup run`` defers before its first import.
UNUSED_AT_START = ("ssl", "hmac", "idna", "bz2", "lzma", "tokenize", "locale")


#: The C part each module cannot run without: a module whose part this
#: Python lacks is not deferred (its import fails at once, as it would have).
NEEDS = {"ssl": "_ssl", "bz2": "_bz2", "lzma": "_lzma"}


class _Deferred(types.ModuleType):
    """A module whose code has not run yet, or is running: the first
    attribute read (other than ``__spec__``, which the import system reads
    on every ``import`` of it) runs it, in this very module object, and
    waits while another thread runs it; the thread running it reads it
    straight through (its own code, a submodule reading its package)."""

    def __getattribute__(self, attr: str) -> object:
        if attr == "__spec__" or _RUNNING.get(id(self)) == threading.get_ident():
            return types.ModuleType.__getattribute__(self, attr)
        _load(self)
        return getattr(self, attr)


#: One lock per deferred module (by name), as the import system has one per
#: module it imports; never taken twice by one thread (see _RUNNING).
_LOCKS: dict[str, threading.Lock] = {}
#: id() of a module whose code runs now -> the thread running it.
_RUNNING: dict[int, int] = {}


def _load(module: types.ModuleType) -> None:
    """Run ``module``'s code once, in it.  Blocks while another thread runs
    it, as a concurrent import of one module does: the class changes only
    once the code has run, so no other thread sees a module half made.  A
    module whose code fails stays deferred and runs again at its next use
    (a failed import is tried again too)."""
    spec = types.ModuleType.__getattribute__(module, "__spec__")
    with _LOCKS[spec.name]:
        if type(module) is not _Deferred:  # run meanwhile by another thread
            return
        _RUNNING[id(module)] = threading.get_ident()
        try:
            spec.loader.exec_module(module)
        finally:
            del _RUNNING[id(module)]
        _become(module, types.ModuleType)


def _become(module: types.ModuleType, cls: type[types.ModuleType]) -> None:
    module.__class__ = cls


def defer(names: tuple[str, ...] = UNUSED_AT_START) -> list[str]:
    """Put each module of ``names`` not yet imported in :data:`sys.modules`
    unexecuted, to run on first use; returns the names deferred."""
    import importlib.util

    deferred = []
    for name in names:
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            continue
        if name in NEEDS and importlib.util.find_spec(NEEDS[name]) is None:
            continue  # finds, runs nothing
        module = importlib.util.module_from_spec(spec)
        _LOCKS[name] = threading.Lock()
        _become(module, _Deferred)
        sys.modules[name] = module
        deferred.append(name)
    return deferred
