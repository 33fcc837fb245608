"""Modules deferred to their first use (:mod:`tunsup._lazy`): not run by an
``import`` of them, run once by a use, the real module for every holder;
and ``tunsup run`` never loads TLS, hashing or archive libraries."""

from __future__ import annotations

import hmac
import json
import pathlib
import subprocess
import sys
import textwrap
from collections.abc import Callable

from tunsup import _lazy
from tunsup.testing.service_process import ServiceProcess

from .conftest import needs_netns
from .test_prefetch import run_args, write_conf


def run_script(tmp_path: pathlib.Path, body: str) -> dict[str, object]:
    """Run ``body`` in a fresh interpreter (this one imported ssl long ago)
    with ``tmp_path`` first on sys.path; it sets ``out``, returned."""
    script = "import json, sys\nout = {}\n" + textwrap.dedent(body) + "\nprint(json.dumps(out))\n"
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=False, env={"PYTHONPATH": str(tmp_path),
                                                       "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    return dict(json.loads(res.stdout.splitlines()[-1]))


def test_trio_imported_after_defer_runs_none_of_them_until_used(tmp_path: pathlib.Path) -> None:
    out = run_script(tmp_path, """
        from tunsup import _lazy
        out["deferred"] = _lazy.defer()
        import trio
        out["loaded_early"] = sorted(
            [m for m in ("_ssl", "_hashlib", "idna.core", "_bz2", "_lzma", "_locale")
             if m in sys.modules]
            + [m for m in out["deferred"] if type(sys.modules[m]) is not _lazy._Deferred])
        # Used through the names trio bound at its import: the real modules.
        import trio.testing
        ctx = trio._ssl._stdlib_ssl.create_default_context()
        pair = trio.testing.memory_stream_pair()
        out["stream"] = type(trio.SSLStream(pair[0], ctx, server_hostname="example.org")).__name__
        import ssl
        out["same"] = ssl is trio._ssl._stdlib_ssl and type(ssl) is type(sys)
        import hmac
        out["hmac"] = hmac.digest(b"k", b"m", "sha256").hex()
        out["idna"] = trio._socket.encode_hostname("b\u00fccher.example").decode()
        import bz2
        out["bz2"] = bz2.decompress(bz2.compress(b"x")).decode()
        import linecache  # as a traceback reads its source lines: tokenize.open
        out["line"] = linecache.getline(_lazy.__file__, 1).strip()
        import subprocess
        out["text"] = subprocess.run(["echo", "x"], capture_output=True, text=True).stdout
    """)
    assert out["deferred"] == ["ssl", "hmac", "idna", "bz2", "lzma", "tokenize", "locale"]
    assert out["loaded_early"] == []
    assert out["stream"] == "SSLStream"
    assert out["same"] is True
    assert out["hmac"] == hmac.digest(b"k", b"m", "sha256").hex()
    assert out["idna"] == "xn--bcher-kva.example"
    assert out["bz2"] == "x"
    # linecache read the line through tokenize; text mode used locale.
    assert out["line"] == _lazy.__doc__.splitlines()[0].join(['"""', ""])
    assert out["text"] == "x\n"


def write_module(tmp_path: pathlib.Path, name: str, body: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))


def test_import_binds_a_use_runs_once_and_every_holder_sees_it(tmp_path: pathlib.Path) -> None:
    write_module(tmp_path, "counted", """
        import builtins
        builtins.RUNS = getattr(builtins, "RUNS", 0) + 1
        VALUE = 42
    """)
    out = run_script(tmp_path, """
        import builtins
        from tunsup import _lazy
        out["deferred"] = _lazy.defer(("counted", "json", "no_such_module_here"))
        import counted
        import counted as again
        out["after_import"] = getattr(builtins, "RUNS", 0)
        out["values"] = [counted.VALUE, again.VALUE, sys.modules["counted"].VALUE]
        from counted import VALUE
        out["from"] = VALUE
        out["runs"] = builtins.RUNS
        out["plain"] = type(counted) is type(sys)
    """)
    # json was imported already (by the script): left alone; an unknown
    # name is skipped.
    assert out["deferred"] == ["counted"]
    assert out["after_import"] == 0
    assert out["values"] == [42, 42, 42]
    assert out["from"] == 42
    assert out["runs"] == 1
    assert out["plain"] is True


def test_a_module_that_fails_runs_again_at_its_next_use(tmp_path: pathlib.Path) -> None:
    write_module(tmp_path, "flaky", """
        import builtins
        builtins.TRIES = getattr(builtins, "TRIES", 0) + 1
        if builtins.TRIES == 1:
            raise ImportError("first try fails")
        VALUE = "ok"
    """)
    out = run_script(tmp_path, """
        from tunsup import _lazy
        _lazy.defer(("flaky",))
        import flaky
        try:
            flaky.VALUE
        except ImportError as exc:
            out["first"] = str(exc)
        out["second"] = flaky.VALUE
    """)
    assert out == {"first": "first try fails", "second": "ok"}


