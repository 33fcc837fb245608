"""tunsup._findlib: trio imported without running ldconfig, its worker
threads still named.  Each check runs in a fresh interpreter (trio is
imported once per process)."""

from __future__ import annotations

import ctypes.util
import json
import subprocess
import sys
import textwrap

import pytest

from tunsup import _findlib

NEW_GLIBC = (_findlib.glibc_version() or (0, 0)) >= _findlib.MERGED
needs_new_glibc = pytest.mark.skipif(
    not NEW_GLIBC, reason="pthread lives in libc only from glibc 2.34 (the shortcut is off)")

# Imports trio (inside the shortcut or not), then names a trio worker
# thread: prints what was spawned meanwhile and the thread's kernel name.
_PROBE = textwrap.dedent("""
    import json, subprocess, sys, threading
    spawned = []
    real_init = subprocess.Popen.__init__
    def init(self, args, *a, **k):
        spawned.append(list(args) if not isinstance(args, str) else [args])
        real_init(self, args, *a, **k)
    subprocess.Popen.__init__ = init
    from tunsup._findlib import pthread_from_libc
    if sys.argv[1] == "shortcut":
        with pthread_from_libc():
            import trio
    else:
        import trio
    from trio._core import _thread_cache

    def comm():
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
            return f.read().strip()

    async def main():
        return await trio.to_thread.run_sync(comm)

    print(json.dumps({"spawned": spawned, "comm": trio.run(main),
                      "named": _thread_cache.set_os_thread_name is not None}))
""")


def _probe(mode: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    result: dict[str, object] = json.loads(out)
    return result


def _ran_ldconfig(result: dict[str, object]) -> bool:
    spawned = result["spawned"]
    assert isinstance(spawned, list)
    return any("ldconfig" in " ".join(argv) for argv in spawned)


@needs_new_glibc
def test_trio_imported_without_ldconfig_and_threads_still_named() -> None:
    result = _probe("shortcut")
    assert not _ran_ldconfig(result), result
    assert result["named"] is True
    # The kernel's name of a worker thread is trio's, not the process's.
    comm = result["comm"]
    assert isinstance(comm, str) and comm != "python" and "python" not in comm, comm


@needs_new_glibc
def test_without_the_shortcut_trio_runs_ldconfig() -> None:
    """The probe sees an ldconfig run when there is one (the check above
    can fail)."""
    assert _ran_ldconfig(_probe("plain"))


def test_other_names_and_later_calls_go_to_the_real_find_library() -> None:
    real = ctypes.util.find_library
    with _findlib.pthread_from_libc():
        if NEW_GLIBC:
            assert ctypes.util.find_library("pthread") == _findlib.LIBC
        assert ctypes.util.find_library("no-such-library-anywhere") is None
    assert ctypes.util.find_library is real


@needs_new_glibc
def test_blocks_that_end_out_of_order_put_the_real_function_back() -> None:
    real = ctypes.util.find_library
    first, second = _findlib.pthread_from_libc(), _findlib.pthread_from_libc()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert ctypes.util.find_library("pthread") == _findlib.LIBC  # one block still open
    second.__exit__(None, None, None)
    assert ctypes.util.find_library is real


def test_a_library_without_merged_pthread_changes_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    real = ctypes.util.find_library
    for text in ("glibc 2.31", "musl", "", "glibc x.y"):
        monkeypatch.setattr(_findlib.os, "confstr", lambda _name, t=text: t)
        with _findlib.pthread_from_libc():
            assert ctypes.util.find_library is real


def test_glibc_version_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    cases = {"glibc 2.36": (2, 36), "glibc 2.34.9000": (2, 34), "glibc 3": None,
             "uclibc 1.0": None}
    for text, want in cases.items():
        monkeypatch.setattr(_findlib.os, "confstr", lambda _name, t=text: t)
        assert _findlib.glibc_version() == want

    def missing(_name: str) -> str:
        raise ValueError("unrecognized configuration name")

    monkeypatch.setattr(_findlib.os, "confstr", missing)
    assert _findlib.glibc_version() is None
