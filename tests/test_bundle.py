"""tunsup._bundle: the modules of a start served from one file, exactly as
the usual import would give them, and never a stale or shadowed one.
Each check that imports runs in a fresh interpreter."""

from __future__ import annotations

import json
import marshal
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Callable

import pytest

from tunsup import _bundle
from tunsup.testing.service_process import ServiceProcess, ready_then_stopped

from .conftest import needs_netns
from .test_prefetch import run_args, write_conf


def _py(code: str, *, cwd: pathlib.Path, pythonpath: pathlib.Path | None = None,
        args: tuple[str, ...] = ()) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


_BUILD_MODULE = """
    import json, sys
    from tunsup import _bundle
    print(json.dumps({"count": _bundle.build(lambda: __import__("bmod"), sys.argv[1])}))
"""

_IMPORT_MODULE = """
    import json, sys
    from tunsup import _bundle
    finder = _bundle.install(sys.argv[1])
    out = {"installed": finder is not None}
    if finder is not None:
        import bmod
        out.update(value=bmod.VALUE, served=finder.served, file=bmod.__file__)
    print(json.dumps(out))
"""


@pytest.fixture
def module_bundle(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """A directory on the search path with ``bmod.py`` (``VALUE = 1``), a
    bundle written with it imported, and an empty working directory."""
    pkgdir, cwd = tmp_path / "pkg", tmp_path / "cwd"
    pkgdir.mkdir()
    cwd.mkdir()
    (pkgdir / "bmod.py").write_text("VALUE = 1\n")
    path = tmp_path / "bundle.marshal"
    built = _py(_BUILD_MODULE, cwd=cwd, pythonpath=pkgdir, args=(str(path),))
    assert isinstance(built["count"], int) and built["count"] > 5
    return pkgdir, cwd, path


def test_the_modules_of_a_start_come_from_the_bundle_as_they_would_from_their_files(
        tmp_path: pathlib.Path) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    path = tmp_path / "bundle.marshal"
    _py("""
        import json, sys
        from tunsup import _bundle
        print(json.dumps({"count": _bundle.build(_bundle._import_run_modules, sys.argv[1])}))
    """, cwd=cwd, args=(str(path),))
    probe = """
        import inspect, ipaddress, json, sys, traceback
        from tunsup import _bundle
        finder = _bundle.install(sys.argv[1]) if sys.argv[1] else None
        import trio, tunsup.service, tunsup.engine.tunnel
        try:
            ipaddress.ip_address("no address")
        except ValueError:
            tb = traceback.format_exc()
        print(json.dumps({
            "served": finder.served if finder else None,
            "files": {m: sys.modules[m].__file__ for m in ("trio", "trio._core._run",
                                                          "tunsup.service", "ipaddress")},
            "cached": trio.__cached__, "package": trio._core.__path__,
            "source": inspect.getsource(trio.run).splitlines()[0],
            "traceback": tb.splitlines()[-2],
        }))
    """
    bundled = _py(probe, cwd=cwd, args=(str(path),))
    plain = _py(probe, cwd=cwd, args=("",))
    served = bundled.pop("served")
    assert isinstance(served, int) and served >= 100, served
    assert plain.pop("served") is None
    assert bundled == plain
    assert "does not appear to be an IPv4 or IPv6 address" in str(bundled["traceback"])


def test_a_changed_source_is_imported_from_its_file(
        module_bundle: tuple[pathlib.Path, pathlib.Path, pathlib.Path]) -> None:
    pkgdir, cwd, path = module_bundle
    same = _py(_IMPORT_MODULE, cwd=cwd, pythonpath=pkgdir, args=(str(path),))
    assert same == {"installed": True, "value": 1, "served": 1,
                    "file": str(pkgdir / "bmod.py")}
    # Same size, a later time: only the time tells.
    source = pkgdir / "bmod.py"
    before = source.stat()
    source.write_text("VALUE = 2\n")
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    changed = _py(_IMPORT_MODULE, cwd=cwd, pythonpath=pkgdir, args=(str(path),))
    assert changed == {"installed": True, "value": 2, "served": 0,
                       "file": str(pkgdir / "bmod.py")}
    # Same time, another size.
    source.write_text("VALUE = 22\n")
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    resized = _py(_IMPORT_MODULE, cwd=cwd, pythonpath=pkgdir, args=(str(path),))
    assert resized["value"] == 22 and resized["served"] == 0


def test_a_module_the_builder_found_in_its_working_directory_is_not_bundled(
        tmp_path: pathlib.Path) -> None:
    """The builder's first path entry (its working directory) is not
    recorded: what it found there would be served where the search path
    finds another module, or none."""
    pkgdir, cwd, builddir = tmp_path / "pkg", tmp_path / "cwd", tmp_path / "build"
    for d in (pkgdir, cwd, builddir):
        d.mkdir()
    (builddir / "bmod.py").write_text("VALUE = 'from the build directory'\n")
    (pkgdir / "bmod.py").write_text("VALUE = 1\n")
    path = tmp_path / "bundle.marshal"
    _py(_BUILD_MODULE, cwd=builddir, pythonpath=pkgdir, args=(str(path),))
    result = _py(_IMPORT_MODULE, cwd=cwd, pythonpath=pkgdir, args=(str(path),))
    assert result == {"installed": True, "value": 1, "served": 0,
                      "file": str(pkgdir / "bmod.py")}


def test_a_directory_named_like_a_module_that_becomes_a_package_turns_it_off(
        tmp_path: pathlib.Path) -> None:
    """``first/bmod/`` without an ``__init__`` is no module; once it gets
    one, it is the package an import finds before ``second/bmod.py``."""
    first, second, cwd = tmp_path / "first", tmp_path / "second", tmp_path / "cwd"
    for d in (first / "bmod", second, cwd):
        d.mkdir(parents=True)
    (second / "bmod.py").write_text("VALUE = 1\n")
    path = tmp_path / "bundle.marshal"
    both = pathlib.Path(f"{first}:{second}")
    _py(_BUILD_MODULE, cwd=cwd, pythonpath=both, args=(str(path),))
    assert _py(_IMPORT_MODULE, cwd=cwd, pythonpath=both, args=(str(path),))["value"] == 1
    (first / "bmod" / "__init__.py").write_text("VALUE = 2\n")
    assert _py(_IMPORT_MODULE, cwd=cwd, pythonpath=both, args=(str(path),)) == {
        "installed": False}


def test_a_bundle_cut_short_while_in_use_is_read_as_usual(
        module_bundle: tuple[pathlib.Path, pathlib.Path, pathlib.Path]) -> None:
    """Truncated in place after it was installed (a copy over it, say): the
    code it no longer holds is loaded from its file (a mapped file would
    have killed the process with SIGBUS)."""
    pkgdir, cwd, path = module_bundle
    result = _py("""
        import json, os, sys
        from tunsup import _bundle
        finder = _bundle.install(sys.argv[1])
        os.truncate(sys.argv[1], finder._base)
        import bmod
        print(json.dumps({"value": bmod.VALUE, "served": finder.served}))
    """, cwd=cwd, pythonpath=pkgdir, args=(str(path),))
    assert result == {"value": 1, "served": 0}


def test_installed_once_and_taken_off_for_good(
        module_bundle: tuple[pathlib.Path, pathlib.Path, pathlib.Path]) -> None:
    pkgdir, cwd, path = module_bundle
    result = _py("""
        import importlib, json, sys
        from tunsup import _bundle
        finder = _bundle.install(sys.argv[1])
        again = _bundle.install(sys.argv[1])
        ours = sum(1 for f in sys.meta_path if isinstance(f, _bundle.BundleFinder))
        import bmod
        off = _bundle.uninstall()
        left = sum(1 for f in sys.meta_path if isinstance(f, _bundle.BundleFinder))
        importlib.reload(bmod)
        print(json.dumps({"same": again is finder and off is finder, "ours": ours,
                          "left": left, "served": finder.served, "why": _bundle.why_not(),
                          "value": bmod.VALUE}))
    """, cwd=cwd, pythonpath=pkgdir, args=(str(path),))
    assert result == {"same": True, "ours": 1, "left": 0, "served": 1, "value": 1,
                      "why": "taken off once the start's imports were done"}


def test_the_first_build_into_a_new_cache_directory_is_usable(tmp_path: pathlib.Path) -> None:
    """Creating the bundle's directory changes its parent's time: a
    bundle written into a new ``__pycache__`` of a directory it records
    must still match it."""
    pkgdir, cwd = tmp_path / "pkg", tmp_path / "cwd"
    pkgdir.mkdir()
    cwd.mkdir()
    (pkgdir / "bmod.py").write_text("VALUE = 1\n")
    path = pkgdir / "__pycache__" / "bundle.marshal"
    _py(_BUILD_MODULE, cwd=cwd, pythonpath=pkgdir, args=(str(path),))
    assert _py(_IMPORT_MODULE, cwd=cwd, pythonpath=pkgdir, args=(str(path),))["served"] == 1


def test_a_module_added_beside_them_turns_the_bundle_off(
        module_bundle: tuple[pathlib.Path, pathlib.Path, pathlib.Path]) -> None:
    pkgdir, cwd, path = module_bundle
    (pkgdir / "other.py").write_text("")
    assert _py(_IMPORT_MODULE, cwd=cwd, pythonpath=pkgdir, args=(str(path),)) == {
        "installed": False}


def test_a_search_path_changed_after_the_start_is_obeyed(
        module_bundle: tuple[pathlib.Path, pathlib.Path, pathlib.Path],
        tmp_path: pathlib.Path) -> None:
    """A directory put first on ``sys.path`` once the finder is installed
    shadows a bundled module as it would without the bundle."""
    pkgdir, cwd, path = module_bundle
    first = tmp_path / "first"
    first.mkdir()
    (first / "bmod.py").write_text("VALUE = 4\n")
    result = _py("""
        import json, sys
        from tunsup import _bundle
        finder = _bundle.install(sys.argv[1])
        sys.path.insert(0, sys.argv[2])
        import bmod
        print(json.dumps({"installed": finder is not None, "value": bmod.VALUE}))
    """, cwd=cwd, pythonpath=pkgdir, args=(str(path), str(first)))
    assert result == {"installed": True, "value": 4}


def test_another_search_path_turns_the_bundle_off(
        module_bundle: tuple[pathlib.Path, pathlib.Path, pathlib.Path],
        tmp_path: pathlib.Path) -> None:
    _, cwd, path = module_bundle
    (tmp_path / "elsewhere").mkdir()
    assert _py(_IMPORT_MODULE, cwd=cwd, pythonpath=tmp_path / "elsewhere",
               args=(str(path),)) == {"installed": False}


@pytest.mark.parametrize(("entry", "shadows"), [
    ("bmod.py", True), ("bmod.cpython-311-x86_64-linux-gnu.so", True), ("bmod.pyc", True),
    ("bmod/__init__.py", True),
    # A namespace directory is found after a module of that name anywhere
    # on the path; a file without a module suffix is no module (the
    # `tunsup` script beside its Python).
    ("bmod/data.txt", False), ("bmod", False), ("bmodx.py", False),
])
def test_the_scripts_directory_must_not_shadow_a_bundled_module(
        module_bundle: tuple[pathlib.Path, pathlib.Path, pathlib.Path],
        entry: str, shadows: bool) -> None:
    pkgdir, cwd, path = module_bundle
    target = cwd / entry
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("VALUE = 3\n")
    result = _py(_IMPORT_MODULE, cwd=cwd, pythonpath=pkgdir, args=(str(path),))
    assert result["installed"] is not shadows
    if not shadows:
        assert result["value"] == 1


def test_a_script_directory_that_cannot_be_listed_counts_as_shadowing(
        tmp_path: pathlib.Path) -> None:
    app = tmp_path / "app.pyz"
    app.write_bytes(b"PK\5\6" + b"\0" * 18)
    assert _bundle._shadowed({"bmod"}, str(app))
    assert not _bundle._shadowed({"bmod"}, str(tmp_path / "missing"))


def test_code_that_does_not_unmarshal_is_loaded_from_its_file(
        module_bundle: tuple[pathlib.Path, pathlib.Path, pathlib.Path]) -> None:
    pkgdir, cwd, path = module_bundle
    data = bytearray(path.read_bytes())
    loaded = _bundle._load(str(path)) or pytest.fail("unreadable")
    os.close(loaded[3])
    start, length = loaded[0]["bmod"][4:6]
    _, _, head_length = _bundle._HEAD.unpack_from(data)
    at = _bundle._HEAD.size + head_length + start
    data[at:at + length] = b"\xff" * length
    path.write_bytes(bytes(data))
    result = _py(_IMPORT_MODULE, cwd=cwd, pythonpath=pkgdir, args=(str(path),))
    assert result == {"installed": True, "value": 1, "served": 0,
                      "file": str(pkgdir / "bmod.py")}


def test_a_hostile_or_broken_file_is_not_used(
        module_bundle: tuple[pathlib.Path, pathlib.Path, pathlib.Path],
        tmp_path: pathlib.Path) -> None:
    _, _, path = module_bundle
    good = path.read_bytes()
    loaded = _bundle._load(str(path))
    assert loaded is not None
    os.close(loaded[3])
    index, search_path, dir_times = loaded[0], loaded[1], loaded[2]
    code_size = len(good) - loaded[4]

    def with_index(new_index: object, new_dirs: object = None) -> bytes:
        head = marshal.dumps((new_index, search_path,
                              dir_times if new_dirs is None else new_dirs))
        return (_bundle._HEAD.pack(_bundle._MAGIC, zlib.crc32(head), len(head)) + head
                + good[loaded[4]:])

    entry = index["bmod"]
    cases: dict[str, Callable[[pathlib.Path], object]] = {
        # Checksummed, but not what build writes.
        "entry too short": lambda p: p.write_bytes(with_index({"bmod": entry[:4]})),
        "NUL in a path": lambda p: p.write_bytes(
            with_index({"bmod": ("/x\0y", *entry[1:])})),
        "name not a string": lambda p: p.write_bytes(with_index({1: entry})),
        "directory not a string": lambda p: p.write_bytes(with_index(index, {None: 1})),
        "code past the end": lambda p: p.write_bytes(
            with_index({"bmod": (*entry[:4], code_size, 10)})),
        "negative offset": lambda p: p.write_bytes(with_index({"bmod": (*entry[:4], -5, 10)})),
        "fifo": lambda p: os.mkfifo(p),
        "directory": lambda p: p.mkdir(),
        "empty": lambda p: p.write_bytes(b""),
        "garbage": lambda p: p.write_bytes(b"\0" * 100),
        "short": lambda p: p.write_bytes(good[:10]),
        "cut index": lambda p: p.write_bytes(good[:40]),
        "index altered": lambda p: p.write_bytes(good[:20] + bytes([good[20] ^ 1]) + good[21:]),
        "not marshal": lambda p: p.write_bytes(
            _bundle._HEAD.pack(_bundle._MAGIC, 0, 4) + b"\xff\xff\xff\xff"),
    }
    for name, make in cases.items():
        target = tmp_path / f"case-{name.replace(' ', '-')}"
        make(target)
        assert _bundle._load(str(target)) is None, name
    writable = tmp_path / "writable"
    writable.write_bytes(good)
    writable.chmod(0o666)
    assert _bundle._load(str(writable)) is None
    assert _bundle._load(str(tmp_path / "missing")) is None


@needs_netns
def test_the_installed_tunsup_runs_from_the_bundle(
        tmp_path: pathlib.Path, netns: Callable[[str], str]) -> None:
    """The ``tunsup`` script of the environment (as systemd runs it), with
    the bundle ``scripts/setup`` writes: the modules come from it and the
    tunnel comes up."""
    script = pathlib.Path(sys.executable).with_name("tunsup")
    if not script.exists():
        pytest.skip(f"no installed tunsup script beside {sys.executable} (scripts/setup)")
    # As scripts/setup builds it: from the project's root.
    root = pathlib.Path(_bundle.__file__).parent.parent
    subprocess.run([sys.executable, "-m", "tunsup._bundle"], check=True, timeout=120,
                   capture_output=True, cwd=root)
    ns = netns("bundle")
    svc = ServiceProcess(ns, [*run_args(tmp_path, write_conf(tmp_path, "tbndl1")), "--debug"],
                         str(tmp_path), "bundle", program=[str(script)])
    output = ready_then_stopped(svc)
    found = re.search(r"imports: (\d+) modules from the bundle", output)
    assert found, output
    assert int(found.group(1)) >= 100