def test_a_deferred_module_may_use_another_and_a_package_its_submodules(
        tmp_path: pathlib.Path) -> None:
    """A deferred module whose code uses another deferred module, and a
    deferred package importing its own submodule as it runs (one lock for
    all, or a class changed after the code ran, would deadlock here, hence
    the subprocess's timeout)."""
    write_module(tmp_path, "inner", "VALUE = 'inner'\n")
    write_module(tmp_path, "outer", "import inner\nVALUE = inner.VALUE + '+outer'\n")
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .core import VALUE\n")
    (pkg / "core.py").write_text("VALUE = 'pkg.core'\n")
    out = run_script(tmp_path, """
        from tunsup import _lazy
        _lazy.defer(("inner", "outer", "pkg"))
        import outer, pkg
        out["outer"] = outer.VALUE
        out["pkg"] = pkg.VALUE
        import pkg.core
        out["sub"] = pkg.core.VALUE
    """)
    assert out == {"outer": "inner+outer", "pkg": "pkg.core", "sub": "pkg.core"}


def test_a_thread_reading_it_while_another_runs_it_waits_for_the_whole_module(
        tmp_path: pathlib.Path) -> None:
    """Thread A runs the module's code (held in it by an event); the main
    thread reads the module meanwhile: it waits until the code has run and
    gets the value, as with an eager import, not an AttributeError from a
    module half made.  A third thread lets A go on once the main thread is
    seen waiting inside tunsup._lazy (its frames, not a sleep)."""
    write_module(tmp_path, "gated", """
        import builtins
        builtins.RUNS = getattr(builtins, "RUNS", 0) + 1
        builtins.STARTED.set()
        builtins.GO.wait(30)
        VALUE = "whole"
    """)
    out = run_script(tmp_path, """
        import builtins, threading, time
        builtins.STARTED, builtins.GO = threading.Event(), threading.Event()
        from tunsup import _lazy
        _lazy.defer(("gated",))
        import gated
        got_a = []
        a = threading.Thread(target=lambda: got_a.append(gated.VALUE))
        a.start()
        builtins.STARTED.wait(30)
        main, done = threading.get_ident(), threading.Event()

        def release():
            while not done.is_set():
                frame, names = sys._current_frames().get(main), []
                while frame is not None:
                    names.append((frame.f_code.co_filename, frame.f_code.co_name))
                    frame = frame.f_back
                if (_lazy.__file__, "_load") in names:
                    break
                time.sleep(0.001)  # polling the condition above
            builtins.GO.set()

        c = threading.Thread(target=release)
        c.start()
        try:
            out["main"] = gated.VALUE
        except AttributeError as exc:
            out["main"] = repr(exc)
        done.set()
        builtins.GO.set()
        a.join(30)
        c.join(30)
        out["a"] = got_a
        out["runs"] = builtins.RUNS
    """)
    assert out == {"main": "whole", "a": ["whole"], "runs": 1}


def test_a_module_whose_c_part_is_missing_is_not_deferred(tmp_path: pathlib.Path) -> None:
    """As on a Python built without liblzma: lzma stays out, so its import
    fails at once and shutil knows it cannot make such archives."""
    out = run_script(tmp_path, """
        sys.modules["_lzma"] = None  # what a missing extension looks like to find_spec
        from tunsup import _lazy
        out["deferred"] = _lazy.defer(("bz2", "lzma"))
        import shutil
        out["lzma_supported"] = shutil._LZMA_SUPPORTED
        try:
            import lzma
        except ImportError:
            out["import"] = "fails"
    """)
    assert out == {"deferred": ["bz2"], "lzma_supported": False, "import": "fails"}


TLS_AND_FRIENDS = ("libssl", "libcrypto", "_ssl.", "_hashlib.", "libbz2", "liblzma")


@needs_netns
def test_a_running_service_has_loaded_no_tls_hashing_or_archive_library(
        tmp_path: pathlib.Path, netns: Callable[[str], str]) -> None:
    """The real ``tunsup run``, up with a tunnel: none of the libraries its
    imports once pulled in for nothing is mapped in the process."""
    ns = netns("lazy")
    svc = ServiceProcess(ns, run_args(tmp_path, write_conf(tmp_path, "tlazy1")),
                         str(tmp_path), "lazy")
    try:
        svc.wait_ready(60)
        with open(f"/proc/{svc.proc.pid}/maps") as f:
            mapped = {line.split()[-1] for line in f if "/" in line}
    finally:
        code, _ = svc.stop()
        svc.close()
    assert code == 0, svc.output()
    assert any("libc.so" in m for m in mapped), "not the service's own map"
    found = sorted(m for m in mapped if any(t in m for t in TLS_AND_FRIENDS))
    assert found == [], f"loaded by tunsup run: {found}"

